"""The report on synthetic run folders with known answers: paired bootstrap against lowest-kappa, the long-horizon
verdict, the Pareto front and the shared-alignment check."""

from __future__ import annotations

import json

import pytest

from conditune.experiment.evidence import pareto_front
from conditune.experiment.runs import align_dir, long_dir, run_dir

SEEDS = [0, 1, 2]
WORDS = 10  # per dev utterance
UTTERANCES = 5
SENTENCES, TOKENS = 4, 8
STEPS = [10, 20]
# arm -> (extra word errors per utterance vs lowest-kappa, extra KL per token, knowledge right of 4, final KL, WER)
ARMS = {
    "lowest-kappa": (0.0, 0.0, 4, 0.10, 30.0),
    "highest-kappa": (2.0, 0.1, 2, 0.20, 50.0),  # 20 pp more WER on every utterance, 0.1 nats more KL per token
    "random": (0.0, -0.05, 4, 0.05, 30.0),  # the same WER, less KL: it dominates lowest-kappa
}


def _write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _run(folder, seed, evals: dict[int, dict], items: dict[int, dict], adaptor_sha: str):
    train = [{"kind": "train", "step": s, "loss": 1.0, "lr": 0.1, "data_sha": f"d{seed}", "elapsed_s": 1.0}
             for s in range(1, max(evals) + 1)]  # fmt: skip
    start = {"kind": "main_start", "step": 0, "adaptor_sha": adaptor_sha, "data_sha": f"d{seed}"}
    _write(
        folder / "train" / "metrics.jsonl",
        [start, *train, *({"kind": "eval", "step": s, **r} for s, r in evals.items())],
    )
    _write(folder / "train" / "eval_items.jsonl", [{"step": s, **r} for s, r in items.items()])
    result = {"step": max(evals), "elapsed_s": 5.0, "data_sha": f"d{seed}", "trainable_llm_params": 100,
              "trainable_params": 150, "seconds_per_step": 0.5}  # fmt: skip
    (folder / "done.json").write_text(json.dumps({"result": result, "note": "synthetic", "finished_at": "2026-12-02"}))


def _items(errors_per_utt: float, kl_extra: float, right: int, seed: int) -> dict:
    base_errors = [1.0 + (u + seed) % 3 for u in range(UTTERANCES)]  # 1..3 errors: items differ
    dev = [[f"u{u}.wav", "en", e + errors_per_utt, WORDS] for u, e in enumerate(base_errors)]
    text = [[20.0, 21.0 + s, (0.1 + 0.01 * s + kl_extra) * TOKENS, TOKENS] for s in range(SENTENCES)]
    knowledge = [[1, int(i < right)] for i in range(4)]
    return {"dev": dev, "text": {"en": text}, "agreement": {"en": [[1.0, 1]]}, "knowledge": knowledge}


@pytest.fixture
def folder(tmp_path):
    from conditune.experiment.config import load_experiment_config

    cfg = load_experiment_config({
        "model": {"encoder": {"path": "x"}, "llm": {"path": "y"}},
        "data": {"train": "t.jsonl"},
        "training": {"max_steps": 20},
        "experiment": {"arms": list(ARMS), "seeds": SEEDS,
                       "long_horizon": {"arms": ["lowest-kappa", "highest-kappa"], "seeds": [0, 1]}},
    })  # fmt: skip
    out = tmp_path / "exp"
    for seed in SEEDS:
        (align_dir(out, seed)).mkdir(parents=True)
        (align_dir(out, seed) / "done.json").write_text(json.dumps({"adaptor_sha": f"a{seed}" * 8}))
        for arm, (errors, kl, right, final_kl, wer) in ARMS.items():
            evals = {s: {"wer_all": wer + (STEPS[-1] - s), "kl": final_kl, "agreement": 1.0} for s in STEPS}
            items = {STEPS[-1]: _items(errors, kl, right, seed)}
            _run(run_dir(out, arm, seed), seed, evals, items, f"a{seed}" * 8)
    # long horizon: highest-kappa is best at step 30 (45 %) and ends at 60 %; lowest-kappa falls throughout
    curves = {"highest-kappa": [60, 50, 45, 47, 50, 55, 58, 60], "lowest-kappa": [70, 60, 55, 50, 47, 45, 44, 43]}
    for arm, wers in curves.items():
        for seed in (0, 1):
            steps = [10 * (k + 1) for k in range(len(wers))]
            evals = {s: {"wer_all": float(w), "kl": 0.1} for s, w in zip(steps, wers)}
            items = {s: {"dev": [[f"u{u}.wav", "en", w / 100 * WORDS, WORDS] for u in range(UTTERANCES)]}
                     for s, w in zip(steps, wers)}  # fmt: skip
            _run(long_dir(out, arm, seed), seed, evals, items, f"a{seed}" * 8)
    return out, cfg


def _row(summary: str, arm: str, metric: str) -> list[str]:
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[0] == arm and cells[1] == metric:
            return cells
    raise AssertionError(f"no row {arm} / {metric}")


def test_paired_bootstrap_long_horizon_and_footing_have_the_known_answers(folder):
    from conditune.experiment.report import build_report

    out, cfg = folder
    result = build_report(out, cfg)
    summary = (out / "summary.md").read_text()
    # every utterance 2 errors of 10 words worse, in every resample: Δ = +20 pp exactly, a point interval
    assert _row(summary, "highest-kappa", "WER (pp)")[2:] == ["3 × 5", "+20", "[+20, +20]", "worse"]
    assert _row(summary, "random", "WER (pp)")[2:] == ["3 × 5", "+0", "[+0, +0]", "within noise"]
    hi_kl = _row(summary, "highest-kappa", "KL(base‖adapted) (nats/token)")
    assert float(hi_kl[3]) == pytest.approx(0.1) and hi_kl[5] == "worse"
    assert _row(summary, "random", "KL(base‖adapted) (nats/token)")[5] == "better"
    knowledge = _row(summary, "highest-kappa", "knowledge accuracy (pp)")
    assert knowledge[3] == "-50" and knowledge[5] == "worse"
    assert _row(summary, "random", "adapted NLL (nats/token)")[2:] == ["3 × 4", "+0", "[+0, +0]", "within noise"]
    # the paper's Figure 1 claim, from the curves: highest-κ best 45 % at step 30, final 60 %; lowest-κ keeps falling
    assert (
        "highest-kappa (2 seeds, 8 evaluations, steps 10–80): WER 60.00 % at first, best 45.00 % at step 30, final 60.00 % (+15.00 pp)"
        in summary
    )
    assert "[+15.00, +15.00] pp): turns upward" in summary
    assert (
        "lowest-kappa (2 seeds, 8 evaluations, steps 10–80): WER 70.00 % → 43.00 %, lowest at the last evaluation: keeps falling"
        in summary
    )
    assert "keeps falling" in summary and "claim" in summary and ": supported by these runs" in summary
    # Pareto: random (KL 0.05, WER 30) dominates lowest-kappa (0.10, 30) and highest-kappa (0.20, 50)
    assert "Pareto front" in summary and "random (KL 0.0500, WER 30.00 %)." in summary
    # footing: every arm started its main phase from the seed's shared alignment stage
    assert summary.count("main phase started from the shared alignment stage's adaptor") == 3
    assert "DIFFER" not in summary
    assert result["long_runs"] == 4 and all((out / p).is_file() for p in ("wer_over_steps.png", "results.csv"))
    rows = (out / "results.csv").read_text().splitlines()
    assert any(r.startswith("long:highest-kappa,0,30,wer_all,45.0") for r in rows)


def test_a_different_starting_adaptor_is_flagged(folder):
    from conditune.experiment.report import build_report

    out, cfg = folder
    metrics = run_dir(out, "random", 1) / "train" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[0] = json.dumps({"kind": "main_start", "step": 0, "adaptor_sha": "f" * 16})
    metrics.write_text("\n".join(lines) + "\n")
    build_report(out, cfg)
    summary = (out / "summary.md").read_text()
    assert summary.count("main-phase adaptor DIFFERS") == 1 and "random=ffffffff" in summary


def test_pareto_front():
    points = {"a": (0.1, 30.0), "b": (0.2, 20.0), "c": (0.3, 40.0), "d": (0.1, 35.0), "e": (float("nan"), 1.0)}
    assert pareto_front(points) == ["a", "b"]


def test_runs_from_two_machines_are_named_apart(folder):
    from conditune.experiment.report import build_report
    from conditune.experiment.runs import machine_history

    out, cfg = folder
    intel = {"cpu": "Intel Xeon", "cores": 2, "gpu": None, "torch": "2.13.0+cpu", "python": "3.11.7"}
    amd = {**intel, "cpu": "AMD EPYC"}
    build_report(out, cfg)
    assert "Machine" not in (out / "summary.md").read_text()  # nothing recorded: nothing claimed
    # a folder written before the history was kept: its one machine opens the history; a later invocation adds one
    old = {"machine": {**intel, "load_average": [1.0]}, "first_run_started_at": "T0", "updated_at": "T1"}
    history = machine_history(old, {**amd, "load_average": [2.0]}, "T2", "T3")
    assert [(m["cpu"], m["first_seen"], m["last_seen"]) for m in history] == [("Intel Xeon", "T0", "T1"),
                                                                             ("AMD EPYC", "T2", "T3")]  # fmt: skip
    assert machine_history({"machines": history}, amd, "T4", "T5")[-1]["last_seen"] == "T5"  # same kind: extended
    (out / "experiment.json").write_text(json.dumps({"machines": history}))
    for arm in ("lowest-kappa", "highest-kappa"):
        done = run_dir(out, arm, 2) / "done.json"
        done.write_text(json.dumps({**json.loads(done.read_text()), "machine": amd}))
    build_report(out, cfg)
    summary = (out / "summary.md").read_text()
    assert "Machines (s/step and wall s compare only within one):" in summary
    assert "- Intel Xeon, 2 cores, GPU none, torch 2.13.0+cpu, Python 3.11.7: invocations T0 to T1; 0 runs" in summary
    assert "- AMD EPYC, 2 cores, GPU none, torch 2.13.0+cpu, Python 3.11.7: invocations T2 to T3; 2 runs" in summary
    assert "- 11 runs finished before runs recorded their machine" in summary  # 9 main + 4 long, 2 of them recorded


def test_arm_colours_are_distinct_hues_for_ten_arms_and_stable():
    from conditune.experiment.plots import arm_colors

    names = [f"arm{i}" for i in range(11)]
    colors = arm_colors([*names, "arm0"])  # a long-horizon arm keeps its main arm's colour
    assert list(colors) == names
    assert len(set(colors[n] for n in names[:10])) == 10
    # no light shade among the first ten: each is tab20's dark member of its pair
    from matplotlib import colormaps

    light = {colormaps["tab20"](i) for i in range(1, 20, 2)}
    assert not light & {colors[n] for n in names[:10]} and colors["arm10"] in light


def test_a_metric_of_one_evaluation_is_drawn_per_arm():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from conditune.experiment.plots import arm_colors, by_arm

    runs = {("a", 0): {"evals": {10: {"k": 0.1}, 20: {"k": 0.2}}}, ("a", 1): {"evals": {20: {"k": 0.4}}},
            ("b", 0): {"evals": {20: {}}}, ("c", 0): {"evals": {20: {"k": -0.1}}}}  # fmt: skip
    fig, ax = plt.subplots()
    by_arm(ax, runs, ["a", "b", "c"], [0, 1], "k", arm_colors("abc"))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "c"]  # b has no value
    from matplotlib.collections import PathCollection

    dots = [c.get_offsets().tolist() for c in ax.collections if isinstance(c, PathCollection)]
    assert dots == [[[0.0, 0.2], [0.0, 0.4]], [[1.0, -0.1]]]  # each seed at its last evaluation
    plt.close(fig)


def test_a_rise_within_noise_after_the_best_is_no_upturn_and_not_a_fall_either():
    from conditune.experiment.evidence import Curve, TurnVerdict, describe_turn

    rose = TurnVerdict("highest-kappa", Curve("highest-kappa", [1, 2, 3], [83.4, 72.3, 75.8], 1), 3.5, -1.5, 8.7)
    (line,) = describe_turn([rose])
    assert line.endswith("(95 % interval of the rise [-1.50, +8.70] pp), a rise within noise: no upturn shown")
    assert not rose.turns_upward and rose.keeps_falling
    up = TurnVerdict("highest-kappa", Curve("highest-kappa", [1, 2, 3], [83.4, 72.3, 75.8], 1), 3.5, 0.5, 8.7)
    assert describe_turn([up])[0].endswith("[+0.50, +8.70] pp): turns upward")

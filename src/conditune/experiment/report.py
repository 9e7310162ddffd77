"""results.csv, summary.md and the three plots of an experiment, rebuilt from the finished runs on disk.

``summary.md``: the machine, dates and fingerprint; the final table (mean ± std over seeds); forgetting per
language and the knowledge probe; each arm against ``lowest-kappa`` with paired 95 % bootstrap intervals over
seeds × evaluation items (:mod:`conditune.experiment.evidence`), "within noise" where an interval holds 0; the
long-horizon verdict (does highest-κ's WER turn upward after an early best while lowest-κ keeps falling?); the
identical-footing checks (batch order, learning rates, evaluation steps, and the adaptor each arm's main phase
started from); what each arm trained.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from conditune.experiment.evidence import ITEM_METRICS, REFERENCE, compare, describe_turn, pareto_front, turn_verdict
from conditune.experiment.plots import final_points, make_plots
from conditune.io import atomic_write_text, read_jsonl

SUMMARY_METRICS = [
    ("ppl_change", "ppl change", "{:+.3f}"),
    ("kl", "KL(base‖adapted)", "{:.4f}"),
    ("agreement", "agreement", "{:.3f}"),
    ("knowledge_adapted", "knowledge acc", "{:.3f}"),
    ("knowledge_change", "knowledge Δ", "{:+.3f}"),
]
LONG_PREFIX = "long:"  # results.csv names a long-horizon run's arm "long:<arm>"


def collect(output: Path, arms: list[str], seeds: list[int], *, long: bool = False) -> dict[tuple[str, int], dict]:
    """Finished runs: (arm, seed) -> {"done", "evals": {step: record}, "train": [records], "main_start": record,
    "items": {step: per-item record}}."""
    from conditune.experiment.runs import DONE, ITEMS, long_dir, read_items, run_dir

    runs = {}
    for arm in arms:
        for seed in seeds:
            folder = (long_dir if long else run_dir)(output, arm, seed)
            if not (folder / DONE).is_file():
                continue
            records = read_jsonl(folder / "train" / "metrics.jsonl")
            evals: dict[int, dict] = {}
            for r in records:
                if r.get("kind") == "eval":
                    evals[int(r["step"])] = r  # a repeated step (a resumed final evaluation): the last wins
            starts = [r for r in records if r.get("kind") == "main_start"]
            runs[(arm, seed)] = {
                "done": json.loads((folder / DONE).read_text()),
                "evals": evals,
                "train": [r for r in records if r.get("kind") == "train"],
                "main_start": starts[0] if starts else None,
                "items": read_items(folder / "train" / ITEMS),
            }
    return runs


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def rows_for(runs, prefix: str = "") -> list[tuple[str, int, int, str, float]]:
    rows = []
    for (arm, seed), run in runs.items():
        for step in sorted(run["evals"]):
            for key, value in run["evals"][step].items():
                if key not in ("kind", "step") and _num(value):
                    rows.append((prefix + arm, seed, step, key, float(value)))
        final = max(run["evals"]) if run["evals"] else run["done"]["result"]["step"]
        res = run["done"]["result"]
        wall = max((r.get("elapsed_s", 0.0) for r in run["train"]), default=res["elapsed_s"])
        for key, value in (
            ("trainable_params", res.get("trainable_params")),
            ("trainable_llm_params", res.get("trainable_llm_params")),
            ("seconds_per_step", res.get("seconds_per_step")),
            ("wall_s", wall),
        ):
            if _num(value):
                rows.append((prefix + arm, seed, final, key, float(value)))
    return rows


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, math.nan
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _fmt(m: float, s: float, spec: str) -> str:
    if not math.isfinite(m):
        return "–"
    return spec.format(m) + ("" if not math.isfinite(s) else " ± " + spec.format(s).lstrip("+"))


def _final_values(rows, runs) -> dict[tuple[str, int], dict[str, float]]:
    """(arm, seed) -> metric -> value at the run's last evaluation."""
    final: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    last_step = {k: max(r["evals"]) for k, r in runs.items() if r["evals"]}
    for arm, seed, step, metric, value in rows:
        if step == last_step.get((arm, seed)):
            final[(arm, seed)][metric] = value
    return final


def build_report(output: Path, cfg) -> dict[str, Any]:
    output = Path(output)
    e = cfg.experiment
    arms, seeds = list(e.arms), list(e.seeds)
    long_arms, long_seeds = list(e.long_horizon.arms), list(e.long_horizon.seeds or e.seeds)
    runs = collect(output, arms, seeds)
    long_runs = collect(output, long_arms, long_seeds, long=True)
    rows = rows_for(runs)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["arm", "seed", "step", "metric", "value"])
    writer.writerows(rows + rows_for(long_runs, LONG_PREFIX))
    atomic_write_text(output / "results.csv", buf.getvalue())

    final = _final_values(rows, runs)
    langs = sorted({m[4:] for v in final.values() for m in v if m.startswith("wer_") and m != "wer_all"})
    done_arms = [a for a in arms if any((a, s) in runs for s in seeds)]

    def stat(arm, metric):
        return mean_std([final[(arm, s)].get(metric, math.nan) for s in seeds if (arm, s) in final])

    points = {}
    for arm in done_arms:
        pts = final_points(runs, arm, seeds)
        if pts:
            points[arm] = (sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts))
    front = pareto_front(points)
    lines = [
        *header_section(output, cfg, runs, long_runs),
        *table_section(cfg, runs, final, done_arms, seeds, langs, stat),
        "",
        *forgetting_section(final, done_arms, stat),
        "",
        *evidence_section(runs, done_arms, seeds, langs),
        "",
        *pareto_section(points, front),
        "",
        *long_section(long_runs, long_arms, long_seeds),
        "",
        *footing_section(runs, seeds, done_arms, output),
        "",
        "What each arm trained:",
        "",
        *[
            f"- {arm}: {runs[(arm, s)]['done'].get('note', '')} (seed {s})"
            for arm in done_arms
            for s in seeds[:1]
            if (arm, s) in runs
        ],
        "",
    ]
    text = "\n".join(lines)
    while "\n\n\n" in text:  # an empty section leaves no gap of its own
        text = text.replace("\n\n\n", "\n\n")
    atomic_write_text(output / "summary.md", text)
    plots = make_plots(output, runs, done_arms, seeds, langs, long_runs=long_runs, long_arms=long_arms,
                       long_seeds=long_seeds, pareto=front)  # fmt: skip
    return {
        "results": str(output / "results.csv"),
        "summary": str(output / "summary.md"),
        "plots": plots,
        "runs": len(runs),
        "long_runs": len(long_runs),
    }


def header_section(output: Path, cfg, runs, long_runs) -> list[str]:
    from conditune.experiment.runs import INFO, fingerprint

    info = {}
    if (output / INFO).is_file():
        try:
            info = json.loads((output / INFO).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            info = {}
    finished = sorted(r["done"].get("finished_at", "") for r in [*runs.values(), *long_runs.values()])
    finished = [f for f in finished if f]
    lines = ["# Experiment summary", ""]
    lines.append(f"Config fingerprint `{fingerprint(cfg)}` (the resolved config is in `experiment.json`).")
    lines += machines_lines(info, [*runs.values(), *long_runs.values()])
    if finished:
        lines.append(f"Runs finished between {finished[0]} and {finished[-1]}"
                     + (f" (first invocation started {info['first_run_started_at']})." if info.get("first_run_started_at")
                        else "."))  # fmt: skip
    return [*lines, ""]


def _machine_name(m: dict) -> str:
    return f"{m.get('cpu')}, {m.get('cores')} cores, GPU {m.get('gpu') or 'none'}, torch {m.get('torch')}, " \
           f"Python {m.get('python')}"  # fmt: skip


def machines_lines(info: dict, runs: list[dict]) -> list[str]:
    """The machine(s) the runs trained on: the folder's history of invocations (``experiment.json``) and each run's
    own record (``done.json``), so that timings from different machines are never read as one."""
    from conditune.machine import same_machine

    kinds = list(info.get("machines") or ([info["machine"]] if info.get("machine") else []))
    recorded = [r["done"]["machine"] for r in runs if r["done"].get("machine")]
    kinds += [m for m in recorded if not any(same_machine(m, k) for k in kinds)]
    if len(kinds) <= 1:
        return [f"Machine: {_machine_name(kinds[0])}."] if kinds else []
    lines = ["Machines (s/step and wall s compare only within one):"]
    for m in kinds:
        count = sum(1 for r in recorded if same_machine(r, m))
        span = f"invocations {m['first_seen']} to {m['last_seen']}; " if m.get("first_seen") else ""
        lines.append(f"- {_machine_name(m)}: {span}{count} runs record it in their done.json")
    unrecorded = len(runs) - len(recorded)
    if unrecorded:
        lines.append(f"- {unrecorded} runs finished before runs recorded their machine (the invocations say where)")
    return [*lines, ""]


def table_section(cfg, runs, final, done_arms, seeds, langs, stat) -> list[str]:
    arms = list(cfg.experiment.arms)
    last_steps = sorted({max(r["evals"]) for r in runs.values() if r["evals"]})
    lines = [
        f"Runs finished: {len(runs)} of {len(arms) * len(seeds)} ({len(arms)} arms × seeds {seeds}). "
        f"Values at each run's last evaluation step (step {last_steps or '–'}), mean ± sample std over seeds. "
        f"N = {cfg.experiment.count} tensors for the selection arms. WER in %; ppl change = perplexity(adapted)/"
        "perplexity(base) − 1 on held-out text; KL in nats per token; agreement = share of the base model's "
        "greedy tokens the adapted model reproduces on instructions (1 = no change); knowledge acc = accuracy on "
        "the knowledge questions (highest total answer log-likelihood), Δ = adapted − base.",
        "",
    ]
    head = (["arm", "seeds", "WER all", *[f"WER {l}" for l in langs], *[h for _, h, _ in SUMMARY_METRICS],
             "trainable LLM params", "vs lowest-κ", "s/step", "wall s"])  # fmt: skip
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    target = stat(REFERENCE, "trainable_llm_params")[0]
    for arm in done_arms:
        n = sum((arm, s) in runs for s in seeds)
        cells = [
            arm,
            str(n),
            _fmt(*stat(arm, "wer_all"), "{:.2f}"),
            *[_fmt(*stat(arm, f"wer_{l}"), "{:.2f}") for l in langs],
        ]
        cells += [_fmt(*stat(arm, key), spec) for key, _, spec in SUMMARY_METRICS]
        params = stat(arm, "trainable_llm_params")[0]
        cells += [
            f"{params / 1e6:.3f}M" if math.isfinite(params) else "–",
            f"{params / target - 1:+.1%}" if math.isfinite(params) and math.isfinite(target) and target else "–",
            _fmt(*stat(arm, "seconds_per_step"), "{:.2f}"),
            _fmt(*stat(arm, "wall_s"), "{:.0f}"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Budgets: the matched arms (lora, kappa-lora, pissa, osf) are within experiment.match_tolerance of "
              "lowest-kappa's LLM parameters; the selection arms (highest-kappa, random, lowest-kappa-norm, spectrum) "
              "train N whole tensors, whose sizes differ; adaptor-only (no LLM parameters) and full (all of them) "
              "cannot be matched: they bracket the range."]  # fmt: skip
    return lines


def forgetting_section(final, done_arms, stat) -> list[str]:
    flangs = sorted({m[len("kl_") :] for v in final.values() for m in v if m.startswith("kl_")})
    if not flangs:
        return []
    lines = ["Forgetting per language:", ""]
    head = ["arm"] + [f"{h} {l}" for l in flangs for h in ("ppl change", "KL", "agreement")]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in done_arms:
        cells = [arm]
        for l in flangs:
            cells += [
                _fmt(*stat(arm, f"ppl_change_{l}"), "{:+.3f}"),
                _fmt(*stat(arm, f"kl_{l}"), "{:.4f}"),
                _fmt(*stat(arm, f"agreement_{l}"), "{:.3f}"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def final_items(runs, arm: str, seeds: list[int]) -> dict[int, dict[str, Any]]:
    """seed -> the per-item record of the run's last evaluation."""
    out = {}
    for s in seeds:
        run = runs.get((arm, s))
        if run is not None and run["items"]:
            out[s] = run["items"][max(run["items"])]
    return out


def evidence_section(runs, arms, seeds, langs) -> list[str]:
    lines = ["## Each arm against lowest-kappa, with 95 % paired bootstrap intervals", ""]
    if REFERENCE not in arms:
        return lines + [f"(no {REFERENCE} arm: nothing to compare against)"]
    items = {arm: final_items(runs, arm, seeds) for arm in arms}
    if not items[REFERENCE]:
        return lines + ["(no per-item results: runs made before eval_items.jsonl existed)"]
    metrics = ["wer", *[f"wer_{l}" for l in langs], *[m for m in ITEM_METRICS if m != "wer"]]
    lines += [
        "Δ = arm − lowest-kappa at the last evaluation, from per-item results (dev utterances: word errors and "
        "reference words; held-out sentences: KL and NLL sums and tokens; knowledge questions; instruction prompts). "
        "Each of 2,000 resamples draws seeds with replacement and items within each seed with replacement, the same "
        "draw for both arms (a paired bootstrap); the interval is the 2.5–97.5 % range of the resampled Δ. "
        "*within noise*: the interval holds 0 (no evidence either way, not 'equal'); *better* / *worse*: for the arm, "
        "on that metric (lower WER, KL and NLL are better; higher knowledge accuracy and agreement are better).",
        "",
        "| arm | metric | seeds × items | Δ | 95 % interval | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for arm in arms:
        if arm == REFERENCE:
            continue
        for metric in metrics:
            c = compare(items, metric, arm)
            if c.verdict == "no data":
                continue
            title = ITEM_METRICS[metric][0] if metric in ITEM_METRICS else f"WER {metric[4:]} (pp)"
            lines.append(f"| {arm} | {title} | {c.seeds} × {c.items} | {c.value:+.4g} | [{c.low:+.4g}, {c.high:+.4g}] "
                         f"| {c.verdict} |")  # fmt: skip
    if len(seeds) < 3:
        lines += ["", f"Only {len(seeds)} seed(s): the intervals resample items within so few seeds that they mostly "
                  "measure item noise, not seed noise."]  # fmt: skip
    return lines


def pareto_section(points, front) -> list[str]:
    if not points:
        return []
    cells = ", ".join(f"{a} (KL {points[a][0]:.4f}, WER {points[a][1]:.2f} %)" for a in front)
    return ["## WER against forgetting", "",
            f"Pareto front (no other arm has both lower mean final KL and lower mean final WER): {cells}. "
            "See wer_vs_forgetting.png; differences inside the seed spread are not evidence (table above)."]  # fmt: skip


def long_section(long_runs, long_arms, long_seeds) -> list[str]:
    if not long_arms:
        return []
    lines = ["## Long horizon (the paper's Figure 1)", ""]
    verdicts = {}
    for arm in long_arms:
        evals = {s: long_runs[(arm, s)]["evals"] for s in long_seeds if (arm, s) in long_runs}
        items = {s: long_runs[(arm, s)]["items"] for s in long_seeds if (arm, s) in long_runs}
        if evals:
            verdicts[arm] = turn_verdict(arm, evals, items)
    if not verdicts:
        return lines + ["No long-horizon run has finished yet."]
    lines += describe_turn(list(verdicts.values()))
    hi, lo = verdicts.get("highest-kappa"), verdicts.get("lowest-kappa")
    if hi is not None and lo is not None:
        claim = hi.turns_upward and lo.keeps_falling
        lines += ["", f"The paper's claim (highest-κ's WER turns upward after an early best while lowest-κ keeps "
                  f"falling): {'supported' if claim else 'not supported'} by these runs."]  # fmt: skip
    return lines


def footing_section(runs, seeds, arms, output: Path) -> list[str]:
    """Did every arm of a seed see the same batches and learning rates and start from the same adaptor?"""
    from conditune.experiment.runs import DONE, align_dir

    lines = ["## Identical footing", ""]
    for seed in seeds:
        shas, lrs, steps, starts = {}, {}, {}, {}
        for arm in arms:
            run = runs.get((arm, seed))
            if run is None:
                continue
            shas[arm] = run["done"]["result"].get("data_sha")
            lrs[arm] = [(r["step"], r.get("lr")) for r in run["train"]]
            steps[arm] = sorted(run["evals"])
            if run["main_start"]:
                starts[arm] = run["main_start"].get("adaptor_sha")
        if not shas:
            continue
        same_data = len(set(shas.values())) == 1
        same_lr = len({json.dumps(v) for v in lrs.values()}) == 1
        same_steps = len({tuple(v) for v in steps.values()}) == 1
        first = next(iter(shas.values()))
        lines.append(
            f"- seed {seed}: batch order {'identical' if same_data else 'DIFFERS'} across {len(shas)} arms "
            f"(data_sha {first[:12] if same_data else ', '.join(f'{a}={str(s)[:8]}' for a, s in shas.items())}); "
            f"adaptor learning-rate schedule {'identical' if same_lr else 'DIFFERS'}; evaluation steps "
            f"{'identical' if same_steps else 'DIFFER'} ({next(iter(steps.values()))})"
            + _start_note(starts, align_dir(output, seed) / DONE)
        )
    return lines


def _start_note(starts: dict[str, str], align_done: Path) -> str:
    if not starts:
        return ""
    shared = None
    if align_done.is_file():
        shared = json.loads(align_done.read_text()).get("adaptor_sha")
    same = len(set(starts.values())) == 1 and (shared is None or shared in starts.values())
    where = " the shared alignment stage's" if shared else ""
    if same:
        return f"; main phase started from{where} adaptor {next(iter(starts.values()))[:12]} in all {len(starts)} arms"
    return (
        "; main-phase adaptor DIFFERS: "
        + ", ".join(f"{a}={h[:8]}" for a, h in starts.items())
        + (f" (shared stage {shared[:8]})" if shared else "")
    )

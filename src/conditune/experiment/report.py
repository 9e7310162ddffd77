"""results.csv, summary.md and the three plots of an experiment, rebuilt from the finished runs on disk."""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from conditune.io import atomic_write, atomic_write_text, read_jsonl

SUMMARY_METRICS = [
    ("ppl_change", "ppl change", "{:+.3f}"),
    ("kl", "KL(base‖adapted)", "{:.4f}"),
    ("agreement", "agreement", "{:.3f}"),
]
NOISE_METRICS = ["wer_all", "ppl_change", "kl", "agreement"]


def collect(output: Path, arms: list[str], seeds: list[int]) -> dict[tuple[str, int], dict[str, Any]]:
    """Finished runs: (arm, seed) -> {"done", "evals": {step: record}, "train": [records]}."""
    from conditune.experiment.runs import DONE, run_dir

    runs = {}
    for arm in arms:
        for seed in seeds:
            folder = run_dir(output, arm, seed)
            if not (folder / DONE).is_file():
                continue
            records = read_jsonl(folder / "train" / "metrics.jsonl")
            evals: dict[int, dict] = {}
            for r in records:
                if r.get("kind") == "eval":
                    evals[int(r["step"])] = r  # a repeated step (a resumed final evaluation): the last wins
            runs[(arm, seed)] = {
                "done": json.loads((folder / DONE).read_text()),
                "evals": evals,
                "train": [r for r in records if r.get("kind") == "train"],
            }
    return runs


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def rows_for(runs) -> list[tuple[str, int, int, str, float]]:
    rows = []
    for (arm, seed), run in runs.items():
        for step in sorted(run["evals"]):
            for key, value in run["evals"][step].items():
                if key not in ("kind", "step") and _num(value):
                    rows.append((arm, seed, step, key, float(value)))
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
                rows.append((arm, seed, final, key, float(value)))
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


def build_report(output: Path, cfg) -> dict[str, Any]:
    output = Path(output)
    arms, seeds = list(cfg.experiment.arms), list(cfg.experiment.seeds)
    runs = collect(output, arms, seeds)
    rows = rows_for(runs)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["arm", "seed", "step", "metric", "value"])
    writer.writerows(rows)
    atomic_write_text(output / "results.csv", buf.getvalue())

    # final values: (arm, seed) -> metric -> value at the run's last evaluation
    final: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    last_step = {k: max(r["evals"]) for k, r in runs.items() if r["evals"]}
    for arm, seed, step, metric, value in rows:
        if step == last_step.get((arm, seed)):
            final[(arm, seed)][metric] = value
    langs = sorted({m[4:] for v in final.values() for m in v if m.startswith("wer_") and m != "wer_all"})
    flangs = sorted({m[len("kl_") :] for v in final.values() for m in v if m.startswith("kl_")})
    done_arms = [a for a in arms if any((a, s) in runs for s in seeds)]

    def stat(arm, metric):
        return mean_std([final[(arm, s)].get(metric, math.nan) for s in seeds if (arm, s) in final])

    lines = [
        "# Experiment summary",
        "",
        f"Runs finished: {len(runs)} of {len(arms) * len(seeds)} ({len(arms)} arms × seeds {seeds}). "
        f"Values at each run's last evaluation step (step {sorted(set(last_step.values())) or '–'}), "
        "mean ± sample std over seeds. N = "
        f"{cfg.experiment.count} tensors for the selection arms. WER in %; ppl change = perplexity(adapted)/"
        "perplexity(base) − 1 on held-out text; KL in nats per token; agreement = share of the base model's "
        "greedy tokens the adapted model reproduces on instructions (1 = no change).",
        "",
    ]
    head = (
        ["arm", "seeds"]
        + ["WER all"]
        + [f"WER {l}" for l in langs]
        + [h for _, h, _ in SUMMARY_METRICS]
        + ["trainable LLM params", "s/step", "wall s"]
    )
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in done_arms:
        n = sum((arm, s) in runs for s in seeds)
        cells = [arm, str(n), _fmt(*stat(arm, "wer_all"), "{:.2f}")] + [
            _fmt(*stat(arm, f"wer_{l}"), "{:.2f}") for l in langs
        ]
        cells += [_fmt(*stat(arm, key), spec) for key, _, spec in SUMMARY_METRICS]
        params = stat(arm, "trainable_llm_params")[0]
        cells += [
            f"{params / 1e6:.3f}M" if math.isfinite(params) else "–",
            _fmt(*stat(arm, "seconds_per_step"), "{:.2f}"),
            _fmt(*stat(arm, "wall_s"), "{:.0f}"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if flangs:
        lines += ["", "Forgetting per language:", ""]
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
    lines += ["", *noise_section(done_arms, seeds, final, stat), "", *footing_section(runs, seeds, done_arms)]
    notes = [
        f"- {arm}: {runs[(arm, s)]['done'].get('note', '')} (seed {s})"
        for arm in done_arms
        for s in seeds[:1]
        if (arm, s) in runs
    ]
    lines += ["", "What each arm trained:", "", *notes, ""]
    atomic_write_text(output / "summary.md", "\n".join(lines))
    plots = make_plots(output, runs, done_arms, seeds, langs)
    return {
        "results": str(output / "results.csv"),
        "summary": str(output / "summary.md"),
        "plots": plots,
        "runs": len(runs),
    }


def noise_section(arms, seeds, final, stat) -> list[str]:
    ref = "lowest-kappa"
    lines = ["## Differences against seed noise", ""]
    if ref not in arms:
        return lines + [f"(no {ref} arm: nothing to compare against)"]
    if len(seeds) < 2:
        return lines + ["One seed only: there is no estimate of seed noise, so no difference below can be called real."]
    lines += [
        f"Each arm against `{ref}` at the last step: Δ = mean(arm) − mean({ref}); pooled std = √((s₁² + s₂²)/2). "
        "|Δ| < 2·pooled std is marked *within noise*: with this many seeds such a difference is not evidence either way.",
        "",
        "| arm | metric | Δ | pooled std | verdict |",
        "|---|---|---|---|---|",
    ]
    for arm in arms:
        if arm == ref:
            continue
        for metric in NOISE_METRICS:
            (m1, s1), (m0, s0) = stat(arm, metric), stat(ref, metric)
            if not (math.isfinite(m1) and math.isfinite(m0)):
                continue
            pooled = math.sqrt(((s1 if math.isfinite(s1) else 0) ** 2 + (s0 if math.isfinite(s0) else 0) ** 2) / 2)
            delta = m1 - m0
            verdict = "within noise" if abs(delta) < 2 * pooled or (pooled == 0 and delta == 0) else "beyond 2σ"
            lines.append(f"| {arm} | {metric} | {delta:+.4g} | {pooled:.4g} | {verdict} |")
    return lines


def footing_section(runs, seeds, arms) -> list[str]:
    """Did every arm of a seed see the same batches and learning rates? (from the trainer's logs)"""
    lines = ["## Identical footing", ""]
    for seed in seeds:
        shas, lrs, steps = {}, {}, {}
        for arm in arms:
            run = runs.get((arm, seed))
            if run is None:
                continue
            shas[arm] = run["done"]["result"].get("data_sha")
            lrs[arm] = [(r["step"], r.get("lr")) for r in run["train"]]
            steps[arm] = sorted(run["evals"])
        if not shas:
            continue
        same_data = len(set(shas.values())) == 1
        same_lr = len({json.dumps(v) for v in lrs.values()}) == 1
        same_steps = len({tuple(v) for v in steps.values()}) == 1
        lines.append(
            f"- seed {seed}: batch order {'identical' if same_data else 'DIFFERS'} across {len(shas)} arms "
            f"(data_sha {next(iter(shas.values()))[:12] if same_data else ', '.join(f'{a}={str(s)[:8]}' for a, s in shas.items())}); "
            f"adaptor learning-rate schedule {'identical' if same_lr else 'DIFFERS'}; evaluation steps "
            f"{'identical' if same_steps else 'DIFFER'} ({next(iter(steps.values()))})"
        )
    return lines


def make_plots(output: Path, runs, arms, seeds, langs) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    colors = {arm: plt.get_cmap("tab10")(i % 10) for i, arm in enumerate(arms)}

    def series(arm, metric):
        by_step = defaultdict(list)
        for s in seeds:
            run = runs.get((arm, s))
            if run is None:
                continue
            for step, rec in run["evals"].items():
                if _num(rec.get(metric)) and math.isfinite(rec[metric]):
                    by_step[step].append(float(rec[metric]))
        steps = sorted(by_step)
        means = np.array([np.mean(by_step[k]) for k in steps])
        stds = np.array([np.std(by_step[k], ddof=1) if len(by_step[k]) > 1 else 0.0 for k in steps])
        return np.array(steps), means, stds

    def panel(ax, metric, title):
        for arm in arms:
            x, m, s = series(arm, metric)
            if not len(x):
                continue
            ax.plot(x, m, marker="o", ms=3, label=arm, color=colors[arm])
            ax.fill_between(x, m - s, m + s, color=colors[arm], alpha=0.18)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)

    written = []

    def save(fig, name):
        with atomic_write(output / name, "wb") as handle:
            fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(str(output / name))

    panels = [("wer_all", "dev WER, all (%)")] + [(f"wer_{l}", f"dev WER, {l} (%)") for l in langs]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (metric, title) in zip(axes[0], panels):
        panel(ax, metric, title)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("WER over steps (mean ± std over seeds)")
    save(fig, "wer_over_steps.png")

    fpanels = [
        ("kl", "KL(base‖adapted), nats/token"),
        ("ppl_change", "perplexity change (adapted/base − 1)"),
        ("agreement", "greedy agreement with base"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6), squeeze=False)
    for ax, (metric, title) in zip(axes[0], fpanels):
        panel(ax, metric, title)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Forgetting of the LLM over steps (mean ± std over seeds)")
    save(fig, "forgetting_over_steps.png")

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for arm in arms:
        pts = []
        for s in seeds:
            run = runs.get((arm, s))
            if run is None or not run["evals"]:
                continue
            rec = run["evals"][max(run["evals"])]
            if _num(rec.get("kl")) and _num(rec.get("wer_all")):
                pts.append((rec["kl"], rec["wer_all"]))
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.scatter(xs, ys, s=14, alpha=0.5, color=colors[arm])
        ax.errorbar(
            [np.mean(xs)],
            [np.mean(ys)],
            xerr=[np.std(xs, ddof=1) if len(xs) > 1 else 0],
            yerr=[np.std(ys, ddof=1) if len(ys) > 1 else 0],
            fmt="o",
            ms=7,
            color=colors[arm],
            label=arm,
            capsize=3,
        )
    ax.set_xlabel("KL(base‖adapted) on held-out text, nats/token (less = less forgetting)")
    ax.set_ylabel("final dev WER, all (%)")
    ax.set_title("Final WER vs forgetting (dots: seeds; markers: mean ± std)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    save(fig, "wer_vs_forgetting.png")
    return written

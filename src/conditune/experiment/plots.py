"""The experiment's figures: WER over steps (the paper's Figure 1 form, with the long-horizon pair), forgetting
over steps, and final WER against forgetting with the Pareto front."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conditune.io import save_figure


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(runs: dict, arm: str, seeds: list[int], metric: str):
    """(steps, mean, std) of ``metric`` over the seeds of ``arm`` in ``runs`` ((arm, seed) -> run)."""
    import numpy as np

    by_step = defaultdict(list)
    for s in seeds:
        run = runs.get((arm, s))
        if run is None:
            continue
        for step, rec in run["evals"].items():
            if _num(rec.get(metric)):
                by_step[step].append(float(rec[metric]))
    steps = sorted(by_step)
    means = np.array([np.mean(by_step[k]) for k in steps])
    stds = np.array([np.std(by_step[k], ddof=1) if len(by_step[k]) > 1 else 0.0 for k in steps])
    return np.array(steps), means, stds


def make_plots(output: Path, runs, arms, seeds, langs, *, long_runs=None, long_arms=(), long_seeds=(),
               pareto=None) -> list[str]:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = arm_colors([*arms, *long_arms])
    written = []

    def panel(ax, metric, title, source=runs, which=arms, chosen=seeds, dashed=False):
        for arm in which:
            x, m, s = series(source, arm, chosen, metric)
            if not len(x):
                continue
            ax.plot(x, m, marker="o", ms=3, label=arm + (" (long)" if dashed else ""), color=colors[arm],
                    linestyle="--" if dashed else "-")  # fmt: skip
            ax.fill_between(x, m - s, m + s, color=colors[arm], alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)

    def save(fig, name):
        save_figure(fig, output / name, dpi=110)
        written.append(str(output / name))

    panels = [("wer_all", "dev WER, all (%)")] + [(f"wer_{l}", f"dev WER, {l} (%)") for l in langs]
    extra = 1 if long_runs else 0
    fig, axes = plt.subplots(1, len(panels) + extra, figsize=(4.6 * (len(panels) + extra), 3.8), squeeze=False)
    for ax, (metric, title) in zip(axes[0], panels):
        panel(ax, metric, title)
    if long_runs:
        ax = axes[0][-1]
        panel(ax, "wer_all", "long horizon: dev WER, all (%)", long_runs, long_arms, list(long_seeds), dashed=True)
        ax.legend(fontsize=7)
    axes[0][0].legend(fontsize=6)
    fig.suptitle("WER over steps (mean ± std over seeds; the paper's Figure 1 form)")
    save(fig, "wer_over_steps.png")

    fpanels = [
        ("kl", "KL(base‖adapted), nats/token"),
        ("ppl_change", "perplexity change (adapted/base − 1)"),
        ("agreement", "greedy agreement with base"),
        ("knowledge_change", "knowledge accuracy change (adapted − base)"),
    ]
    fpanels = [p for p in fpanels if any(_num(r["evals"][k].get(p[0])) for r in runs.values() for k in r["evals"])]
    long_kl = bool(long_runs) and any(_num(e.get("kl")) for r in long_runs.values() for e in r["evals"].values())
    count = max(1, len(fpanels) + long_kl)
    fig, axes = plt.subplots(1, count, figsize=(4.6 * count, 3.8), squeeze=False)
    for ax, (metric, title) in zip(axes[0], fpanels):
        steps = {k for r in runs.values() for k, e in r["evals"].items() if _num(e.get(metric))}
        if len(steps) == 1:  # measured at one evaluation only (the knowledge questions): one point per arm
            by_arm(ax, runs, arms, seeds, metric, colors)
            ax.set_title(f"{title.split(' (')[0]} at step {steps.pop()}", fontsize=10)
        else:
            panel(ax, metric, title)
    if long_kl:
        ax = axes[0][-1]
        panel(ax, "kl", "long horizon: KL(base‖adapted)", long_runs, long_arms, list(long_seeds), dashed=True)
        ax.legend(fontsize=7)
    axes[0][0].legend(fontsize=6)
    fig.suptitle("Forgetting of the LLM over steps (mean ± std over seeds)")
    save(fig, "forgetting_over_steps.png")

    save(pareto_figure(plt, runs, arms, seeds, colors, pareto or []), "wer_vs_forgetting.png")
    return written


def by_arm(ax, runs, arms, seeds, metric: str, colors) -> None:
    """``metric`` at each arm's last evaluation: the seeds as dots, their mean ± std as a marker, arms along x."""
    import numpy as np

    shown = []
    for arm in arms:
        values = [v for (v,) in final_values(runs, arm, seeds, metric)]
        if not values:
            continue
        x = len(shown)
        shown.append(arm)
        ax.scatter([x] * len(values), values, s=14, alpha=0.45, color=colors[arm])
        ax.errorbar([x], [np.mean(values)], yerr=[np.std(values, ddof=1) if len(values) > 1 else 0], fmt="o",
                    ms=6, color=colors[arm], capsize=3)  # fmt: skip
    ax.axhline(0.0, color="black", linewidth=0.8, alpha=0.5)
    ax.set_xticks(range(len(shown)), shown, rotation=60, ha="right", fontsize=7)
    ax.grid(alpha=0.3, axis="y")


def final_values(runs, arm: str, seeds: list[int], *metrics: str) -> list[tuple[float, ...]]:
    """``metrics`` at each seed's last evaluation (the seeds that have them all)."""
    rows = []
    for s in seeds:
        run = runs.get((arm, s))
        if run is None or not run["evals"]:
            continue
        rec = run["evals"][max(run["evals"])]
        if all(_num(rec.get(m)) for m in metrics):
            rows.append(tuple(float(rec[m]) for m in metrics))
    return rows


def final_points(runs, arm: str, seeds: list[int]) -> list[tuple[float, float]]:
    """(KL, WER) at each seed's last evaluation."""
    return final_values(runs, arm, seeds, "kl", "wer_all")


def arm_colors(names: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """One colour per distinct name: tab20's ten dark shades first, then its light ones (a light shade next to
    its dark twin would read as the same arm, or as that arm's seed dots)."""
    from matplotlib import colormaps

    shades = [colormaps["tab20"](i) for i in [*range(0, 20, 2), *range(1, 20, 2)]]
    return {name: shades[i % 20] for i, name in enumerate(dict.fromkeys(names))}


def pareto_figure(plt, runs, arms, seeds, colors, front: list[str]) -> Any:
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.2, 4.6))
    means = {}
    for arm in arms:
        pts = final_points(runs, arm, seeds)
        if not pts:
            continue
        xs, ys = zip(*pts)
        means[arm] = (float(np.mean(xs)), float(np.mean(ys)))
        ax.scatter(xs, ys, s=14, alpha=0.45, color=colors[arm])
        ax.errorbar([means[arm][0]], [means[arm][1]], xerr=[np.std(xs, ddof=1) if len(xs) > 1 else 0],
                    yerr=[np.std(ys, ddof=1) if len(ys) > 1 else 0], fmt="o", ms=7, color=colors[arm],
                    label=arm + (" ★" if arm in front else ""), capsize=3,
                    markeredgecolor="black" if arm in front else None)  # fmt: skip
    on_front = [means[a] for a in front if a in means]
    if len(on_front) > 1:
        xs, ys = zip(*sorted(on_front))
        ax.step(xs, ys, where="post", color="black", linewidth=1, alpha=0.6, label="Pareto front")
    ax.set_xlabel("KL(base‖adapted) on held-out text, nats/token (less = less forgetting)")
    ax.set_ylabel("final dev WER, all (%)")
    ax.set_title("Final WER vs forgetting (dots: seeds; markers: mean ± std; ★ Pareto front)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)
    return fig

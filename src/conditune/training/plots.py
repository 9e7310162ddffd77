"""A run's training curve: loss over steps and dev WER at each evaluation, from its ``metrics.jsonl``."""

from __future__ import annotations

import math
from pathlib import Path

from conditune.io import read_jsonl, save_figure


def plot_training(metrics_file: str | Path, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_file)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], marker="." if len(train) < 30 else None)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (nats/token)")
    ax1.set_title("training loss")
    ax1.grid(alpha=0.3)
    for key, style in (("wer_all", "-o"), ("wer_en", "--s"), ("wer_de", "--^")):
        pts = [(r["step"], r[key]) for r in evals if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if pts:
            ax2.plot(*zip(*pts), style, label=key[4:], markersize=4)
    ax2.set_xlabel("step")
    ax2.set_ylabel("dev WER (%)")
    ax2.set_title("dev WER")
    ax2.grid(alpha=0.3)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend()
    save_figure(fig, path)

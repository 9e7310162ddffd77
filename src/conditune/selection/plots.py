"""The κ of the selected tensors against the frozen ones (histogram, log scale)."""

from __future__ import annotations

import math
from pathlib import Path

from conditune.io import save_figure


def plot_selection(records, selection, path: str | Path, *, title: str = "κ of the trained vs frozen tensors") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from conditune.selection.policies import parameter_name

    chosen = set(selection.names)
    sel, frozen = [], []
    for r in records:
        if r.status != "ok" or not r.kappa or not math.isfinite(r.kappa):
            continue
        (sel if parameter_name(r.name) in chosen else frozen).append(r.kappa)
    fig, ax = plt.subplots(figsize=(8, 4))
    values = sel + frozen
    if values:
        bins = np.logspace(math.log10(min(values)), math.log10(max(values)) + 1e-9, 40)
        ax.hist(frozen, bins=bins, alpha=0.6, label=f"frozen ({len(frozen)})", color="tab:gray")
        ax.hist(sel, bins=bins, alpha=0.8, label=f"selected ({len(sel)})", color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel("condition number κ = σ_max/σ_min (log scale)")
    ax.set_ylabel("tensors")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)

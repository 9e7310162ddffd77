"""Pictures of a scan: kappa per layer and tensor kind (heatmap) and the kappa histogram."""

from __future__ import annotations

import math
from pathlib import Path

from conditune.io import atomic_write
from conditune.scanning.records import OK, TensorRecord


def plot_scan(records: list[TensorRecord], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ok = [r for r in records if r.status == OK and r.kappa]
    layered = [r for r in ok if r.layer is not None]
    kinds = sorted({r.kind for r in layered})
    layers = sorted({r.layer for r in layered})
    grid = np.full((len(kinds), len(layers) or 1), np.nan)
    for r in layered:  # slices of a stacked tensor: show their median
        i, j = kinds.index(r.kind), layers.index(r.layer)
        grid[i, j] = (
            np.nanmedian([grid[i, j], math.log10(r.kappa)]) if not np.isnan(grid[i, j]) else math.log10(r.kappa)
        )

    fig, (ax_map, ax_hist) = plt.subplots(
        1, 2, figsize=(14, max(3.5, 0.45 * len(kinds) + 2)), gridspec_kw={"width_ratios": [3, 1.2]}
    )
    image = ax_map.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax_map.set_yticks(range(len(kinds)), kinds, fontsize=8)
    step = max(1, len(layers) // 16)
    ax_map.set_xticks(range(0, len(layers), step), [str(layers[k]) for k in range(0, len(layers), step)], fontsize=8)
    ax_map.set_xlabel("layer")
    ax_map.set_title("log10 κ per layer and tensor kind")
    fig.colorbar(image, ax=ax_map, label="log10 κ")

    values = np.log10([r.kappa for r in ok]) if ok else np.array([])
    ax_hist.hist(values, bins=min(50, max(5, len(values) // 4 or 5)), color="#4477aa")
    ax_hist.set_xlabel("log10 κ")
    ax_hist.set_ylabel("tensors")
    ax_hist.set_title(f"κ histogram ({len(ok)} tensors)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format=path.suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
    return path

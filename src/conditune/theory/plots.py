"""Figures of the theory report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from conditune.io import atomic_write
from conditune.theory.checks import Z_MAX, Check, kappa_gap_bound
from conditune.theory.scan_analysis import ScanTensor


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
    return path


def plot_entropy_formula(check: Check, path: Path) -> Path:
    """KL estimate minus eq. 6 per case, with the +-Z_MAX standard-error tolerance."""
    rows = check.rows
    x = np.arange(len(rows))
    diff = [row["diff_bits"] for row in rows]
    tol = [Z_MAX * row["kl_stderr"] for row in rows]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.axhline(0.0, color="grey", lw=1)
    ax.errorbar(x, diff, yerr=tol, fmt="o", capsize=4, label=f"KL - eq. 6, bars = tolerance (±{Z_MAX:g} s.e.)")
    ax.set_xticks(
        x, [f"{row['case']}\n{row['shape'][0]}x{row['shape'][1]}" for row in rows], rotation=60, ha="right", fontsize=7
    )
    ax.set_ylabel("h(Y): KL estimate - eq. 6 (bits)")
    ax.set_title("Output entropy: closed form vs sample estimate")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_scale_invariance(check: Check, path: Path) -> Path:
    """Shift of log2-volume under W -> cW against the line rank * log2|c|."""
    fig, ax = plt.subplots(figsize=(6, 4))
    markers = itertools.cycle("os^D")  # equal ranks overlap exactly: tell them apart by marker
    for i, (case, group) in enumerate(itertools.groupby(check.rows, key=lambda row: row["case"])):
        group = list(group)
        logc = np.array([np.log2(abs(row["c"])) for row in group])
        order = np.argsort(logc)
        ax.plot(logc[order], group[0]["rank"] * logc[order], color="lightgrey", lw=3, zorder=1)
        ax.scatter(
            logc,
            [row["log2_volume_shift"] for row in group],
            label=f"{case} (rank {group[0]['rank']})",
            zorder=2,
            marker=next(markers),
            facecolors="none",
            edgecolors=f"C{i}",
            s=40,
        )
    ax.set_xlabel("log2 |c|")
    ax.set_ylabel("log2vol(cW) - log2vol(W)  (bits)")
    ax.set_title("Scale: kappa unchanged, log-volume shifts by rank·log2|c| (grey)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_theorem1(check: Check, path: Path) -> Path:
    """Left: h - h(kappa = 1) of random spectra vs kappa. Right: KL estimates for 4x4 matrices."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r, pts in check.plot["points"].items():
        left.scatter(pts["kappa"], pts["gap"], s=3, alpha=0.35, label=f"r = {r}")
    kappa = np.logspace(0, 7, 200)
    left.plot(kappa, kappa_gap_bound(kappa), color="black", lw=1, label="bound -log2((1+κ²)/2κ), exact at r = 2")
    left.axhline(0.0, color="red", lw=1, ls="--", label="kappa = 1 entropy")
    left.set_xscale("log")
    left.set_yscale("symlog", linthresh=0.01)
    left.set_ylim(top=0.005)  # nothing lies above 0: that is the theorem
    left.set_xlabel("kappa")
    left.set_ylabel("h(Y) - h(kappa=1 matrix, same ||W||_F)  (bits)")
    left.set_title("Random spectra at fixed Frobenius norm")
    left.legend(fontsize=7, markerscale=3)

    points = check.data["kl_points"]
    kappas = [p["kappa"] for p in points]
    right.plot(kappas, [p["eq6_bits"] for p in points], "s-", color="black", label="eq. 6")
    right.errorbar(
        kappas,
        [p["kl_bits"] for p in points],
        yerr=[2 * p["kl_stderr"] for p in points],
        fmt="o",
        capsize=4,
        label="KL estimate ± 2 s.e.",
    )
    right.set_xscale("log")
    right.set_xticks(kappas, [f"{k:g}" for k in kappas])
    right.minorticks_off()
    right.set_xlabel("kappa (4x4, ||W||_F = 2)")
    right.set_ylabel("h(Y) (bits)")
    right.set_title("Sample estimate: entropy falls as kappa grows")
    right.legend(fontsize=8)
    return _save(fig, path)


def _kind_colours(tensors: list[ScanTensor]) -> dict[str, tuple]:
    kinds = sorted({t.kind for t in tensors})
    cmap = plt.get_cmap("tab10" if len(kinds) <= 10 else "tab20")
    return {kind: cmap(i % cmap.N) for i, kind in enumerate(kinds)}


def plot_scan_kappa_volume(tensors: list[ScanTensor], path: Path) -> Path:
    """kappa vs log2-volume at normalised Frobenius norm (= -deficit), one colour per tensor kind."""
    colours = _kind_colours(tensors)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, colour in colours.items():
        group = [t for t in tensors if t.kind == kind and t.deficit is not None]
        if group:
            ax.scatter(
                [t.kappa for t in group], [t.normalised_log2_volume for t in group], s=14, color=colour, label=kind
            )
    ax.set_xscale("log")
    ax.set_xlabel("kappa")
    ax.set_ylabel("log2-volume at ||W||_F² = rank  (= -deficit, bits)")
    ax.set_title("Scanned tensors: conditioning vs entropy deficit")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_scan_kappa_mp(tensors: list[ScanTensor], path: Path) -> Path:
    """kappa against the random-matrix kappa_mp of the same shape (log-log)."""
    colours = _kind_colours(tensors)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for kind, colour in colours.items():
        group = [t for t in tensors if t.kind == kind]
        ax.scatter([t.kappa_mp for t in group], [t.kappa for t in group], s=14, color=colour, label=kind)
    lo = min(min(t.kappa for t in tensors), min(t.kappa_mp for t in tensors))
    hi = max(max(t.kappa for t in tensors), max(t.kappa_mp for t in tensors))
    ax.plot([lo, hi], [lo, hi], color="grey", ls="--", lw=1, label="kappa = kappa_mp")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("kappa_mp (Gaussian matrix of the same shape)")
    ax.set_ylabel("kappa")
    ax.set_title("How much of kappa is shape")
    ax.legend(fontsize=7)
    return _save(fig, path)

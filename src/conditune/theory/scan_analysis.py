"""Section 5 of the theory report: Theorem 1 on a real model's scan, and how much of kappa is shape.

Input is the scanner's records (:mod:`conditune.scanning.records`). Besides PASS/FAIL checks this
measures the shape bias of kappa: a taller or wider matrix has a smaller kappa even when random
(kappa_mp), so ranking tensors by raw kappa partly ranks them by shape and kind.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from conditune.scanning.records import SKIPPED, TensorRecord, format_shape
from conditune.theory.checks import FAIL, NOT_APPLICABLE, PASS, Check
from conditune.theory.quantities import entropy_bits, entropy_deficit_bits, kappa_random

# Scanner spectra may come from float32 weights: each log2 sigma_i is then good to ~1e-7 bits, so a
# deficit down to -1e-5 bits per dimension is rounding, not a violation of Theorem 1.
DEFICIT_TOL_PER_DIM = 1e-5
# Derived columns are recomputed from the others in float64; CSV stores floats exactly (repr).
CONSISTENCY_REL_TOL = 1e-6


@dataclass(frozen=True)
class ScanTensor:
    """What the analysis needs from one record."""

    name: str
    kind: str
    shape: tuple[int, int]
    kappa: float
    kappa_mp: float
    rank: int | None
    deficit: float | None  # bits below the kappa = 1 matrix of the same norm; None without log2_volume

    @property
    def kappa_norm(self) -> float:
        return self.kappa / self.kappa_mp

    @property
    def normalised_log2_volume(self) -> float | None:
        """log2_volume after scaling W to ||W||_F^2 = rank: equal to -deficit."""
        return None if self.deficit is None else -self.deficit


def _positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def scan_tensors(records: list[TensorRecord]) -> list[ScanTensor]:
    """The analysable records: not skipped, with a finite positive kappa."""
    tensors = []
    for rec in records:
        if rec.status == SKIPPED or not _positive(rec.kappa) or len(rec.shape) < 2:
            continue
        shape = rec.matrix_shape
        deficit = None
        if rec.log2_volume is not None and _positive(rec.frobenius) and rec.rank:
            deficit = entropy_deficit_bits(rec.log2_volume, rec.frobenius, rec.rank)
        kappa_mp = rec.kappa_mp if _positive(rec.kappa_mp) else kappa_random(shape)
        tensors.append(
            ScanTensor(rec.name, rec.kind or "?", shape, float(rec.kappa), float(kappa_mp), rec.rank, deficit)
        )
    return tensors


def variance_share(values: np.ndarray, groups: list[Any]) -> float:
    """eta^2: the share of the variance of ``values`` explained by group means (one-way ANOVA R^2)."""
    values = np.asarray(values, dtype=np.float64)
    total = float(np.sum((values - values.mean()) ** 2))
    if total == 0.0:
        return 0.0
    by_group: dict[Any, list[float]] = defaultdict(list)
    for value, group in zip(values, groups):
        by_group[group].append(value)
    between = sum(len(v) * (np.mean(v) - values.mean()) ** 2 for v in by_group.values())
    return float(between / total)


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman rank correlation, or None when either side is constant (undefined)."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(stats.spearmanr(x, y).statistic)


def shape_bias(tensors: list[ScanTensor]) -> dict[str, Any]:
    """How much of the spread of log kappa is explained by shape (kappa_mp) and by tensor kind."""
    log_kappa = np.log([t.kappa for t in tensors])
    log_mp = np.log([t.kappa_mp for t in tensors])
    kinds = [t.kind for t in tensors]
    pearson = float(np.corrcoef(log_kappa, log_mp)[0, 1]) if np.ptp(log_kappa) and np.ptp(log_mp) else None
    return {
        "tensors": len(tensors),
        "kinds": len(set(kinds)),
        "shapes": len({t.shape for t in tensors}),
        "spearman_log_kappa_log_kappa_mp": spearman(log_kappa, log_mp),
        "r2_log_kappa_on_log_kappa_mp": None if pearson is None else pearson**2,
        "eta2_log_kappa_by_kind": variance_share(log_kappa, kinds),
        "eta2_log_kappa_by_shape": variance_share(log_kappa, [t.shape for t in tensors]),
        "eta2_log_kappa_norm_by_kind": variance_share(log_kappa - log_mp, kinds),
        "spearman_kappa_kappa_norm": spearman(log_kappa, log_kappa - log_mp),
    }


def kind_table(tensors: list[ScanTensor]) -> list[dict[str, Any]]:
    """Per tensor kind: count, shapes and median kappa, kappa_mp, kappa_norm, deficit."""
    by_kind: dict[str, list[ScanTensor]] = defaultdict(list)
    for t in tensors:
        by_kind[t.kind].append(t)
    rows = []
    for kind, group in sorted(by_kind.items()):
        deficits = [t.deficit for t in group if t.deficit is not None]
        per_dim = [t.deficit / t.rank for t in group if t.deficit is not None and t.rank]
        rows.append(
            {
                "kind": kind,
                "n": len(group),
                "shapes": sorted({format_shape(t.shape) for t in group}),
                "median_kappa": float(np.median([t.kappa for t in group])),
                "kappa_mp": float(np.median([t.kappa_mp for t in group])),
                "median_kappa_norm": float(np.median([t.kappa_norm for t in group])),
                "median_deficit_bits": float(np.median(deficits)) if deficits else None,
                "median_deficit_bits_per_dim": float(np.median(per_dim)) if per_dim else None,
            }
        )
    return rows


def check_scan_theorem1(tensors: list[ScanTensor]) -> Check:
    """Every real tensor sits at or below the entropy of the kappa = 1 matrix with its norm."""
    with_deficit = [t for t in tensors if t.deficit is not None]
    title = "Theorem 1 on the scanned tensors (deficit >= 0)"
    if not with_deficit:
        return Check("scan_theorem1", title, NOT_APPLICABLE, "no record has log2_volume, frobenius and rank")
    worst = min(with_deficit, key=lambda t: t.deficit / t.rank)
    ok = all(t.deficit >= -DEFICIT_TOL_PER_DIM * t.rank for t in with_deficit)
    summary = (
        f"{len(with_deficit)} tensors: min deficit {worst.deficit:.3g} bits ({worst.name}), "
        f"median {np.median([t.deficit for t in with_deficit]):.3g} bits; tolerance -{DEFICIT_TOL_PER_DIM:g} bits x rank"
    )
    return Check("scan_theorem1", title, PASS if ok else FAIL, summary)


def _consistency_rules(sigma_x: float) -> dict[str, Callable[[TensorRecord], tuple[float, float] | None]]:
    """Column name -> (stored value, value recomputed from other columns), or None when not computable."""

    def ratio(rec: TensorRecord) -> tuple[float, float] | None:
        if rec.kappa is None or not _positive(rec.sigma_max) or not _positive(rec.sigma_min):
            return None
        return rec.kappa, rec.sigma_max / rec.sigma_min

    def eq6(rec: TensorRecord) -> tuple[float, float] | None:
        if rec.entropy_bits is None or rec.log2_volume is None or not rec.rank:
            return None
        return rec.entropy_bits, entropy_bits(rec.log2_volume, rec.rank, sigma_x)

    def mp(rec: TensorRecord) -> tuple[float, float] | None:
        return None if rec.kappa_mp is None or len(rec.shape) < 2 else (rec.kappa_mp, kappa_random(rec.matrix_shape))

    def norm(rec: TensorRecord) -> tuple[float, float] | None:
        if rec.kappa_norm is None or rec.kappa is None or not _positive(rec.kappa_mp):
            return None
        return rec.kappa_norm, rec.kappa / rec.kappa_mp

    return {
        "kappa = sigma_max / sigma_min": ratio,
        "entropy_bits = eq. 6": eq6,
        "kappa_mp = kappa_random(shape)": mp,
        "kappa_norm = kappa / kappa_mp": norm,
    }


def check_scan_consistency(records: list[TensorRecord], sigma_x: float = 1.0) -> Check:
    """The scanner's derived columns agree with the formulas of conditune.theory."""
    rows = []
    for rule, pair_of in _consistency_rules(sigma_x).items():
        pairs = [p for p in (pair_of(rec) for rec in records if rec.status != SKIPPED) if p is not None]
        errors = [abs(stored - expected) / max(1.0, abs(expected)) for stored, expected in pairs]
        rows.append({"rule": rule, "records": len(pairs), "max_rel_error": max(errors) if errors else None})
    checked = [row for row in rows if row["records"]]
    title = "Scan columns agree with the formulas"
    if not checked:
        return Check("scan_consistency", title, NOT_APPLICABLE, "no derived columns to compare", rows)
    ok = all(row["max_rel_error"] <= CONSISTENCY_REL_TOL for row in checked)
    summary = "; ".join(
        f"{row['rule']}: max rel. error {row['max_rel_error']:.1e} over {row['records']}" for row in checked
    )
    return Check(
        "scan_consistency", title, PASS if ok else FAIL, f"{summary} (tolerance {CONSISTENCY_REL_TOL:g})", rows
    )

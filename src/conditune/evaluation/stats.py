"""Bootstrap intervals for the metrics conditune reports: one WER, and a paired difference between two arms.

Corpus metrics are ratios (WER = errors / reference words over the utterances; perplexity is the exponent
of a token-weighted mean), so a resample recomputes the ratio from the resampled numerators and
denominators rather than averaging per-item ratios. Intervals are percentile intervals of ``n`` resamples
drawn by a seeded generator: the same inputs and seed give the same interval.

* :func:`bootstrap_ratio` — 95 % interval of sum(num) / sum(den) over items resampled with replacement
  (a WER's interval from per-utterance error and word counts).
* :func:`paired_bootstrap` — 95 % interval of the difference stat(A) − stat(B) when A and B were measured on
  the same seeds and the same items: each resample draws seeds with replacement and, within each drawn
  seed, items with replacement, and applies the *same* draw to both arms (the pairing removes the
  variation that both share). A difference whose interval contains 0 is "within noise".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    value: float  # the statistic on the data as measured
    low: float
    high: float

    @property
    def contains_zero(self) -> bool:
        return self.low <= 0.0 <= self.high

    def verdict(self) -> str:
        """``within noise`` when 0 is inside the interval, else which way the difference goes."""
        if self.contains_zero:
            return "within noise"
        return "higher" if self.low > 0 else "lower"

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def _ratio(num: np.ndarray, den: np.ndarray) -> float:
    total = float(den.sum())
    return float(num.sum()) / total if total else float("nan")


def bootstrap_ratio(
    numerators: Sequence[float],
    denominators: Sequence[float] | None = None,
    *,
    scale: float = 1.0,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """Interval of ``scale * sum(num) / sum(den)`` over items resampled with replacement (``den`` None: a mean)."""
    num = np.asarray(numerators, dtype=np.float64)
    den = np.ones_like(num) if denominators is None else np.asarray(denominators, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1:
        raise ValueError("numerators and denominators must be flat and of the same length")
    value = scale * _ratio(num, den)
    if num.size == 0:
        return Interval(value, float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, num.size, size=(resamples, num.size))
    totals = den[draws].sum(axis=1)
    stats = scale * np.divide(num[draws].sum(axis=1), totals, out=np.full(resamples, np.nan), where=totals > 0)
    low, high = np.nanquantile(stats, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(value, float(low), float(high))


def paired_bootstrap(
    a_num: np.ndarray,
    b_num: np.ndarray,
    a_den: np.ndarray | None = None,
    b_den: np.ndarray | None = None,
    *,
    scale: float = 1.0,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """Interval of ``stat(A) - stat(B)``, ``stat = scale * sum(num) / sum(den)``, for arrays ``[seeds, items]``
    measured on the same seeds and items; seeds and the items within each seed are resampled, jointly for A
    and B. One seed: only items are resampled."""
    arrays = [np.asarray(x, dtype=np.float64) for x in (a_num, b_num)]
    dens = [np.ones_like(arrays[0]) if d is None else np.asarray(d, dtype=np.float64) for d in (a_den, b_den)]
    if any(x.shape != arrays[0].shape for x in arrays + dens) or arrays[0].ndim != 2:
        raise ValueError("all arrays must be [seeds, items] of the same shape")
    seeds, items = arrays[0].shape
    value = scale * (_ratio(arrays[0], dens[0]) - _ratio(arrays[1], dens[1]))
    if seeds == 0 or items == 0:
        return Interval(value, float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    seed_draw = rng.integers(0, seeds, size=(resamples, seeds)) if seeds > 1 else np.zeros((resamples, 1), int)
    item_draw = rng.integers(0, items, size=(resamples, seeds, items))
    rows = seed_draw[:, :, None]
    picked = [x[rows, item_draw].sum(axis=(1, 2)) for x in (*arrays, *dens)]
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = scale * (picked[0] / picked[2] - picked[1] / picked[3])
    low, high = np.nanquantile(stats, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(value, float(low), float(high))

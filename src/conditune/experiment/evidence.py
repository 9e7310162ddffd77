"""What the runs show beyond seed noise: paired bootstrap intervals against ``lowest-kappa``, the long-horizon
verdict (the paper's Figure 1) and the Pareto front of WER against forgetting.

Every comparison is paired: two arms of the same seed saw the same batches and were evaluated on the same items,
so each bootstrap resample draws seeds with replacement and, within each drawn seed, items with replacement, and
applies the same draw to both arms (:func:`conditune.evaluation.stats.paired_bootstrap`). Item metrics are ratios
recomputed from resampled sums:

=============  ================================================  ===================  ============
metric         numerator / denominator per item                  unit of Δ            lower is
=============  ================================================  ===================  ============
``wer``        word errors / reference words (dev utterance)     percentage points    better
``wer_<lang>`` the same, one language's utterances               percentage points    better
``kl``         KL sum / tokens (held-out sentence, all langs)    nats per token       better
``nll``        adapted NLL / tokens (held-out sentence)          nats per token       better
``knowledge``  adapted model correct (question)                  percentage points    worse
``agreement``  greedy agreement with the base (prompt)           share                worse
=============  ================================================  ===================  ============

``nll`` is the adapted model's log-perplexity pooled over languages: its difference between two arms is the log of
their perplexity ratio (the base is the same for both).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

REFERENCE = "lowest-kappa"
# metric -> (title, scale, lower is better)
ITEM_METRICS: dict[str, tuple[str, float, bool]] = {
    "wer": ("WER (pp)", 100.0, True),
    "kl": ("KL(base‖adapted) (nats/token)", 1.0, True),
    "nll": ("adapted NLL (nats/token)", 1.0, True),
    "knowledge": ("knowledge accuracy (pp)", 100.0, False),
    "agreement": ("greedy agreement", 1.0, False),
}


def metric_items(record: Mapping[str, Any], metric: str) -> dict[Any, tuple[float, float]]:
    """item key -> (numerator, denominator) of ``metric`` in one evaluation's per-item record."""
    if metric == "wer" or metric.startswith("wer_"):
        lang = metric[4:] if metric.startswith("wer_") else None
        return {audio: (float(e), float(w)) for audio, language, e, w in record.get("dev", [])
                if lang is None or str(language) == lang}  # fmt: skip
    if metric in ("kl", "nll"):
        column = 2 if metric == "kl" else 1
        return {(lang, i): (float(row[column]), float(row[3])) for lang, rows in sorted(record.get("text", {}).items())
                for i, row in enumerate(rows)}  # fmt: skip
    if metric == "knowledge":
        return {i: (float(adapted), 1.0) for i, (_, adapted) in enumerate(record.get("knowledge") or [])}
    if metric == "agreement":
        return {(lang, i): (float(row[0]), 1.0) for lang, rows in sorted(record.get("agreement", {}).items())
                for i, row in enumerate(rows)}  # fmt: skip
    raise ValueError(f"unknown item metric {metric!r}")


def paired_arrays(
    a: Mapping[int, Mapping[Any, tuple[float, float]]], b: Mapping[int, Mapping[Any, tuple[float, float]]]
) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeds both arms have, and their [seeds, items] numerators and denominators over the items every one of
    those seeds has in both arms (in a fixed key order)."""
    seeds = sorted(set(a) & set(b))
    keys = None
    for s in seeds:
        common = set(a[s]) & set(b[s])
        keys = common if keys is None else keys & common
    keys = sorted(keys or (), key=repr)

    def arrays(side):
        num = np.array([[side[s][k][0] for k in keys] for s in seeds], dtype=np.float64).reshape(len(seeds), len(keys))
        den = np.array([[side[s][k][1] for k in keys] for s in seeds], dtype=np.float64).reshape(len(seeds), len(keys))
        return num, den

    (an, ad), (bn, bd) = arrays(a), arrays(b)
    return seeds, an, bn, ad, bd


@dataclass
class Comparison:
    arm: str
    metric: str
    seeds: int
    items: int
    value: float  # stat(arm) - stat(reference), in the metric's unit
    low: float
    high: float
    verdict: str  # within noise | better | worse | no data


def compare(
    items_by_arm: Mapping[str, Mapping[int, Mapping[str, Any]]],
    metric: str,
    arm: str,
    reference: str = REFERENCE,
    *,
    seed: int = 0,
) -> Comparison:
    """``arm`` against ``reference`` on ``metric`` at each run's final evaluation: Δ and its 95 % interval."""
    from conditune.evaluation.stats import paired_bootstrap

    base = metric.split("_")[0] if metric.startswith("wer_") else metric
    _, scale, lower_better = ITEM_METRICS[base]
    a = {s: metric_items(r, metric) for s, r in items_by_arm.get(arm, {}).items()}
    b = {s: metric_items(r, metric) for s, r in items_by_arm.get(reference, {}).items()}
    seeds, an, bn, ad, bd = paired_arrays(a, b)
    if not seeds or an.shape[1] == 0 or not (ad.sum() > 0 and bd.sum() > 0):
        return Comparison(arm, metric, len(seeds), 0, math.nan, math.nan, math.nan, "no data")
    interval = paired_bootstrap(an, bn, ad, bd, scale=scale, seed=seed)
    if interval.contains_zero:
        verdict = "within noise"
    else:
        verdict = "better" if (interval.high < 0) == lower_better else "worse"
    return Comparison(arm, metric, len(seeds), an.shape[1], interval.value, interval.low, interval.high, verdict)


# ---------------------------------------------------------------------------------------------- long horizon


@dataclass
class Curve:
    """The mean over seeds of one arm's WER at each evaluation step, and where it is lowest."""

    arm: str
    steps: list[int]
    wer: list[float]
    seeds: int

    @property
    def best_index(self) -> int:
        """The lowest evaluation (the latest of equal ones)."""
        values = np.asarray(self.wer, dtype=np.float64)
        return int(len(values) - 1 - np.nanargmin(values[::-1]))

    @property
    def best_step(self) -> int:
        return self.steps[self.best_index]

    @property
    def best(self) -> float:
        return self.wer[self.best_index]

    @property
    def final(self) -> float:
        return self.wer[-1]


def curve(evals_by_seed: Mapping[int, Mapping[int, Mapping[str, Any]]], arm: str, metric: str = "wer_all") -> Curve:
    """Mean ``metric`` over the seeds at the steps every seed evaluated."""
    steps = None
    for evals in evals_by_seed.values():
        have = {s for s, r in evals.items() if isinstance(r.get(metric), (int, float))}
        steps = have if steps is None else steps & have
    steps = sorted(steps or ())
    wer = [float(np.mean([evals[s][metric] for evals in evals_by_seed.values()])) for s in steps]
    return Curve(arm, steps, wer, len(evals_by_seed))


@dataclass
class TurnVerdict:
    arm: str
    curve: Curve
    rise: float  # final − best WER, percentage points (0 when the last evaluation is the best)
    low: float  # 95 % interval of that rise (paired over seeds × utterances), nan without per-item data
    high: float

    @property
    def turns_upward(self) -> bool:
        """The best evaluation is an early one and the final WER is above it beyond noise (above it at all when
        there are no per-item results to tell noise by)."""
        early = bool(self.curve.steps) and self.curve.best_index < len(self.curve.steps) - 1
        return early and (self.rise > 0 if math.isnan(self.low) else self.low > 0)

    @property
    def keeps_falling(self) -> bool:
        """No rise beyond noise after the best evaluation, and the final WER below the first."""
        return bool(self.curve.steps) and not self.turns_upward and self.curve.final < self.curve.wer[0]


def turn_verdict(
    arm: str, evals_by_seed: Mapping[int, Mapping[int, Mapping[str, Any]]], items_by_seed: Mapping[int, Mapping]
) -> TurnVerdict:
    """Does ``arm``'s WER rise from its best evaluation to its last? The interval pairs the final and the best
    evaluation over the same seeds and utterances (the best step is picked from the same data, which favours a
    rise: read a narrow one with care)."""
    from conditune.evaluation.stats import paired_bootstrap

    c = curve(evals_by_seed, arm)
    if not c.steps:
        return TurnVerdict(arm, c, math.nan, math.nan, math.nan)
    rise = c.final - c.best
    final_step, best_step = c.steps[-1], c.best_step
    if best_step == final_step:
        return TurnVerdict(arm, c, 0.0, 0.0, 0.0)
    a = {s: metric_items(r[final_step], "wer") for s, r in items_by_seed.items() if final_step in r and best_step in r}
    b = {s: metric_items(r[best_step], "wer") for s, r in items_by_seed.items() if final_step in r and best_step in r}
    seeds, an, bn, ad, bd = paired_arrays(a, b)
    if not seeds or an.shape[1] == 0:
        return TurnVerdict(arm, c, rise, math.nan, math.nan)
    interval = paired_bootstrap(an, bn, ad, bd, scale=100.0)
    return TurnVerdict(arm, c, rise, interval.low, interval.high)


# ---------------------------------------------------------------------------------------------- Pareto


def pareto_front(points: Mapping[str, tuple[float, float]]) -> list[str]:
    """The arms no other arm beats on both coordinates (lower is better on each), sorted by the first."""
    front = []
    for name, (x, y) in points.items():
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        dominated = any(
            (ox <= x and oy <= y) and (ox < x or oy < y)
            for other, (ox, oy) in points.items()
            if other != name and math.isfinite(ox) and math.isfinite(oy)
        )
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: points[n])


def describe_turn(verdicts: Sequence[TurnVerdict]) -> list[str]:
    """One sentence per arm with the numbers it rests on."""
    lines = []
    for v in verdicts:
        c = v.curve
        if not c.steps:
            lines.append(f"- {v.arm}: no evaluation yet")
            continue
        span = (
            f"{c.seeds} seed{'s' if c.seeds != 1 else ''}, {len(c.steps)} evaluations, steps {c.steps[0]}–{c.steps[-1]}"
        )
        if c.best_step == c.steps[-1]:
            outcome = "keeps falling" if v.keeps_falling else "does not fall"
            lines.append(f"- {v.arm} ({span}): WER {c.wer[0]:.2f} % → {c.final:.2f} %, lowest at the last "
                         f"evaluation: {outcome}")  # fmt: skip
            continue
        interval = "" if math.isnan(v.low) else f" (95 % interval of the rise [{v.low:+.2f}, {v.high:+.2f}] pp)"
        noise = "" if v.turns_upward else ", a rise within noise"
        # after an earlier best, a rise within noise shows no upturn; "keeps falling" would overstate it
        outcome = "turns upward" if v.turns_upward else "no upturn shown" if v.keeps_falling else "does not fall"
        lines.append(f"- {v.arm} ({span}): WER {c.wer[0]:.2f} % at first, best {c.best:.2f} % at step {c.best_step}, "
                     f"final {c.final:.2f} % ({v.rise:+.2f} pp){interval}{noise}: {outcome}")  # fmt: skip
    return lines

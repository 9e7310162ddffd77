"""Numerical checks of the theory (docs/theory.md), each ending in PASS or FAIL with its numbers.

Each ``check_*`` function takes a numpy Generator, computes, and returns a :class:`Check`; rendering
(markdown, JSON, plots) lives in :mod:`conditune.theory.report`. Tolerances are stated where they
are used, with the reason for their size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from conditune.theory.analysis import matrix_with_spectrum, unit_report
from conditune.theory.estimators import estimate_output_entropy
from conditune.theory.quantities import (
    entropy_bits,
    kappa_random,
    log2_volume,
    max_log2_volume_at_frobenius,
)

PASS, FAIL, NOT_APPLICABLE = "PASS", "FAIL", "n/a"

# |KL - eq. 6| <= Z_MAX standard errors. The error of a mean of 10 repeats (minus a calibration
# mean of 10) is t-distributed with ~18 degrees of freedom: |t| > 4 has probability ~0.1%.
Z_MAX = 4.0
# Identities that hold exactly in real arithmetic are checked to this (float64 SVD and log sums).
EXACT_TOL = 1e-8


@dataclass
class Check:
    """One verified claim: PASS/FAIL, a one-line summary with the numbers, and a table of rows."""

    key: str
    title: str
    status: str
    summary: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # extra numbers, written to theory.json
    plot: dict[str, Any] = field(default_factory=dict)  # bulk arrays for the figure only


def _status(ok: bool) -> str:
    return PASS if ok else FAIL


@dataclass(frozen=True)
class KLSettings:
    """Sample sizes of the KL estimates: ~1-2 s per 8-dimensional case on one core."""

    n_samples: int = 4000
    k: int = 3
    repeats: int = 10


# ----------------------------------------------------------------------------------------------
# 1. eq. 6 against the KL estimator

# (label, shape, singular values or None for a Gaussian W, sigma_x). Image dimensions stay <= 8 and
# anisotropy within the KL estimator's reliable range (see conditune.theory.estimators).
ENTROPY_CASES: list[tuple[str, tuple[int, int], list[float] | None, float]] = [
    ("m<n, single output", (1, 5), [2.0], 1.0),
    ("m<n, Gaussian W", (4, 16), None, 1.0),
    ("m<n, kappa 4", (3, 8), [2.0, 1.0, 0.5], 1.0),
    ("m=n, kappa 10", (4, 4), list(2.0 * np.logspace(0, -1, 4)), 1.0),
    ("m=n, sigma_x = 3", (2, 2), [5.0, 1.0], 3.0),
    ("m=n, kappa 2", (6, 6), list(np.linspace(1.0, 2.0, 6)), 1.0),
    ("m=n, orthogonal x 0.5 (kappa 1)", (8, 8), [0.5] * 8, 1.0),
    ("m>n, degenerate", (8, 3), [3.0, 1.0, 0.3], 1.0),
    ("m>n, degenerate, kappa 2", (12, 5), list(np.linspace(1.0, 2.0, 5)), 1.0),
    ("rank-deficient, rank 3 of 6", (6, 6), [1.0, 0.5, 0.25, 0.0, 0.0, 0.0], 1.0),
]


def _case_matrix(shape: tuple[int, int], spectrum: list[float] | None, rng: np.random.Generator) -> np.ndarray:
    if spectrum is None:
        return rng.standard_normal(shape) / math.sqrt(shape[1])
    return matrix_with_spectrum(spectrum, shape, rng)


def compare_with_kl(weight: np.ndarray, sigma_x: float, rng: np.random.Generator, kl: KLSettings) -> dict[str, Any]:
    """eq. 6 and the KL estimate of h(Y) for one matrix, with the z-score of their difference."""
    report = unit_report(weight, sigma_x=sigma_x)
    estimate = estimate_output_entropy(weight, sigma_x, n_samples=kl.n_samples, k=kl.k, repeats=kl.repeats, rng=rng)
    diff = estimate.bits - report.entropy_bits
    return {
        "shape": list(report.shape),
        "image_dim": report.image_dim,
        "degenerate": report.degenerate,
        "kappa": report.kappa,
        "eq6_bits": report.entropy_bits,
        "kl_bits": estimate.bits,
        "kl_stderr": estimate.stderr,
        "kl_raw_bits": estimate.raw_bits,
        "diff_bits": diff,
        "z": diff / estimate.stderr,
    }


def check_entropy_formula(rng: np.random.Generator, kl: KLSettings = KLSettings()) -> Check:
    rows = []
    for label, shape, spectrum, sigma_x in ENTROPY_CASES:
        weight = _case_matrix(shape, spectrum, rng)
        rows.append({"case": label, "sigma_x": sigma_x, **compare_with_kl(weight, sigma_x, rng, kl)})
    worst = max(rows, key=lambda row: abs(row["z"]))
    ok = abs(worst["z"]) <= Z_MAX
    summary = (
        f"{len(rows)} cases (image dim 1-8, incl. degenerate m>n and rank-deficient): "
        f"max |KL - eq.6| = {max(abs(r['diff_bits']) for r in rows):.3f} bits, "
        f"max |z| = {abs(worst['z']):.2f} ({worst['case']}); tolerance |z| <= {Z_MAX:g}"
    )
    data = {"n_samples": kl.n_samples, "k": kl.k, "repeats": kl.repeats, "z_max": Z_MAX}
    return Check("entropy_formula", "eq. 6 vs Kozachenko-Leonenko estimate", _status(ok), summary, rows, data)


# ----------------------------------------------------------------------------------------------
# 2. Scale invariance

SCALES = (-3.0, 1e-3, 0.5, 7.0, 1e4)
SCALE_CASES: list[tuple[str, tuple[int, int], list[float] | None]] = [
    ("m<n, Gaussian W", (6, 10), None),
    ("m>n, Gaussian W (degenerate)", (10, 6), None),
    ("rank-deficient, rank 5 of 8", (8, 8), [4.0, 2.0, 1.0, 0.5, 0.25, 0.0, 0.0, 0.0]),
    ("ill-conditioned, kappa 1e4", (32, 64), list(np.logspace(0, -4, 32))),
]
KL_SCALES = (0.25, 4.0)


def check_scale_invariance(rng: np.random.Generator, kl: KLSettings = KLSettings()) -> Check:
    rows = []
    for label, shape, spectrum in SCALE_CASES:
        weight = _case_matrix(shape, spectrum, rng)
        base = unit_report(weight)
        for c in SCALES:
            scaled = unit_report(c * weight)
            expected_shift = base.rank * math.log2(abs(c))
            rows.append(
                {
                    "case": label,
                    "c": c,
                    "rank": base.rank,
                    "kappa": base.kappa,
                    "kappa_rel_change": abs(scaled.kappa / base.kappa - 1.0),
                    "log2_volume_shift": scaled.log2_volume - base.log2_volume,
                    "expected_shift": expected_shift,
                    "shift_error": abs(scaled.log2_volume - base.log2_volume - expected_shift),
                    "deficit_change": abs(scaled.entropy_deficit_bits - base.entropy_deficit_bits),
                    "rank_kept": scaled.rank == base.rank,
                }
            )
    worst_kappa = max(r["kappa_rel_change"] for r in rows)
    worst_shift = max(r["shift_error"] for r in rows)
    worst_deficit = max(r["deficit_change"] for r in rows)
    kl_rows = _kl_scale_rows(rng, kl)
    worst_kl_z = max(abs(r["z"]) for r in kl_rows)
    ok = (
        max(worst_kappa, worst_shift, worst_deficit) <= EXACT_TOL
        and all(r["rank_kept"] for r in rows)
        and worst_kl_z <= Z_MAX
    )
    summary = (
        f"{len(SCALE_CASES)} matrices x c in {list(SCALES)}: max |kappa(cW)/kappa(W) - 1| = {worst_kappa:.1e}, "
        f"max |shift - rank*log2|c|| = {worst_shift:.1e} bits, max deficit change = {worst_deficit:.1e} "
        f"(tolerance {EXACT_TOL:g}); KL sees the shift too: max |z| = {worst_kl_z:.2f}"
    )
    return Check("scale_invariance", "Scale invariance", _status(ok), summary, rows, {"kl_rows": kl_rows})


def _kl_scale_rows(rng: np.random.Generator, kl: KLSettings) -> list[dict[str, Any]]:
    """KL estimates of h(cWX) - h(WX) for a 3x3 W, against rank * log2|c| (no closed form used)."""
    weight = matrix_with_spectrum([2.0, 1.0, 0.5], (3, 3), rng)
    base = estimate_output_entropy(weight, n_samples=kl.n_samples, k=kl.k, repeats=kl.repeats, rng=rng)
    rows = []
    for c in KL_SCALES:
        scaled = estimate_output_entropy(c * weight, n_samples=kl.n_samples, k=kl.k, repeats=kl.repeats, rng=rng)
        shift = scaled.bits - base.bits
        expected = 3 * math.log2(abs(c))
        # The calibration bias is the same in both and cancels; combining both stderrs is conservative.
        stderr = math.hypot(scaled.stderr, base.stderr)
        rows.append(
            {"c": c, "kl_shift": shift, "expected_shift": expected, "stderr": stderr, "z": (shift - expected) / stderr}
        )
    return rows


# ----------------------------------------------------------------------------------------------
# 3. Theorem 1: at fixed Frobenius norm, entropy is maximal exactly at kappa = 1

THEOREM1_DIMS = (2, 3, 8, 64)
SPECTRA_PER_DIM = 2000
KL_KAPPAS = (1.0, 2.0, 4.0, 8.0)


def random_spectrum(rng: np.random.Generator, r: int) -> np.ndarray:
    """Positive singular values of three styles, from almost isotropic to very spread out."""
    style = rng.integers(3)
    if style == 0:  # log-normal with spread from 1e-6 (kappa ~ 1 + 1e-6) to ~3 (kappa ~ 1e4)
        return np.exp(10.0 ** rng.uniform(-6, 0.5) * rng.standard_normal(r))
    if style == 1:
        return rng.uniform(1e-3, 1.0, r)
    return np.linalg.svd(rng.standard_normal((r, r + int(rng.integers(0, r + 1)))), compute_uv=False)


def entropy_gap_at_frobenius(s: np.ndarray, frobenius: float, sigma_x: float = 1.0) -> float:
    """h(Y) - h(kappa = 1 unit) after rescaling spectrum ``s`` to the given Frobenius norm."""
    s = s * (frobenius / math.sqrt(np.sum(s**2)))
    r = s.size
    return entropy_bits(log2_volume(s), r, sigma_x) - entropy_bits(
        max_log2_volume_at_frobenius(frobenius, r), r, sigma_x
    )


def kappa_gap_bound(kappa: np.ndarray) -> np.ndarray:
    """-log2((1 + kappa^2) / (2 kappa)): the largest h - h(kappa = 1) any rank allows at this kappa.

    Exact for r = 2. For r > 2 the interior singular values can only add deficit; the bound is
    reached when their squares all equal (sigma_max^2 + sigma_min^2) / 2 (docs/theory.md).
    """
    return -np.log2((1.0 + kappa**2) / (2.0 * kappa))


def check_theorem1(rng: np.random.Generator, kl: KLSettings = KLSettings()) -> Check:
    rows, points = [], {}
    worst_gap = -math.inf
    for r in THEOREM1_DIMS:
        spectra = [random_spectrum(rng, r) for _ in range(SPECTRA_PER_DIM)]
        frobenius = 10.0 ** rng.uniform(-2, 2, SPECTRA_PER_DIM)  # any norm: the gap is scale-free
        gaps = np.array([entropy_gap_at_frobenius(s, f) for s, f in zip(spectra, frobenius)])
        kappas = np.array([s.max() / s.min() for s in spectra])
        isotropic_gap = entropy_gap_at_frobenius(np.full(r, 0.37), 5.0)
        bound = kappa_gap_bound(kappas)
        rows.append(
            {
                "r": r,
                "spectra": SPECTRA_PER_DIM,
                "kappa_range": [float(kappas.min()), float(kappas.max())],
                "max_gap_bits": float(gaps.max()),
                "above_kappa1": int(np.count_nonzero(gaps > EXACT_TOL)),
                "above_kappa_bound": int(np.count_nonzero(gaps > bound + EXACT_TOL)),
                "kappa1_gap_bits": isotropic_gap,
                "max_distance_to_bound_bits": float(np.max(bound - gaps)),
            }
        )
        points[r] = {"kappa": kappas.tolist(), "gap": gaps.tolist()}
        worst_gap = max(worst_gap, float(gaps.max()))
    kl_points = _kl_theorem1_points(rng, kl)
    r2_error = rows[0]["max_distance_to_bound_bits"]  # r = 2: the bound is the exact value
    ok = (
        all(row["above_kappa1"] == 0 and row["above_kappa_bound"] == 0 for row in rows)
        and all(abs(row["kappa1_gap_bits"]) <= EXACT_TOL for row in rows)
        and r2_error <= EXACT_TOL
        and max(abs(p["z"]) for p in kl_points) <= Z_MAX
    )
    total = SPECTRA_PER_DIM * len(THEOREM1_DIMS)
    summary = (
        f"{total} random spectra, r in {list(THEOREM1_DIMS)}, kappa up to {max(max(r['kappa_range']) for r in rows):.1e}: "
        f"none above the kappa=1 entropy (max h - h(kappa=1) = {worst_gap:.2e} bits) nor above the kappa bound "
        f"-log2((1+kappa^2)/(2 kappa)); kappa=1 gap {max(abs(r['kappa1_gap_bits']) for r in rows):.0e}, r=2 exact to "
        f"{r2_error:.0e}; KL estimates agree, max |z| = {max(abs(p['z']) for p in kl_points):.2f}"
    )
    title = "Theorem 1: kappa = 1 maximises entropy at fixed Frobenius norm"
    return Check("theorem1", title, _status(ok), summary, rows, {"kl_points": kl_points}, {"points": points})


def _kl_theorem1_points(rng: np.random.Generator, kl: KLSettings) -> list[dict[str, Any]]:
    """KL estimates for 4x4 matrices of Frobenius norm 2 (sigma = 1 at kappa = 1) and growing kappa."""
    points = []
    for kappa in KL_KAPPAS:
        s = np.logspace(0, -math.log10(kappa), 4)
        weight = matrix_with_spectrum(s * 2.0 / np.linalg.norm(s), (4, 4), rng)
        points.append(compare_with_kl(weight, 1.0, rng, kl))
    return points


# ----------------------------------------------------------------------------------------------
# 4. kappa_mp against a Monte Carlo of Gaussian matrices

KAPPA_MP_SHAPES = ((32, 32), (64, 64), (32, 128), (128, 32), (64, 96))
KAPPA_MP_DRAWS = 100
# kappa_mp uses the asymptotic spectrum edges; at min(m, n) = 32 their finite-size shift is
# ~ 32^(-2/3) ~ 10%, so we allow 15% (0.15 in log kappa) on top of 3 Monte Carlo standard errors.
KAPPA_MP_LOG_TOL = 0.15


def monte_carlo_log_kappa(shape: tuple[int, int], draws: int, rng: np.random.Generator) -> tuple[float, float]:
    """(mean, standard error) of log kappa over ``draws`` matrices with i.i.d. N(0, 1) entries."""
    logs = []
    for _ in range(draws):
        s = np.linalg.svd(rng.standard_normal(shape), compute_uv=False)
        logs.append(math.log(s[0] / s[-1]))
    arr = np.asarray(logs)
    return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(draws))


def check_kappa_random(rng: np.random.Generator) -> Check:
    rows = []
    for shape in KAPPA_MP_SHAPES:
        mean_log, stderr = monte_carlo_log_kappa(shape, KAPPA_MP_DRAWS, rng)
        predicted = kappa_random(shape)
        error = abs(mean_log - math.log(predicted))
        rows.append(
            {
                "shape": list(shape),
                "kappa_mp": predicted,
                "kappa_mc_geomean": math.exp(mean_log),
                "log_error": error,
                "tolerance": KAPPA_MP_LOG_TOL + 3 * stderr,
            }
        )
    ok = all(row["log_error"] <= row["tolerance"] for row in rows)
    worst = max(rows, key=lambda row: row["log_error"] / row["tolerance"])
    summary = (
        f"{len(rows)} shapes x {KAPPA_MP_DRAWS} Gaussian matrices: |log(kappa_MC / kappa_mp)| <= "
        f"{max(row['log_error'] for row in rows):.2f}; closest to its tolerance: "
        f"{worst['shape'][0]}x{worst['shape'][1]} at {worst['log_error']:.3f} <= {worst['tolerance']:.3f} "
        f"({KAPPA_MP_LOG_TOL:g} + 3 MC std errors)"
    )
    return Check("kappa_random", "kappa_mp vs Monte Carlo", _status(ok), summary, rows)

"""Extreme singular triplets: Lanczos on a cheap operator, then refinement against T itself in float64.

1. :func:`lanczos_block` runs ARPACK (implicitly restarted Lanczos) on an operator made from a
   factorisation, possibly in float32 and so perturbed: T^T T for sigma_max, (T^T T)^-1 for
   sigma_min. It returns a few Ritz vectors at each end.
2. :func:`refine` scores them against T in float64: Rayleigh-Ritz by a thin SVD of T Q (which does
   not square kappa), and for each extreme Ritz triplet (sigma, u, v) the residual
   r = T^T u - sigma v. theta = sigma^2 is a Rayleigh quotient of T^T T with residual sigma * r, so an
   eigenvalue lies within ||r|| / sigma relative of theta (Weyl), and within (||r|| / sigma)^2 / gap
   when the rest of the spectrum is at least ``gap`` (relative) away (Kato-Temple; the gap comes
   from the neighbouring Ritz value less its own residual, so that part is an estimate). The
   relative error on sigma is half that on theta.
3. While the bound exceeds the target, the subspace grows (block Davidson) by the residuals of the
   top pairs, an inverse-iteration step through the factorisation for the bottom pairs, and the
   previous Ritz vectors, and step 2 repeats.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
from threadpoolctl import threadpool_limits

from conditune.scanning.matrix import MatrixView

# Ritz vectors kept at each end (two give the neighbouring Ritz value for the Kato-Temple gap).
BLOCK = 2
# ARPACK's relative residual tolerance, Lanczos basis size and restart limit. The operators are
# float32 at first, so asking for more only costs iterations; the refinement against T does the rest.
LANCZOS_TOL = 1e-6
LANCZOS_NCV = 40
LANCZOS_RESTARTS = 30
CLUSTER_GAP = 1e-6
CLUSTER_SPREAD = 10.0


@dataclass
class Extreme:
    sigma: float
    bound: float  # relative error bound on sigma
    vectors: np.ndarray  # n x BLOCK Ritz vectors, the extreme first


@dataclass
class Refined:
    top: Extreme
    bottom: Extreme
    iterations: int  # refinement steps that grew the subspace (0: the Lanczos vectors sufficed)


@dataclass
class Lanczos:
    values: np.ndarray  # Ritz values of the operator, largest first
    vectors: np.ndarray  # n x k Ritz vectors, same order
    residual: float  # ||op v - value v|| / value for the largest: relative distance to an eigenvalue
    gap: float  # relative gap from the largest Ritz value to the next (0 when unknown)

    def bound(self) -> float:
        """Relative error bound on the largest eigenvalue of the operator (Weyl, or Kato-Temple)."""
        return 2.0 * _bound(self.residual, self.gap)


def lanczos_block(
    matvec: Callable[[np.ndarray], np.ndarray], n: int, k: int = BLOCK, start: np.ndarray | None = None
) -> Lanczos:
    """The ``k`` largest Ritz pairs of a symmetric positive operator (ARPACK), largest first."""
    op = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    # deterministic start: reproducible scans
    v0 = np.random.default_rng(n).standard_normal(n) if start is None else np.asarray(start, dtype=np.float64)
    k = min(k, n - 1)
    ncv = min(n, max(2 * k + 1, LANCZOS_NCV if start is None else LANCZOS_NCV // 2))
    # single-threaded BLAS: these matvecs are memory-bound, and threads only contend on a busy machine
    with threadpool_limits(limits=1):
        try:
            values, vectors = eigsh(op, k=k, which="LA", v0=v0, tol=LANCZOS_TOL, ncv=ncv, maxiter=LANCZOS_RESTARTS)
        except ArpackNoConvergence as exc:  # keep what converged; the refinement judges it
            values, vectors = exc.eigenvalues, exc.eigenvectors
            if not len(values):
                values, vectors = np.array([1.0]), (v0 / np.linalg.norm(v0)).reshape(-1, 1)
        order = np.argsort(values)[::-1]
        values, vectors = values[order], vectors[:, order]
        top = vectors[:, 0] / np.linalg.norm(vectors[:, 0])
        residual = float(np.linalg.norm(matvec(top) - values[0] * top)) / abs(values[0])
    gap = 1.0 - values[1] / values[0] if len(values) > 1 and values[0] > 0 else 0.0
    return Lanczos(values, vectors, residual, max(gap, 0.0))


def refine(
    view: MatrixView,
    top: np.ndarray,
    bottom: np.ndarray,
    solve: Callable[[np.ndarray], np.ndarray],
    *,
    target: float,
    max_iterations: int,
) -> Refined:
    """Refine both ends against ``view`` until the summed bound is below ``target`` (see module doc)."""
    basis = np.hstack([top, bottom])
    previous: np.ndarray | None = None
    best: Refined | None = None
    last_total, stalls = math.inf, 0
    for iteration in range(max_iterations + 1):
        hi, lo = _rayleigh_ritz(view, _orthonormal(basis))
        total = hi.bound + lo.bound
        if best is None or total < best.top.bound + best.bottom.bound:
            best = Refined(hi, lo, iteration)
        stalls = stalls + 1 if total > 0.5 * last_total else 0
        if total <= target or iteration == max_iterations or stalls >= 2:
            break  # done, or stagnating: then a better factorisation is needed
        last_total = total
        grow = [hi.vectors, lo.vectors]
        if hi.bound > target / 2:
            grow.append(hi.residuals)
        if lo.bound > target / 2:
            grow.append(solve(lo.vectors))  # an inverse-iteration step
        if previous is not None:
            grow.append(previous)
        previous = np.hstack([hi.vectors, lo.vectors])
        basis = np.hstack(grow)
    return best


@dataclass
class _Side(Extreme):
    residuals: np.ndarray = None  # n x BLOCK residuals T^T u - sigma v


def _rayleigh_ritz(view: MatrixView, q: np.ndarray) -> tuple[_Side, _Side]:
    """Ritz triplets of T on span(Q) by a thin SVD of T Q; the top and bottom BLOCK with bounds."""
    w = view.matmat(q)
    qw, rw = np.linalg.qr(w)
    ur, s, zt = np.linalg.svd(rw)
    k = min(BLOCK, len(s) // 2) or 1
    order = np.r_[np.arange(k), np.arange(len(s) - 1, len(s) - 1 - k, -1)]
    x = q @ zt[order].T
    y = qw @ ur[:, order]
    sigma = s[order]
    residuals = view.rmatmat(y) - x * sigma
    rel = np.linalg.norm(residuals, axis=0) / sigma  # ||r|| / sigma: relative residual of theta
    hi_next, lo_next = (sigma[1], sigma[k + 1]) if k > 1 else (_neighbour(s, 0), _neighbour(s, -1))
    # gaps to the neighbours less their own residuals (conservative), and the plain Ritz gaps
    hi_gap = _gap(sigma[0], hi_next * (1 + (rel[1] if k > 1 else 0)), upper=True)
    lo_gap = _gap(sigma[k], lo_next * (1 - (rel[k + 1] if k > 1 else 0)), upper=False)
    hi_spread, lo_spread = _gap(sigma[0], hi_next, upper=True), _gap(sigma[k], lo_next, upper=False)
    hi = _Side(float(sigma[0]), _bound(rel[0], hi_gap, hi_spread), x[:, :k], residuals[:, :k])
    lo = _Side(float(sigma[k]), _bound(rel[k], lo_gap, lo_spread), x[:, k:], residuals[:, k:])
    return hi, lo


def _neighbour(s: np.ndarray, index: int) -> float:
    if len(s) < 2:
        return math.nan
    return float(s[1] if index == 0 else s[-2])


def _gap(sigma: float, neighbour: float, *, upper: bool) -> float:
    """Relative gap in theta = sigma^2 to the neighbouring eigenvalue estimate (0 when unknown)."""
    if not math.isfinite(neighbour) or neighbour <= 0:
        return 0.0
    gap = (sigma**2 - neighbour**2) if upper else (neighbour**2 - sigma**2)
    return max(gap, 0.0) / sigma**2


def _bound(rel_residual: float, gap: float, spread: float | None = None) -> float:
    """Relative error bound on sigma from the relative residual of theta (Weyl, or Kato-Temple)."""
    theta_err = rel_residual
    if gap > 0:
        theta_err = min(theta_err, rel_residual**2 / gap)
    spread = gap if spread is None else spread
    if 0 < spread < CLUSTER_GAP:
        # Neighbouring Ritz values this close: a tight cluster, in which Lanczos need not have found
        # the extreme member; allow for a spread of CLUSTER_SPREAD times the resolved gap.
        theta_err = max(theta_err, CLUSTER_SPREAD * spread)
    return 0.5 * theta_err


def _orthonormal(basis: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the columns (each scaled to unit length first; dependent ones dropped)."""
    norms = np.linalg.norm(basis, axis=0)
    keep = norms > 0
    scaled = basis[:, keep] / norms[keep]
    return sla.orth(scaled, rcond=1e-10)

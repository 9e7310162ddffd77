"""Factorisations behind each route: the shift-invert operator for sigma_min, an operator for sigma_max.

Each :class:`Factor` gives, for T (m x n, see :mod:`conditune.scanning.matrix`):

* ``solve(X)``: (T^T T)^-1 X, exact for a nearby matrix (the factorisation's backward error), used by
  the Lanczos run for sigma_min and as the preconditioner of the refinement;
* ``top(x)``: T^T T x, for the Lanczos run for sigma_max;
* ``log2_volume``: sum of log2 sigma_i from the factor's diagonal (det T^T T = prod of squares).

Routes:

``gram32`` / ``gram64``
    G = T^T T (the short side's Gram matrix) formed in float32 / float64, Cholesky G = L L^T.
    Forming G squares kappa: in float32 it moves sigma_min^2 by ~eps32 * kappa^2 relative, so it
    serves kappa up to ~1e3 (float64: ~1e7). Costs m n^2 + n^3/3 flops.
``lu32`` / ``lu64``
    Square T only: P T = L U, (T^T T)^-1 = U^-1 L^-1 P P^T L^-T U^-T. No squaring (backward error
    ~eps * kappa relative on sigma_min); 2n^3/3 flops.
``qr64``
    Householder QR of T in float64, R's triangular solves. Backward stable for any kappa; the last
    rung (2 m n^2 - 2n^3/3 flops at LAPACK's slower QR rate).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
import torch

from conditune.scanning.matrix import MatrixView

_TORCH = {32: torch.float32, 64: torch.float64}


@dataclass
class Factor:
    name: str  # route name: gram32, gram64, lu32, lu64, qr64
    log2_volume: float
    solve: Callable[[np.ndarray], np.ndarray]  # X (n x k, float64) -> (T^T T)^-1 X
    top: Callable[[np.ndarray], np.ndarray]  # x (n,) -> T^T T x
    flops: float  # of the factorisation (and the Gram product), for the benchmark's roofline
    eps: float  # unit roundoff of the factorisation's precision
    # Exact for a matrix within ~eps * ||T|| of T (LU, QR in float64): then the Lanczos residual of
    # the inverse operator bounds sigma_min too, together with backward_error_bound.
    backward_stable: bool = False

    def inverse_matvec(self, x: np.ndarray) -> np.ndarray:
        return self.solve(x.reshape(-1, 1))[:, 0]


def route_flops(name: str, m: int, n: int) -> float:
    """Flop count of a route's factorisation (what bounds it; one source for scanner and benchmark)."""
    if name.startswith("gram"):
        return float(m) * n * n + n**3 / 3.0  # symmetric Gram (syrk) + Cholesky
    if name.startswith("lu"):
        return 2.0 * n**3 / 3.0
    if name.startswith("qr"):
        return 2.0 * m * n * n - 2.0 * n**3 / 3.0
    return 4.0 * m * n * n + 8.0 * n**3  # svd: bidiagonalisation + divide and conquer, as LAPACK counts it


def gram_factor(view: MatrixView, bits: int) -> Factor | None:
    """Cholesky of the Gram matrix formed in float``bits``; None if it is not numerically positive definite."""
    dtype = _TORCH[bits]
    g = view.gram(dtype)
    if not np.all(np.isfinite(np.diagonal(g))):
        return None
    chol_t, info = torch.linalg.cholesky_ex(torch.from_numpy(g))
    if int(info) != 0:
        return None
    # U = L^T as a Fortran-ordered view: LAPACK reads it in place (a C-ordered L would be copied per solve)
    upper = chol_t.numpy().T
    log2_volume = float(np.sum(np.log2(np.diagonal(upper).astype(np.float64))))
    if not math.isfinite(log2_volume):
        return None

    def solve(x: np.ndarray) -> np.ndarray:
        y = sla.solve_triangular(upper, x.astype(upper.dtype), lower=False, trans="T", check_finite=False)
        return sla.solve_triangular(upper, y, lower=False, check_finite=False).astype(np.float64, copy=False)

    def top(x: np.ndarray) -> np.ndarray:
        return (g @ x.astype(g.dtype, copy=False)).astype(np.float64, copy=False)

    m, n = view.shape
    return Factor(f"gram{bits}", log2_volume, solve, top, route_flops("gram", m, n), _eps(bits))


def lu_factor(view: MatrixView, bits: int) -> Factor | None:
    """LU with partial pivoting of a square T in float``bits``; None if a pivot is zero."""
    dtype = _TORCH[bits]
    a = view.stored(dtype)  # square: T is the stored matrix itself
    lu_t, pivots, info = torch.linalg.lu_factor_ex(a)
    lu = lu_t.numpy()
    diagonal = np.abs(np.diagonal(lu)).astype(np.float64)
    if int(info) != 0 or not np.all(np.isfinite(diagonal)) or float(diagonal.min()) == 0.0:
        return None
    log2_volume = float(np.sum(np.log2(diagonal)))
    factors = (lu, pivots.numpy() - 1)  # LAPACK's 1-based pivots, as scipy wants them

    def solve(x: np.ndarray) -> np.ndarray:
        y = sla.lu_solve(factors, x.astype(lu.dtype), trans=1, check_finite=False)
        return sla.lu_solve(factors, y, check_finite=False).astype(np.float64, copy=False)

    n = view.n
    # sigma_max needs no factorisation: Lanczos on T^T T in float32 (refined against T afterwards)
    return Factor(
        f"lu{bits}", log2_volume, solve, view.normal_matvec32, route_flops("lu", n, n), _eps(bits), bits == 64
    )


def qr_factor(view: MatrixView) -> Factor | None:
    """R of a Householder QR of T in float64; None if R is singular."""
    r = sla.qr(view.dense64(), mode="r", check_finite=False)[0][: view.n]
    diagonal = np.abs(np.diagonal(r))
    if not np.all(np.isfinite(diagonal)) or float(diagonal.min()) == 0.0:
        return None

    def solve(x: np.ndarray) -> np.ndarray:
        y = sla.solve_triangular(r, x, lower=False, trans="T", check_finite=False)
        return sla.solve_triangular(r, y, lower=False, check_finite=False)

    def top(x: np.ndarray) -> np.ndarray:
        return r.T @ (r @ x)

    m, n = view.shape
    return Factor("qr64", float(np.sum(np.log2(diagonal))), solve, top, route_flops("qr", m, n), _eps(64), True)


def _eps(bits: int) -> float:
    return float(np.finfo(np.float32 if bits == 32 else np.float64).eps)

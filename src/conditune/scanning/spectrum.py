"""Extreme singular values, log-volume and their error bounds for one weight matrix.

Everything is computed in float64 (inputs in bf16/fp16/fp32 upcast exactly). Methods, chosen per
matrix by :func:`analyse_matrix`:

``svd``
    LAPACK float64 SVD of the whole matrix. Used for small matrices (min side <= ``SMALL_SIDE``),
    when the full spectrum is asked for, and as the fallback for (near) rank-deficient matrices.
    Accurate to ~ eps * sigma_max absolute.
``gram`` / ``gram32``
    G = A^T A in float64 (float32 first for clearly rectangular matrices) (one BLAS-3 product, the dominant cost), its Cholesky factor L
    (log-volume = sum log2 L_ii), Lanczos (ARPACK) on G for sigma_max^2 and on G^-1 (two triangular
    solves per step) for sigma_min^2. Forming G rounds its small eigenvalues by ~ eps*sigma_max^2,
    i.e. a relative error of ~ eps * kappa^2 on sigma_min^2, fine up to kappa ~ 1e4.
``qr``
    When Gram rounding moves sigma_min measurably (kappa beyond ~1e6), the triangular factor R of a
    Householder QR of A (backward stable: sigma_i(R) = sigma_i(A) to ~ eps * sigma_max) replaces G:
    Lanczos on (R^T R)^-1 with triangular solves. Accurate to ~ eps * kappa relative.

Every Lanczos eigenvalue comes with its residual norm ||G v - theta v||, which bounds its distance to
an eigenvalue (Weyl); ``kappa_rel_err`` adds those bounds and the rounding bound of the method.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

EPS64 = float(np.finfo(np.float64).eps)

# Below this min side a full float64 SVD costs less than the machinery of the fast path.
SMALL_SIDE = 384
# Switch from the Gram to the QR factor when Gram rounding moves sigma_min by more than this
# (measured: ~1.6e-18 kappa^2, so only beyond kappa ~ 1e6).
GRAM_DRIFT_LIMIT = 1e-6
# Matrices at most this square (min side / max side) try a float32 Gram first: their kappa is
# usually small, and float32 halves the dominant cost.
RECTANGULAR_RATIO = 0.75
# Lanczos tolerance: relative accuracy asked of the Ritz values (ARPACK's tol).
LANCZOS_TOL = 1e-9


class MatrixProblem(ValueError):
    """The matrix cannot be analysed (NaN/Inf, all zero); ``reason`` goes into the scan record."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Spectrum:
    sigma_max: float
    sigma_min: float  # smallest singular value above the rank tolerance
    rank: int
    log2_volume: float  # sum of log2 sigma_i over the non-zero sigma_i
    frobenius: float
    kappa_rel_err: float
    method: str
    singular_values: np.ndarray | None = None  # descending, only when asked for
    seconds: float = 0.0

    @property
    def kappa(self) -> float:
        return self.sigma_max / self.sigma_min

    @property
    def min_side(self) -> int:
        return self.rank if self.singular_values is None else len(self.singular_values)


def analyse_matrix(matrix, *, full_spectrum: bool = False, device: str = "cpu") -> Spectrum:
    """Spectral summary of a 2-D matrix (numpy array or torch tensor of any float dtype)."""
    start = time.perf_counter()
    if device != "cpu":
        from conditune.scanning.spectrum_torch import analyse_matrix_torch

        result = analyse_matrix_torch(matrix, full_spectrum=full_spectrum, device=device)
    else:
        result = _analyse_cpu(_as_float64(matrix), full_spectrum)
    result.seconds = time.perf_counter() - start
    return result


def _as_float64(matrix) -> np.ndarray:
    if hasattr(matrix, "detach"):  # torch tensor: upcast in torch (numpy has no bfloat16)
        import torch

        matrix = matrix.detach().to(device="cpu", dtype=torch.float64).numpy()
    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {a.shape}")
    return a


def check_matrix(a: np.ndarray) -> float:
    """Frobenius norm, or :class:`MatrixProblem` for NaN/Inf and all-zero matrices."""
    frob = float(np.linalg.norm(a))
    if not math.isfinite(frob):
        bad = int(np.count_nonzero(~np.isfinite(a)))
        raise MatrixProblem(f"{bad} NaN/Inf values")
    if frob == 0.0:
        raise MatrixProblem("all zero")
    return frob


def _analyse_cpu(a: np.ndarray, full_spectrum: bool) -> Spectrum:
    frob = check_matrix(a)
    if a.shape[0] < a.shape[1]:
        a = a.T  # same singular values; the Gram matrix is then the smaller one
    m, n = a.shape
    if full_spectrum or n <= SMALL_SIDE:
        return spectrum_from_singular_values(sla.svdvals(a, check_finite=False), (m, n), frob, "svd", keep=full_spectrum)
    # Precision ladder: a float32 Gram first where kappa is likely small (rectangular shapes), float64
    # next, QR last; each rung is taken only when the one below measurably moved sigma_min.
    ladder = (np.float32, np.float64) if n <= RECTANGULAR_RATIO * m else (np.float64,)
    for dtype in ladder:
        estimate = _gram_estimate(a, dtype)
        if estimate is None:
            continue  # Cholesky failed in this precision
        sigma_max, sigma_min, log2_vol, err = estimate
        if err["drift"] <= GRAM_DRIFT_LIMIT:
            break
    else:
        if estimate is None:
            # Not numerically positive definite even in float64: rank-deficient or kappa beyond
            # ~1e7. Only an SVD can tell.
            return spectrum_from_singular_values(sla.svdvals(a, check_finite=False), (m, n), frob, "svd")
        r = sla.qr(a, mode="r", check_finite=False)[0][:n]
        mu, lanczos_err, _ = lanczos_largest(_triangular_inverse_operator(r))
        sigma_min, log2_vol = 1.0 / math.sqrt(mu), float(np.sum(np.log2(np.abs(np.diag(r)))))
        err = {"lanczos": err["lanczos"] + 0.5 * lanczos_err, "drift": 0.0, "method": "qr"}
    if sigma_min <= _tolerance(sigma_max, (m, n)):
        return spectrum_from_singular_values(sla.svdvals(a, check_finite=False), (m, n), frob, "svd")
    rel_err = err["lanczos"] + err["drift"] + backward_error_bound(m, n, sigma_max / sigma_min)
    return Spectrum(sigma_max, sigma_min, n, log2_vol, frob, rel_err, err["method"])


def _gram_estimate(a: np.ndarray, dtype) -> tuple[float, float, float, dict] | None:
    """Extreme singular values of tall ``a`` (float64) from its Gram matrix formed in ``dtype``.

    Lanczos runs on G and on G^-1 (Cholesky solves). Forming G in finite precision rounds its small
    eigenvalues by ~ eps * sigma_max^2. The Rayleigh quotients ||A v|| of the Ritz vectors, computed
    from A in float64, remove that rounding to first order (v^T E v); what remains is second order.
    Their drift from the Gram values measures the rounding and stands in as its error estimate.
    """
    work = a.astype(dtype, copy=False)
    gram = work.T @ work
    del work
    try:
        chol = sla.cholesky(gram, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        return None
    lam_max, err_max, u = lanczos_largest(_dense_operator(gram))
    mu, err_min, v = lanczos_largest(_cholesky_inverse_operator(chol))
    log2_vol = float(np.sum(np.log2(np.diag(chol).astype(np.float64))))
    sigma_max = float(np.linalg.norm(a @ u))
    sigma_min = float(np.linalg.norm(a @ v))
    drift = abs(sigma_max - math.sqrt(lam_max)) / sigma_max + abs(sigma_min - 1.0 / math.sqrt(mu)) / sigma_min
    method = "gram" if dtype == np.float64 else "gram32"
    # sigma = sqrt(lambda): relative errors of the Ritz values halve.
    return sigma_max, sigma_min, log2_vol, {"lanczos": 0.5 * (err_max + err_min), "drift": drift, "method": method}


def spectrum_from_singular_values(s: np.ndarray, shape: tuple[int, int], frob: float, method: str, keep: bool = False) -> Spectrum:
    """Summary from a full (float64) singular value list, with numpy's matrix_rank tolerance."""
    s = np.sort(np.asarray(s, dtype=np.float64))[::-1]
    tol = _tolerance(s[0], shape)
    nonzero = s[s > tol]
    rank = int(nonzero.size)
    m, n = shape
    rel_err = backward_error_bound(m, n, float(nonzero[0] / nonzero[-1]))
    return Spectrum(
        sigma_max=float(nonzero[0]),
        sigma_min=float(nonzero[-1]),
        rank=rank,
        log2_volume=float(np.sum(np.log2(nonzero))),
        frobenius=frob,
        kappa_rel_err=rel_err,
        method=method,
        singular_values=s if keep else None,
    )


def _tolerance(sigma_max: float, shape: tuple[int, int]) -> float:
    return sigma_max * max(shape) * EPS64


def backward_error_bound(m: int, n: int, kappa: float) -> float:
    """Relative error on kappa from backward-stable float64 work on A (matvecs, QR, SVD).

    ||dA|| ~ sqrt(m n) eps ||A|| moves sigma_min by that much: relative sqrt(mn) eps kappa; times a
    safety factor of 10. An estimate of accumulated rounding, not a proof; the accuracy tests check
    it against a float64 SVD.
    """
    return 10.0 * math.sqrt(m * n) * EPS64 * kappa


# ----------------------------------------------------------------------------------------------
# Lanczos on symmetric positive definite operators


def _dense_operator(g: np.ndarray) -> LinearOperator:
    return LinearOperator(g.shape, matvec=lambda x: g @ x, dtype=np.float64)


def _cholesky_inverse_operator(chol: np.ndarray) -> LinearOperator:
    # (L L^T)^-1 x = L^-T (L^-1 x)
    def solve(x):
        y = sla.solve_triangular(chol, x, lower=True, check_finite=False)
        return sla.solve_triangular(chol, y, lower=True, trans="T", check_finite=False)

    return LinearOperator(chol.shape, matvec=solve, dtype=np.float64)


def _triangular_inverse_operator(r: np.ndarray) -> LinearOperator:
    # (R^T R)^-1 x = R^-1 (R^-T x)
    def solve(x):
        y = sla.solve_triangular(r, x, lower=False, trans="T", check_finite=False)
        return sla.solve_triangular(r, y, lower=False, check_finite=False)

    return LinearOperator(r.shape, matvec=solve, dtype=np.float64)


def lanczos_largest(op: LinearOperator) -> tuple[float, float, np.ndarray]:
    """Largest eigenvalue of a symmetric positive definite operator, its relative error bound
    (residual norm / eigenvalue: an eigenvalue lies that close) and its unit eigenvector."""
    n = op.shape[0]
    v0 = np.random.default_rng(n).standard_normal(n)  # deterministic start: reproducible scans
    try:
        values, vectors = eigsh(op, k=1, which="LA", v0=v0, tol=LANCZOS_TOL, ncv=min(n, 24), maxiter=50 * n)
    except ArpackNoConvergence as exc:  # keep the best Ritz pair; its residual says how good it is
        if not len(exc.eigenvalues):
            raise
        values, vectors = exc.eigenvalues, exc.eigenvectors
    theta = float(values[-1])
    v = vectors[:, -1]
    v = v / np.linalg.norm(v)
    residual = float(np.linalg.norm(op.matvec(v) - theta * v))
    return theta, residual / theta, v

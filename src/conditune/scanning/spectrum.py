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
# Climb the precision ladder (float32 Gram -> float64 Gram -> QR) while the error bound of the
# refined extremes exceeds this. Measured float64 Gram rounding on sigma_min: ~1.6e-18 kappa^2.
GRAM_REL_ERR_LIMIT = 1e-6
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
        result = _analyse_cpu(TallMatrix(matrix), full_spectrum)
    result.seconds = time.perf_counter() - start
    return result


class TallMatrix:
    """A matrix seen as tall (m >= n; transposed if needed: same singular values), read in row
    chunks upcast one at a time, so a 128256 x 4096 bf16 embedding never exists in float64."""

    CHUNK_BYTES = 256 * 2**20  # float64 bytes per chunk
    KEEP_BYTES = 1 << 30  # up to this, upcast once and keep (each pass would otherwise redo it)

    def __init__(self, matrix):
        import torch

        t = matrix if isinstance(matrix, torch.Tensor) else torch.from_numpy(np.asarray(matrix))
        t = t.detach().cpu()
        if t.dim() != 2:
            raise ValueError(f"expected a 2-D matrix, got shape {tuple(t.shape)}")
        self.t = t.T if t.shape[0] < t.shape[1] else t
        self.m, self.n = self.t.shape
        self.rows_per_chunk = max(1, self.CHUNK_BYTES // (8 * self.n))
        self._kept = self.t.to(torch.float64).numpy() if 8 * self.m * self.n <= self.KEEP_BYTES else None

    def chunks(self, dtype=np.float64):
        import torch

        torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
        for start in range(0, self.m, self.rows_per_chunk):
            if self._kept is not None:
                yield self._kept[start : start + self.rows_per_chunk].astype(dtype, copy=False)
            else:
                yield self.t[start : start + self.rows_per_chunk].to(torch_dtype).numpy()

    def dense(self) -> np.ndarray:
        """The whole matrix in float64 (only for small matrices and the rare SVD/QR fallbacks)."""
        if self._kept is not None:
            return self._kept
        return np.concatenate(list(self.chunks()), axis=0)

    def gram(self, dtype) -> np.ndarray:
        g = np.zeros((self.n, self.n), dtype=dtype)
        for chunk in self.chunks(dtype):
            g += chunk.T @ chunk
        return g

    def matvec_norm(self, v: np.ndarray) -> float:
        """||A v|| in float64."""
        return math.sqrt(sum(float(np.sum((chunk @ v) ** 2)) for chunk in self.chunks()))

    def check_finite(self) -> None:
        """:class:`MatrixProblem` for NaN/Inf (counted) and all-zero matrices."""
        bad = sum(int(np.count_nonzero(~np.isfinite(chunk))) for chunk in self.chunks())
        if bad:
            raise MatrixProblem(f"{bad} NaN/Inf values")
        if not any(np.any(chunk) for chunk in self.chunks()):
            raise MatrixProblem("all zero")


def _analyse_cpu(a: TallMatrix, full_spectrum: bool) -> Spectrum:
    shape = (a.m, a.n)
    if full_spectrum or a.n <= SMALL_SIDE:
        a.check_finite()
        return _svd(a, keep=full_spectrum)
    # Precision ladder: a float32 Gram first where kappa is likely small (rectangular shapes), float64
    # next, QR last; each rung is taken only when the one below measurably moved sigma_min.
    ladder = (np.float32, np.float64) if a.n <= RECTANGULAR_RATIO * a.m else (np.float64,)
    for dtype in ladder:
        estimate = _gram_estimate(a, dtype)
        if estimate is not None and estimate[3]["bound"] <= GRAM_REL_ERR_LIMIT:
            break
    else:
        if estimate is None:
            # Not numerically positive definite even in float64: rank-deficient or kappa beyond
            # ~1e7. Only an SVD can tell.
            return _svd(a)
        r = sla.qr(a.dense(), mode="r", check_finite=False)[0][: a.n]
        bottom = lanczos_extremes(_triangular_inverse_operator(r))
        sigma_max, _, _, err = estimate
        sigma_min, log2_vol = 1.0 / math.sqrt(bottom.value), float(np.sum(np.log2(np.abs(np.diag(r)))))
        # The operator is exact here (R from a backward-stable QR): the Lanczos residual is the bound.
        estimate = (
            sigma_max,
            sigma_min,
            log2_vol,
            {**err, "bound": err["bound"] + 0.5 * bottom.residual, "method": "qr"},
        )
    sigma_max, sigma_min, log2_vol, err = estimate
    if sigma_min <= _tolerance(sigma_max, shape):
        return _svd(a)
    rel_err = err["bound"] + backward_error_bound(a.m, a.n, sigma_max / sigma_min)
    return Spectrum(sigma_max, sigma_min, a.n, log2_vol, err["frobenius"], rel_err, err["method"])


def _svd(a: TallMatrix, keep: bool = False) -> Spectrum:
    s = sla.svdvals(a.dense(), check_finite=False)
    frob = float(np.sqrt(np.sum(s.astype(np.float64) ** 2)))
    return spectrum_from_singular_values(s, (a.m, a.n), frob, "svd", keep=keep)


def _gram_estimate(a: TallMatrix, dtype) -> tuple[float, float, float, dict] | None:
    """Extreme singular values of ``a`` from its Gram matrix formed in ``dtype``.

    Lanczos on G and on G^-1 (Cholesky solves) gives the extreme Ritz vectors. Forming G in finite
    precision perturbs them, so each is re-scored against the exact operator A^T A, applied from A
    in float64 (:func:`_refine`): the Rayleigh quotient removes G's rounding to first order, and the
    residual bounds what is left.
    """
    # Only forming G (the m n^2 part) runs in ``dtype``; Cholesky and Lanczos work on its float64
    # copy (mixed-dtype products would upcast the whole matrix at every Lanczos step).
    gram = a.gram(dtype).astype(np.float64, copy=False)
    trace = float(np.trace(gram))  # = ||A||_F^2; NaN/Inf in A propagate here
    if not math.isfinite(trace) or trace == 0.0:
        a.check_finite()  # raises with the reason (and the count)
    try:
        chol = sla.cholesky(gram, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        return None
    top = lanczos_extremes(_dense_operator(gram))
    del gram
    bottom = lanczos_extremes(_cholesky_inverse_operator(chol))
    log2_vol = float(np.sum(np.log2(np.diag(chol).astype(np.float64))))
    # Relative gaps to the next eigenvalue, for Kato-Temple (G^-1's eigenvalues are 1/lambda).
    top_gap = 1.0 - top.second / top.value
    bottom_gap = top_gap if bottom.second is None else bottom.value / bottom.second - 1.0
    sigma_max, err_max = _refine(a, top.vector, top_gap)
    sigma_min, err_min = _refine(a, bottom.vector, bottom_gap)
    method = "gram" if dtype == np.float64 else "gram32"
    frobenius = math.sqrt(trace)  # from a float32 Gram: ~1e-7 relative
    return sigma_max, sigma_min, log2_vol, {"bound": err_max + err_min, "method": method, "frobenius": frobenius}


def _refine(a: TallMatrix, v: np.ndarray, relative_gap: float | None) -> tuple[float, float]:
    """sigma = ||A v|| for a unit vector v, and a bound on its relative error.

    With theta = ||A v||^2 and r = A^T A v - theta v (both from A in float64), an eigenvalue of A^T A
    lies within ||r|| of theta (Weyl), and within ||r||^2 / gap when the rest of the spectrum is at
    least ``gap`` away (Kato-Temple; the gap comes from the Lanczos run on the rounded G, so this
    part is an estimate). The relative error on sigma is half that on theta.
    """
    theta, atav = 0.0, np.zeros_like(v)
    for chunk in a.chunks():
        av = chunk @ v
        theta += float(av @ av)
        atav += chunk.T @ av
    residual = float(np.linalg.norm(atav - theta * v)) / theta
    if relative_gap and relative_gap > 0:
        residual = min(residual, residual**2 / relative_gap)
    return math.sqrt(theta), 0.5 * residual


def spectrum_from_singular_values(
    s: np.ndarray, shape: tuple[int, int], frob: float, method: str, keep: bool = False
) -> Spectrum:
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


@dataclass
class RitzPair:
    value: float  # largest eigenvalue
    vector: np.ndarray  # unit eigenvector
    residual: float  # ||op v - value v|| / value: an eigenvalue lies that close (relative)
    second: float | None  # next largest Ritz value, for gaps


def lanczos_extremes(op: LinearOperator) -> RitzPair:
    """Largest eigenpair of a symmetric positive definite operator (and the next Ritz value)."""
    n = op.shape[0]
    v0 = np.random.default_rng(n).standard_normal(n)  # deterministic start: reproducible scans
    k = 2 if n > 2 else 1
    try:
        values, vectors = eigsh(op, k=k, which="LA", v0=v0, tol=LANCZOS_TOL, ncv=min(n, 64), maxiter=50 * n)
    except ArpackNoConvergence as exc:  # keep the best Ritz pair; its residual says how good it is
        if not len(exc.eigenvalues):
            raise
        values, vectors = exc.eigenvalues, exc.eigenvectors
    order = np.argsort(values)[::-1]
    theta = float(values[order[0]])
    v = vectors[:, order[0]]
    v = v / np.linalg.norm(v)
    residual = float(np.linalg.norm(op.matvec(v) - theta * v)) / theta
    second = float(values[order[1]]) if len(order) > 1 else None
    return RitzPair(theta, v, residual, second)

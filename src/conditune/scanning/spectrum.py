"""Extreme singular values, log-volume and their error bounds for one weight matrix.

Inputs in bf16/fp16/fp32 are upcast exactly; every reported number is scored against the matrix
itself in float64. :func:`analyse_matrix` picks a route per matrix (the record's ``method``):

``svd``
    LAPACK float64 SVD of the whole matrix: small matrices (min side <= ``SMALL_SIDE``), the full
    spectrum, and the fallback for (near) rank-deficient matrices.
``gram32+lanczos``, ``gram64+lanczos`` (rectangular), ``lu64-shift-invert`` (square), ``qr64-shift-invert``
    A precision ladder of factorisations (:mod:`conditune.scanning.factor`): the short side's Gram
    matrix and its Cholesky factor (in float32 first where the shape makes a small kappa likely, then
    in float64), or an LU of a square matrix (which does not square kappa), a Householder QR last.
    Lanczos (ARPACK) on the factor's operators gives Ritz vectors at both ends; they are refined
    against the matrix in float64 with residual error bounds (:mod:`conditune.scanning.ritz`).
    ``+davidson`` in the name: refinement steps ran. A rung is accepted when its bound is at most
    ``GRAM_REL_ERR_LIMIT`` (and, for a Gram matrix, eps * kappa^2 <= ``GRAM_VOLUME_LIMIT``); else the
    next one runs. docs/scan.md has the details and the measurements behind the choices.

``kappa_rel_err`` adds the refinement bounds of sigma_max and sigma_min and the backward error of
float64 work on the matrix (:func:`backward_error_bound`).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla

from conditune.scanning.factor import Factor, gram_factor, lu_factor, qr_factor, route_flops
from conditune.scanning.matrix import MatrixProblem, MatrixView
from conditune.scanning.ritz import lanczos_block, refine

__all__ = [
    "MatrixProblem",
    "Spectrum",
    "analyse_matrices",
    "analyse_matrix",
    "backward_error_bound",
    "spectrum_from_singular_values",
]

EPS64 = float(np.finfo(np.float64).eps)

# Below this min side a full float64 SVD costs less than the machinery of the fast path.
SMALL_SIDE = 384
# A rung of the precision ladder is accepted when the refined bound is at most this.
GRAM_REL_ERR_LIMIT = 1e-6
# A Gram-matrix rung is accepted only while eps * kappa^2 is at most this (its log-volume degrades).
GRAM_VOLUME_LIMIT = 1e-3
# The refinement continues (cheaply) to this, so that accepted results are well inside the limit.
REFINE_TARGET = 1e-7
MAX_REFINE_STEPS = 3
# Rectangular matrices at most this square (min side / max side) start at the float32 Gram matrix:
# their kappa is usually small. Squarer non-square ones start at float64.
RECTANGULAR_RATIO = 0.75
# Matrices whose route costs fewer flops than this are analysed several at a time by
# :func:`analyse_matrices`, each with single-threaded BLAS (multi-threaded BLAS on small matrices
# mostly spins, and collapses when the machine is busy).
SMALL_WORK = 2e9


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
    # flops of the factorisations this matrix needed (every rung tried), by precision: what bounds its time
    flops32: float = 0.0
    flops64: float = 0.0

    @property
    def kappa(self) -> float:
        return self.sigma_max / self.sigma_min

    @property
    def flops(self) -> float:
        return self.flops32 + self.flops64

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
        result = _analyse_cpu(MatrixView(matrix), full_spectrum)
    result.seconds = time.perf_counter() - start
    return result


def analyse_matrices(
    matrices: Iterable, *, full_spectrum: bool = False, workers: int | None = None
) -> list[Spectrum | MatrixProblem]:
    """:func:`analyse_matrix` on many CPU matrices, in order; a bad matrix gives its MatrixProblem.

    Small ones (route below ``SMALL_WORK`` flops) run ``workers`` at a time (default: the CPU
    count), each with single-threaded BLAS; large ones one at a time with every BLAS thread.
    """
    items = list(matrices)
    small = [i for i, m in enumerate(items) if matrix_work(m.shape) < SMALL_WORK]
    large = [i for i in range(len(items)) if i not in set(small)]
    out: list[Spectrum | MatrixProblem | None] = [None] * len(items)

    def one(i: int) -> None:
        try:
            out[i] = analyse_matrix(items[i], full_spectrum=full_spectrum)
        except MatrixProblem as problem:
            out[i] = problem

    with single_threaded_blas(), ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        list(pool.map(one, small))
    for i in large:
        one(i)
    return out  # type: ignore[return-value]


def matrix_work(shape: Sequence[int]) -> float:
    """Flops of the route a matrix of this shape most likely takes (for balancing and batching)."""
    small, big = sorted(int(d) for d in shape[-2:])
    if small <= SMALL_SIDE:
        return route_flops("svd", big, small)
    return route_flops("lu" if small == big else "gram", big, small)


@contextlib.contextmanager
def single_threaded_blas():
    """Limit numpy/scipy BLAS and torch to one thread inside the block (restored after)."""
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a process-wide setting: worker threads started inside see it too
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# the CPU routes


def _analyse_cpu(view: MatrixView, full_spectrum: bool) -> Spectrum:
    if full_spectrum or view.n <= SMALL_SIDE:
        frobenius = view.frobenius()  # raises for NaN/Inf and all-zero matrices
        return _svd(view, frobenius, keep=full_spectrum)
    frobenius = view.frobenius()
    found = _ladder_estimate(view)
    if found is None:
        # Not positive definite even in float64 and R singular: rank-deficient. Only an SVD can tell.
        return _svd(view, frobenius)
    sigma_max, sigma_min, bound, factor, method, flops = found
    if sigma_min <= _tolerance(sigma_max, view.shape):
        return _svd(view, frobenius)
    rel_err = bound + backward_error_bound(view.m, view.n, sigma_max / sigma_min)
    spec = Spectrum(sigma_max, sigma_min, view.n, factor.log2_volume, frobenius, rel_err, method)
    spec.flops32, spec.flops64 = flops[32], flops[64]
    return spec


def _ladder(view: MatrixView) -> list[Callable[[MatrixView], Factor | None]]:
    """The rungs for this shape, cheapest first (see the module docstring)."""
    if view.square and view.kept:
        # float32 LU is not tried: its Lanczos vectors are too far off whenever kappa is large
        # enough to matter (docs/scan.md has the measurements); a float64 LU costs 2n^3/3.
        return [lambda v: lu_factor(v, 64), qr_factor]
    if view.n <= RECTANGULAR_RATIO * view.m:
        return [lambda v: gram_factor(v, 32), lambda v: gram_factor(v, 64), qr_factor]
    return [lambda v: gram_factor(v, 64), qr_factor]


_ROUTE_NAMES = {"gram": "{name}+lanczos", "lu": "{name}-shift-invert", "qr": "{name}-shift-invert"}


def _ladder_estimate(view: MatrixView) -> tuple | None:
    """(sigma_max, sigma_min, bound, factor, method, flops by precision) from the first rung whose
    bound is small enough (else the last that ran; None if no factorisation existed)."""
    top = bottom = top_lanczos = None
    best = None
    flops = {32: 0.0, 64: 0.0}
    for make in _ladder(view):
        factor = make(view)
        if factor is None:
            continue
        flops[32 if factor.eps > 1e-10 else 64] += factor.flops
        if top is None:
            top_lanczos = lanczos_block(factor.top, view.n)
            top = top_lanczos.vectors
        inverse = lanczos_block(factor.inverse_matvec, view.n, start=None if bottom is None else bottom[:, 0])
        if (
            best is None
            and top_lanczos is not None
            and not _volume_is_accurate(factor, math.sqrt(top_lanczos.values[0] * inverse.values[0]))
        ):
            bottom = inverse.vectors  # this rung's kappa estimate already rules it out: no refinement
            continue
        refined = refine(
            view, top, inverse.vectors, factor.solve, target=REFINE_TARGET, max_iterations=MAX_REFINE_STEPS
        )
        sigma_min, bottom_bound = refined.bottom.sigma, refined.bottom.bound
        if factor.backward_stable and 0.5 * inverse.bound() < bottom_bound:
            # exact for a nearby matrix: the inverse operator's own residual bounds sigma_min
            sigma_min, bottom_bound = 1.0 / math.sqrt(inverse.values[0]), 0.5 * inverse.bound()
        bound = refined.top.bound + bottom_bound
        kind = factor.name.rstrip("0123456789")
        method = _ROUTE_NAMES[kind].format(name=factor.name) + ("+davidson" if refined.iterations else "")
        best = (refined.top.sigma, sigma_min, bound, factor, method, flops)
        if bound <= GRAM_REL_ERR_LIMIT and _volume_is_accurate(factor, refined.top.sigma / sigma_min):
            return best
        top, bottom = refined.top.vectors, refined.bottom.vectors  # the next rung starts from these
    return best


def _volume_is_accurate(factor: Factor, kappa: float) -> bool:
    """A Gram matrix's rounding moves its small eigenvalues by ~eps * kappa^2 relative, and the
    log-volume (from its Cholesky diagonal) with them; LU and QR do not square kappa."""
    return not factor.name.startswith("gram") or factor.eps * kappa**2 <= GRAM_VOLUME_LIMIT


def _svd(view: MatrixView, frobenius: float, keep: bool = False) -> Spectrum:
    s = sla.svdvals(view.dense64(), check_finite=False)
    spec = spectrum_from_singular_values(s, view.shape, frobenius, "svd", keep=keep)
    spec.flops64 = route_flops("svd", view.m, view.n)
    return spec


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

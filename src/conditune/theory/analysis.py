"""The closed-form quantities of :mod:`conditune.theory.quantities` for one concrete weight matrix.

``unit_report(W)`` answers, for a tensor you hold (torch or numpy, any float dtype): what is the
output entropy h(Y) of Y = W X with X ~ N(0, sigma_x^2 I), is Y degenerate, how far is W from the
best-conditioned matrix of the same Frobenius norm, and how does its kappa compare with a random
matrix of the same shape. The SVD is always taken in float64 so bf16/fp16 weights give the same
answer as their float64 copy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from conditune.theory.quantities import (
    entropy_bits,
    entropy_deficit_bits,
    is_output_degenerate,
    kappa_random,
    log2_volume,
    max_log2_volume_at_frobenius,
    rank_tolerance,
)


def to_float64(values: Any) -> np.ndarray:
    """A float64 numpy array from a torch tensor (any dtype or device, bf16 included) or array-like."""
    if hasattr(values, "detach"):  # torch.Tensor: .numpy() cannot read bf16, so convert in torch first
        import torch

        values = values.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def as_matrix(weight: Any) -> np.ndarray:
    """A float64 numpy copy of ``weight`` as a 2-D (out, in) matrix.

    Tensors with more than two dimensions (convolutions) are flattened to (out, rest), as the
    scanner does.
    """
    matrix = to_float64(weight)
    if matrix.ndim < 2:
        raise ValueError(f"expected a matrix, got an array of shape {matrix.shape}")
    if matrix.ndim > 2:
        matrix = matrix.reshape(matrix.shape[0], -1)
    if 0 in matrix.shape:
        raise ValueError(f"empty matrix of shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError("matrix has NaN or infinite entries")
    return matrix


def numerical_rank(singular_values: np.ndarray, shape: tuple[int, int]) -> int:
    """How many singular values are above the float64 rank tolerance of this shape."""
    s = np.asarray(singular_values, dtype=np.float64)
    if s.size == 0 or s.max() <= 0:
        return 0
    return int(np.count_nonzero(s > rank_tolerance(float(s.max()), shape)))


def image_basis(weight: Any) -> np.ndarray:
    """Orthonormal basis (m, r) of the image of W: the subspace where Y = W X lives."""
    matrix = as_matrix(weight)
    u, s, _ = np.linalg.svd(matrix, full_matrices=False)
    return u[:, : numerical_rank(s, matrix.shape)]


@dataclass(frozen=True)
class UnitReport:
    """Closed-form summary of the linear unit Y = W X, X ~ N(0, sigma_x^2 I_n), W of shape (m, n)."""

    shape: tuple[int, int]
    sigma_x: float
    rank: int
    degenerate: bool  # rank < m: Y has no density in R^m; entropies are on its rank-dim image
    sigma_max: float
    sigma_min: float  # smallest non-zero singular value
    kappa: float
    frobenius: float
    log2_volume: float  # sum of log2 sigma_i over non-zero sigma_i
    entropy_bits: float  # h(Y) on the image (eq. 6)
    max_entropy_bits: float  # h(Y) of the kappa = 1 matrix with the same rank and Frobenius norm
    entropy_deficit_bits: float  # max_entropy_bits - entropy_bits >= 0 (Theorem 1)
    kappa_mp: float  # typical kappa of a Gaussian random matrix of this shape
    kappa_norm: float  # kappa / kappa_mp: conditioning with the shape effect divided out

    @property
    def image_dim(self) -> int:
        """Dimension of the subspace Y lives in (= rank)."""
        return self.rank

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["shape"] = list(self.shape)
        row["image_dim"] = self.image_dim
        return row


def unit_report(
    weight_or_singular_values: Any, shape: tuple[int, int] | None = None, sigma_x: float = 1.0
) -> UnitReport:
    """Closed-form report for a weight matrix, or for its singular values plus ``shape``.

    >>> r = unit_report(np.diag([4.0, 1.0]))
    >>> r.kappa, r.log2_volume, r.degenerate
    (4.0, 2.0, False)
    """
    values = to_float64(weight_or_singular_values)
    if values.ndim == 1:
        if shape is None:
            raise ValueError("pass the matrix shape (m, n) together with its singular values")
        s = values
        if s.size != min(shape) or np.any(s < 0) or not np.all(np.isfinite(s)):
            raise ValueError(
                f"expected {min(shape)} finite non-negative singular values for shape {tuple(shape)}, got {s.size}"
            )
    else:
        matrix = as_matrix(values)
        if shape is not None and tuple(shape) != matrix.shape:
            raise ValueError(f"shape {tuple(shape)} does not match the matrix shape {matrix.shape}")
        shape = matrix.shape
        s = np.linalg.svd(matrix, compute_uv=False)
    return _report_from_spectrum(np.sort(s)[::-1], (int(shape[0]), int(shape[1])), sigma_x)


def _report_from_spectrum(s: np.ndarray, shape: tuple[int, int], sigma_x: float) -> UnitReport:
    if not sigma_x > 0:
        raise ValueError("sigma_x must be positive")
    rank = numerical_rank(s, shape)
    frobenius = float(math.sqrt(np.sum(s**2)))
    kappa_mp = kappa_random(shape)
    if rank == 0:  # the zero matrix maps everything to one point: no volume, no entropy
        nan = float("nan")
        return UnitReport(
            shape, sigma_x, 0, True, 0.0, 0.0, nan, 0.0, -math.inf, -math.inf, -math.inf, nan, kappa_mp, nan
        )
    nonzero = s[:rank]
    log_vol = log2_volume(nonzero)
    kappa = float(nonzero[0] / nonzero[-1])
    return UnitReport(
        shape=shape,
        sigma_x=float(sigma_x),
        rank=rank,
        degenerate=is_output_degenerate(shape, rank),
        sigma_max=float(nonzero[0]),
        sigma_min=float(nonzero[-1]),
        kappa=kappa,
        frobenius=frobenius,
        log2_volume=log_vol,
        entropy_bits=entropy_bits(log_vol, rank, sigma_x),
        max_entropy_bits=entropy_bits(max_log2_volume_at_frobenius(frobenius, rank), rank, sigma_x),
        entropy_deficit_bits=entropy_deficit_bits(log_vol, frobenius, rank),
        kappa_mp=kappa_mp,
        kappa_norm=kappa / kappa_mp,
    )


def matrix_with_spectrum(singular_values: Any, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A (m, n) matrix U diag(s) V^T with the given singular values and random orthonormal U, V."""
    m, n = shape
    s = np.asarray(singular_values, dtype=np.float64)
    if s.size > min(m, n):
        raise ValueError(f"{s.size} singular values do not fit a {m}x{n} matrix")
    u = _random_orthonormal(m, s.size, rng)
    v = _random_orthonormal(n, s.size, rng)
    return (u * s) @ v.T


def _random_orthonormal(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    # QR of a Gaussian matrix, with column signs fixed so the result is Haar distributed.
    q, r = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q * np.sign(np.diag(r))


def sample_outputs(weight: Any, n_samples: int, rng: np.random.Generator, sigma_x: float = 1.0) -> np.ndarray:
    """``n_samples`` draws of Y = W X with X ~ N(0, sigma_x^2 I_n), as rows of an (n_samples, m) array."""
    matrix = as_matrix(weight)
    x = rng.standard_normal((n_samples, matrix.shape[1])) * sigma_x
    return x @ matrix.T

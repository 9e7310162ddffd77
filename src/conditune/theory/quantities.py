"""Closed-form quantities of a linear unit Y = W X with Gaussian input X ~ N(0, sigma_x^2 I).

Conventions (PyTorch ``nn.Linear``): W has shape (m, n) = (out_features, in_features), so the
output Y lives in R^m. Everything here takes the singular values (or their summaries) of W and is
shared by the scanner (per-tensor records) and :mod:`conditune.theory` (the checks).
"""

from __future__ import annotations

import math

import numpy as np

LOG2_2PI_E = math.log2(2.0 * math.pi * math.e)

# Edelman (1988): for an n x n real Gaussian matrix, E[log kappa] = log n + 1.537 + o(1).
EDELMAN_SQUARE_LOG_CONSTANT = 1.537


def rank_tolerance(sigma_max: float, shape: tuple[int, int]) -> float:
    """Singular values at or below this are zero (numpy.linalg.matrix_rank's default rule)."""
    return float(sigma_max) * max(shape) * np.finfo(np.float64).eps


def log2_volume(singular_values: np.ndarray, tol: float | None = None) -> float:
    """Log-volume scaling factor sum(log2 sigma_i) over the non-zero singular values."""
    s = np.asarray(singular_values, dtype=np.float64)
    if tol is None:
        tol = 0.0
    s = s[s > tol]
    return float(np.sum(np.log2(s)))


def entropy_bits(log2_vol: float, rank: int, sigma_x: float = 1.0) -> float:
    """Differential entropy h(Y) in bits (eq. 6) on the image of W.

    h(Y) = r/2 * log2(2 pi e sigma_x^2) + sum_i log2 sigma_i, with r = rank(W). For W with full row
    rank (r = m <= n) this is the entropy of Y in R^m. When r < m (more rows than columns, or a
    rank-deficient W) Y is degenerate in R^m (its density does not exist and h = -inf there); the
    value returned is the entropy of Y restricted to its r-dimensional image subspace.
    """
    if sigma_x <= 0:
        raise ValueError("sigma_x must be positive")
    return 0.5 * rank * (LOG2_2PI_E + 2.0 * math.log2(sigma_x)) + log2_vol


def is_output_degenerate(shape: tuple[int, int], rank: int) -> bool:
    """True when Y = WX has no density in R^m (rank below the output dimension)."""
    return rank < shape[0]


def max_log2_volume_at_frobenius(frobenius: float, rank: int) -> float:
    """Log-volume of the kappa = 1 matrix of the same rank and Frobenius norm (Theorem 1's maximiser).

    With r equal singular values s and r s^2 = ||W||_F^2: r * log2(||W||_F / sqrt(r)).
    """
    if rank <= 0 or frobenius <= 0:
        return float("-inf")
    return rank * math.log2(frobenius / math.sqrt(rank))


def entropy_deficit_bits(log2_vol: float, frobenius: float, rank: int) -> float:
    """How many bits below the isotropic (kappa = 1) unit with the same norm W's output entropy is.

    Always >= 0 (AM-GM on the squared singular values); 0 exactly when all non-zero sigma_i are equal.
    """
    return max_log2_volume_at_frobenius(frobenius, rank) - log2_vol


def kappa_random(shape: tuple[int, int]) -> float:
    """Typical condition number of a Gaussian random matrix of this shape (``kappa_mp``).

    For M >= N (M = larger side): sigma_max ~ sqrt(M) + sqrt(N) and, from Marchenko-Pastur's lower
    edge, sigma_min ~ sqrt(M) - sqrt(N). At M = N that edge is 0; Edelman's square-matrix law
    kappa ~ exp(1.537) * N gives sigma_min ~ 2 exp(-1.537) / sqrt(N). We add the two terms so the
    formula is finite and smooth from square to very rectangular shapes.
    """
    big, small = max(shape), min(shape)
    if small < 1:
        raise ValueError(f"empty shape {shape}")
    if small == 1:
        return 1.0
    sigma_max = math.sqrt(big) + math.sqrt(small)
    sigma_min = (math.sqrt(big) - math.sqrt(small)) + 2.0 * math.exp(-EDELMAN_SQUARE_LOG_CONSTANT) / math.sqrt(small)
    return sigma_max / sigma_min


def effective_rank(singular_values: np.ndarray) -> float:
    """Roy & Vetterli's effective rank: exp of the Shannon entropy of sigma_i / sum(sigma)."""
    s = np.asarray(singular_values, dtype=np.float64)
    s = s[s > 0]
    if s.size == 0:
        return 0.0
    p = s / s.sum()
    return float(math.exp(-np.sum(p * np.log(p))))


def stable_rank(frobenius: float, sigma_max: float) -> float:
    """||W||_F^2 / sigma_max^2, a noise-robust rank surrogate."""
    return float(frobenius**2 / sigma_max**2) if sigma_max > 0 else 0.0

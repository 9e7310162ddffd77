"""Sample-based entropy estimates, independent of the closed forms they are used to check.

Kozachenko-Leonenko (KL) k-nearest-neighbour estimator, in nats:

    h_hat = psi(N) - psi(k) + log V_d + (d / N) * sum_i log eps_i

with eps_i the Euclidean distance from sample i to its k-th nearest neighbour and
V_d = pi^(d/2) / Gamma(d/2 + 1) the volume of the unit d-ball. It makes no Gaussian assumption and
never sees W's singular values, only samples of Y.

It is consistent but, at a few thousand samples, biased low by a few hundredths of a bit for d >= 3
(in the Gaussian tails the density is far from flat over a k-NN ball). That bias depends only on
(d, N, k) for a round distribution, so we measure it on N(0, I_d) samples, whose entropy
d/2 * log2(2 pi e) is the one textbook value used here, and subtract it. What calibration cannot
remove is the extra bias of strongly anisotropic clouds: keep d <= 8 with kappa <= 2, or d <= 4
with kappa <= 10 (measured in docs/theory.md), for the estimate to be within its standard error.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.special import digamma, gammaln

from conditune.theory.analysis import as_matrix, image_basis, sample_outputs
from conditune.theory.quantities import LOG2_2PI_E


def kl_entropy_bits(samples: np.ndarray, k: int = 3) -> float:
    """Kozachenko-Leonenko estimate of the differential entropy (bits) of the rows of ``samples``."""
    y = np.asarray(samples, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    n, d = y.shape
    if not 1 <= k < n:
        raise ValueError(f"need 1 <= k < number of samples, got k={k} with {n} samples")
    from scipy.spatial import cKDTree  # ~0.6 s to import: only pay it when estimating

    distances, _ = cKDTree(y).query(y, k=k + 1)  # each point's nearest "neighbour" is itself
    if np.any(distances[:, 1] <= 0):  # ties bias the estimate (and make log eps = -inf once k deep)
        raise ValueError("repeated samples: the KL estimator needs samples from a continuous distribution")
    eps = distances[:, k]
    log_unit_ball = 0.5 * d * math.log(math.pi) - gammaln(0.5 * d + 1.0)
    nats = digamma(n) - digamma(k) + log_unit_ball + d * float(np.mean(np.log(eps)))
    return nats / math.log(2.0)


@dataclass(frozen=True)
class EntropyEstimate:
    """A KL entropy estimate with its error, all in bits."""

    bits: float  # bias-corrected estimate: raw_bits - bias_bits
    stderr: float  # standard error of ``bits`` from the spread of independent repeats
    raw_bits: float  # mean of the plain KL estimates
    bias_bits: float  # KL's finite-sample bias at (dim, n_samples, k), measured on N(0, I_dim)
    dim: int
    n_samples: int
    k: int
    repeats: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean_and_stderr(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(arr.size))


@functools.lru_cache(maxsize=64)
def kl_bias_bits(dim: int, n_samples: int, k: int = 3, repeats: int = 10, seed: int = 0) -> tuple[float, float]:
    """(mean, standard error) of KL estimate minus true entropy on ``repeats`` N(0, I_dim) samples.

    Independent of the matrix being checked, so it is computed once per (dim, n_samples, k).
    """
    rng = np.random.default_rng([seed, dim, n_samples, k])
    exact = 0.5 * dim * LOG2_2PI_E
    errors = [kl_entropy_bits(rng.standard_normal((n_samples, dim)), k) - exact for _ in range(repeats)]
    return _mean_and_stderr(errors)


def estimate_entropy(
    draw: Callable[[np.random.Generator], np.ndarray], rng: np.random.Generator, k: int = 3, repeats: int = 10
) -> EntropyEstimate:
    """Bias-corrected KL entropy of the distribution ``draw(rng)`` samples from (rows = samples).

    The standard error comes from ``repeats`` independent samples (a bootstrap would duplicate points,
    which breaks nearest-neighbour distances) combined with the calibration's own standard error.
    """
    if repeats < 2:
        raise ValueError("need at least 2 repeats to estimate a standard error")
    estimates, n_samples, dim = [], 0, 0
    for _ in range(repeats):
        sample = np.asarray(draw(rng), dtype=np.float64)
        sample = sample if sample.ndim == 2 else sample[:, None]
        n_samples, dim = sample.shape
        estimates.append(kl_entropy_bits(sample, k))
    raw, raw_se = _mean_and_stderr(estimates)
    bias, bias_se = kl_bias_bits(dim, n_samples, k, repeats)
    return EntropyEstimate(raw - bias, math.hypot(raw_se, bias_se), raw, bias, dim, n_samples, k, repeats)


def estimate_output_entropy(
    weight: Any,
    sigma_x: float = 1.0,
    *,
    n_samples: int = 4000,
    k: int = 3,
    repeats: int = 10,
    rng: np.random.Generator | int | None = 0,
) -> EntropyEstimate:
    """KL estimate of h(Y), Y = W X, X ~ N(0, sigma_x^2 I), from samples of Y alone.

    A degenerate Y (rank(W) < m, e.g. more rows than columns) has no density in R^m, so its samples
    are first written in an orthonormal basis of W's image (an isometry, which keeps the entropy):
    the estimate is then the entropy on the rank-dimensional image, as eq. 6 reports it.
    """
    matrix = as_matrix(weight)
    basis = image_basis(matrix)
    if basis.shape[1] == 0:
        raise ValueError("W is zero: Y is a single point and has no differential entropy")
    project = basis.shape[1] < matrix.shape[0]

    def draw(generator: np.random.Generator) -> np.ndarray:
        y = sample_outputs(matrix, n_samples, generator, sigma_x)
        return y @ basis if project else y

    return estimate_entropy(draw, np.random.default_rng(rng), k=k, repeats=repeats)

"""The theory behind condition-number selection, as functions (see docs/theory.md).

Closed forms live in :mod:`~conditune.theory.quantities`; :func:`unit_report` applies them to a
tensor you hold; :func:`estimate_output_entropy` is an independent sample-based check; the
``conditune theory`` report (:mod:`~conditune.theory.report`) verifies both against each other.
"""

from conditune.theory.analysis import (
    UnitReport,
    as_matrix,
    image_basis,
    matrix_with_spectrum,
    numerical_rank,
    sample_outputs,
    unit_report,
)
from conditune.theory.estimators import (
    EntropyEstimate,
    estimate_entropy,
    estimate_output_entropy,
    kl_bias_bits,
    kl_entropy_bits,
)
from conditune.theory.quantities import (
    effective_rank,
    entropy_bits,
    entropy_deficit_bits,
    is_output_degenerate,
    kappa_random,
    log2_volume,
    max_log2_volume_at_frobenius,
    rank_tolerance,
    stable_rank,
)

__all__ = [
    "EntropyEstimate",
    "UnitReport",
    "as_matrix",
    "effective_rank",
    "entropy_bits",
    "entropy_deficit_bits",
    "estimate_entropy",
    "estimate_output_entropy",
    "image_basis",
    "is_output_degenerate",
    "kappa_random",
    "kl_bias_bits",
    "kl_entropy_bits",
    "log2_volume",
    "matrix_with_spectrum",
    "max_log2_volume_at_frobenius",
    "numerical_rank",
    "rank_tolerance",
    "sample_outputs",
    "stable_rank",
    "unit_report",
]

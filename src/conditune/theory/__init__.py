"""The theory behind condition-number selection, as functions (see docs/theory.md)."""

from conditune.theory.quantities import (
    entropy_bits,
    entropy_deficit_bits,
    effective_rank,
    is_output_degenerate,
    kappa_random,
    log2_volume,
    max_log2_volume_at_frobenius,
    rank_tolerance,
    stable_rank,
)

__all__ = [
    "entropy_bits",
    "entropy_deficit_bits",
    "effective_rank",
    "is_output_degenerate",
    "kappa_random",
    "log2_volume",
    "max_log2_volume_at_frobenius",
    "rank_tolerance",
    "stable_rank",
]

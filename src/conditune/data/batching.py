"""Length-bucketed batching: batches of similar lengths (little padding), in a random order."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def length_bucketed_batches(
    lengths: Sequence[int],
    max_batch: int,
    seed: int,
    epoch: int,
    bucket_size_multiplier: int = 50,
) -> list[list[int]]:
    """Index batches for one epoch, a pure function of (lengths, max_batch, seed, epoch, multiplier).

    The indices are shuffled, cut into chunks of ``max_batch * bucket_size_multiplier``, sorted by
    length within each chunk (ties keep the shuffled order), cut into batches of at most
    ``max_batch``, and the batches are shuffled. Every index appears exactly once; only the last
    batch of each chunk can be short. A different ``epoch`` gives a different order.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if bucket_size_multiplier < 1:
        raise ValueError(f"bucket_size_multiplier must be >= 1, got {bucket_size_multiplier}")
    lengths_arr = np.asarray(list(lengths), dtype=np.int64)
    if lengths_arr.ndim != 1:
        raise ValueError("lengths must be a flat sequence of integers")
    if lengths_arr.size == 0:
        return []
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, 0x5EED])
    order = rng.permutation(lengths_arr.size)
    chunk = max_batch * bucket_size_multiplier
    batches: list[list[int]] = []
    for start in range(0, order.size, chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths_arr[part], kind="stable")]
        batches.extend([int(i) for i in part[b : b + max_batch]] for b in range(0, part.size, max_batch))
    batch_order = rng.permutation(len(batches))
    return [batches[i] for i in batch_order]

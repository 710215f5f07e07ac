"""Batches of similar length: the order in which examples are grouped so that padding costs little compute."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def length_grouped(lengths: Sequence[int], batch_size: int, *, seed: int = 0, window: int = 50) -> list[np.ndarray]:
    """Example indices, one array per batch, each batch holding examples of similar length.

    The examples are shuffled, each window of `window` batches is sorted by length and cut into
    batches, and the batches are shuffled again: every example is used once, batches still mix
    the whole data over an epoch, and a batch pads to a length close to its own examples'
    (Hugging Face's `group_by_length` works the same way). The last batch may be smaller.

    Args:
        lengths: tokens per example. batch_size: examples per batch. seed: the shuffles' seed.
        window: batches per sorted window (1 = no grouping beyond the batch itself).
    """
    for name, value in (("batch_size", batch_size), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths)
    order = rng.permutation(len(lengths))
    span = batch_size * window
    batches = []
    for start in range(0, len(order), span):
        chunk = order[start : start + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]

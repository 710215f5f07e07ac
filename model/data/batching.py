"""Batches of similar length: the order in which examples are grouped so that padding costs little compute, and text batched so."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from model.data.tokenizer import encode, token_lengths


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


def text_batches(
    tok: Tokenizer, texts: Sequence[str], *, batch_size: int, max_len: int, group_by_length: bool = True, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Whole batches of `texts` encoded by `encode`, in their order or grouped by length (`length_grouped`).

    Args:
        tok: the tokenizer. texts: the texts, already shuffled if they should be; a last partial
            batch is dropped. batch_size, max_len: per batch. group_by_length, seed: `length_grouped`.
    """
    n = len(texts) - len(texts) % batch_size
    if group_by_length:
        groups = length_grouped(token_lengths(tok, texts[:n], max_len=max_len), batch_size, seed=seed)
    else:
        groups = [range(i, i + batch_size) for i in range(0, n, batch_size)]
    return [encode(tok, [texts[i] for i in group], max_len=max_len) for group in groups]

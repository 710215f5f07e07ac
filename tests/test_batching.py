"""Length-grouped batching: every example once, similar lengths together, far less padding than random batches."""

import numpy as np
import pytest

from model.data.batching import length_grouped


def padded_tokens(lengths: np.ndarray, groups: list[np.ndarray]) -> int:
    return sum(int(lengths[g].max()) * len(g) for g in groups)


def test_every_example_lands_in_exactly_one_batch_of_the_asked_size():
    lengths = np.random.default_rng(0).integers(3, 60, size=1003)
    groups = length_grouped(lengths, 16, seed=1, window=5)
    assert sorted(np.concatenate(groups).tolist()) == list(range(1003))
    assert sorted(len(g) for g in groups)[1:] == [16] * (len(groups) - 1)  # one smaller tail batch


def test_grouped_batches_pad_far_less_than_random_ones_and_the_seed_reproduces_them():
    lengths = np.random.default_rng(0).geometric(1 / 14, size=3200).clip(3, 64)
    grouped = length_grouped(lengths, 32, seed=2)
    order = np.random.default_rng(2).permutation(len(lengths))
    random_batches = [order[i : i + 32] for i in range(0, len(order), 32)]
    assert padded_tokens(lengths, grouped) < 0.6 * padded_tokens(lengths, random_batches)
    assert padded_tokens(lengths, grouped) < 1.1 * lengths.sum()  # near the real token count
    again = length_grouped(lengths, 32, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(grouped, again))
    assert not all(np.array_equal(a, b) for a, b in zip(grouped, length_grouped(lengths, 32, seed=3)))


def test_batches_are_shuffled_across_windows_not_sorted_by_length():
    lengths = np.arange(640)  # sorted input: a sort without the final shuffle would give rising maxima
    maxima = [int(lengths[g].max()) for g in length_grouped(lengths, 8, seed=0, window=4)]
    assert maxima != sorted(maxima)


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("window", 0), ("batch_size", True)])
def test_bad_sizes_are_refused_by_name(field, value):
    kwargs = {"batch_size": 8, "window": 2, field: value}
    with pytest.raises(ValueError, match=field):
        length_grouped([1, 2, 3], **kwargs)

"""Tests for compress/latency.py and Prune(latency_ms=...): the latency-budget search, on a fake clock."""

import math

import pytest
import torch

from compress import Prune
from compress import latency as latency_module
from compress.latency import candidate, candidates, onnx_latency, shape_for_latency
from compress.pipeline import Context
from compress.prune_shapes import param_count
from model import Config, Transformer

ENCODER = dict(decoder_layers=0, heads=("mlm",), n_layers=4, n_heads=4, ffn_dim=256)


def body(config: Config) -> int:
    """Parameters outside the embeddings: what the fake clock charges for."""
    return param_count(config) - config.vocab_size * config.embed_dim - config.max_positions * config.dim


def fake_clock(calls: list):
    def timer(config: Config) -> float:
        calls.append(config)
        return body(config) / 1e4  # milliseconds, proportional to the weights every token multiplies

    return timer


def test_candidates_run_from_the_whole_model_to_the_smallest_cut():
    config = Config.preset("tiny", **ENCODER)
    order = candidates(config, round_to=32)
    sizes = [body(candidate(config, *cut, 32)) for cut in order]
    assert order[0] == (0, 0.0, 0.0) and sizes[0] == body(config)
    assert sizes == sorted(sizes, reverse=True) and len(set(order)) == len(order)
    assert order[-1][0] == len(config.encoder) - 1  # the smallest keeps one layer


@pytest.mark.parametrize("fraction", [0.3, 0.55, 0.8, 1.0])
def test_the_search_keeps_the_largest_cut_within_the_budget(fraction):
    config = Config.preset("tiny", **ENCODER)
    budget = fraction * body(config) / 1e4
    calls = []
    chosen = shape_for_latency(config, budget, round_to=32, timer=fake_clock(calls))
    within = [cut for cut in candidates(config, 32) if body(candidate(config, *cut, 32)) / 1e4 <= budget]
    assert body(candidate(config, *chosen, 32)) == max(body(candidate(config, *cut, 32)) for cut in within)
    assert len(calls) <= math.ceil(math.log2(len(candidates(config, 32)))) + 2  # a bisection, not a scan


def test_a_budget_nothing_meets_is_refused_naming_the_smallest_time():
    config = Config.preset("tiny", **ENCODER)
    with pytest.raises(ValueError, match=r"latency_ms=0.001: even the smallest cut .* raise the budget"):
        shape_for_latency(config, 0.001, timer=fake_clock([]))


def test_prune_with_a_latency_budget_prunes_the_chosen_cut(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(Config.preset("tiny", **ENCODER)).eval()
    budget = 0.5 * body(model.config) / 1e4
    monkeypatch.setattr(latency_module, "onnx_latency", fake_clock([]))
    layers, heads, ffn = shape_for_latency(model.config, budget, round_to=32, timer=fake_clock([]))
    pruned = Prune(latency_ms=budget, round_to=32)(model, Context(data=[], teacher=None))
    assert len(pruned.config.encoder) == len(model.config.encoder) - layers
    assert body(pruned.config) == body(candidate(model.config, layers, heads, ffn, 32)) <= budget * 1e4


@pytest.mark.parametrize(
    "settings, error, message",
    [
        (dict(latency_ms=0), ValueError, "latency_ms must be a positive, finite"),
        (dict(latency_ms="fast"), TypeError, "latency_ms must be a number"),
        (dict(latency_ms=10.0, heads=0.5), ValueError, "mutually exclusive"),
    ],
)
def test_latency_settings_are_checked(settings, error, message):
    with pytest.raises(error, match=message):
        Prune(**settings)


def test_the_real_clock_times_an_int8_export():
    config = Config.preset("tiny", **ENCODER)
    assert 0 < onnx_latency(config, seq_len=16) < 10_000

"""SQNR in dB, 10*log10(||x||^2 / ||x - x_q||^2): of one tensor, of every quantized layer, and of a model's outputs."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from model.transformer import MODEL_INPUTS, Transformer


def layer_sqnr(model_before: nn.Module, model_after: Transformer) -> dict[str, float]:
    """SQNR in dB of every layer `model_after.config.quantized` lists, against the same layer's weight in `model_before`."""
    return {
        layer.name: sqnr(model_before.get_submodule(layer.name).weight, model_after.get_submodule(layer.name).weight)
        for layer in model_after.config.quantized
    }


@torch.no_grad()
def output_sqnr(a: Transformer, b: Transformer, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
    """SQNR in dB of model `b`'s outputs against model `a`'s (the reference) over `batches`, both in eval mode.

    Keys: "hidden_states" always; "logits" and "decoder_hidden_states" when both models give them.
    Padding positions (attention_mask / decoder_attention_mask 0) are left out of per-token
    outputs: they hold no token. Signal and noise are pooled over all batches.
    """
    signal: dict[str, float] = {}
    noise: dict[str, float] = {}
    modes = a.training, b.training
    a.eval(), b.eval()
    try:
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
            out_a, out_b = a(**inputs), b(**inputs)
            masks = {
                "hidden_states": inputs.get("attention_mask"),
                "decoder_hidden_states": inputs.get("decoder_attention_mask"),
            }
            masks["logits"] = masks["hidden_states"]
            for key, mask in masks.items():
                x, y = getattr(out_a, key), getattr(out_b, key)
                if x is None or y is None:
                    continue
                x, y = x.double(), y.double()
                if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:  # per-token output
                    x, y = x[mask.bool()], y[mask.bool()]
                signal[key] = signal.get(key, 0.0) + float((x**2).sum())
                noise[key] = noise.get(key, 0.0) + float(((x - y) ** 2).sum())
    finally:
        a.train(modes[0]), b.train(modes[1])
    if not signal:
        raise ValueError("output_sqnr needs at least one batch")
    return {key: _decibels(signal[key], noise[key]) for key in signal}


def sqnr(reference: Tensor, approximation: Tensor) -> float:
    """10*log10(||reference||^2 / ||reference - approximation||^2) in dB (inf when equal), computed in float64."""
    x, y = reference.detach().double(), approximation.detach().double()
    return _decibels(float((x**2).sum()), float(((x - y) ** 2).sum()))


def _decibels(signal: float, noise: float) -> float:
    return math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else -math.inf

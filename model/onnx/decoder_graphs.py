"""The decoder graphs export_onnx traces: the first (uncached) step with its key/value outputs, and the step with past keys/values.

Both run the model's own decoder code (`Transformer.embed_decoder`, `Stack` with one `LayerCache`
per layer), so positions, relative biases, shared blocks and quantized layers trace as PyTorch
decodes. Names and shapes: model/onnx/layout.py.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.attention import LayerCache
from model.config import Config
from model.onnx.layout import DECODER_INPUTS, PAST_INPUTS, cache_names
from model.transformer import Transformer


def has_cache(model: Transformer) -> bool:
    """Whether the export gets a decoder with past keys/values: an encoder-decoder with an 'lm' head."""
    return model.decoder is not None and "lm" in model.heads


def _flat(caches: list[LayerCache], cross: bool) -> tuple[Tensor, ...]:
    parts = ("keys", "values") + (("memory_keys", "memory_values") if cross else ())
    return tuple(getattr(c, part) for c in caches for part in parts)


class DecoderGraph(nn.Module):
    """Decoder stack (causal self-attention, cross-attention to the encoder output), the LM head and, with it, every layer's keys and values."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, decoder_input_ids, encoder_hidden_states, encoder_attention_mask):
        m = self.model
        caches = [LayerCache() for _ in m.decoder.share] if has_cache(m) else None
        y, _, _ = m.decoder(
            m.embed_decoder(decoder_input_ids),  # BART and mBART have positions of their own
            None,
            causal=True,
            memory=encoder_hidden_states,
            memory_mask=encoder_attention_mask.bool(),
            backend="sdpa",
            caches=caches,
        )
        if caches is None:
            return (y,)
        return (y, m.heads["lm"](y, m.embeddings), *_flat(caches, cross=True))


class DecoderWithPastGraph(nn.Module):
    """One decoding step: the last of decoder_input_ids (B,P+1) over P cached keys/values; returns its logits and the grown cache."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, decoder_input_ids, encoder_attention_mask, past_key_values: list[Tensor]):
        m = self.model
        caches = [LayerCache(*past_key_values[4 * i : 4 * i + 4]) for i in range(len(m.decoder.share))]
        y, _, _ = m.decoder(
            m.embed_decoder(decoder_input_ids, start=caches[0].length),  # (B, 1, dim)
            None,
            causal=False,  # one query, which sees every key
            # The cross-attention reads its cached keys; `memory` only has to be a tensor to mark it as cross.
            memory=caches[0].memory_keys,
            memory_mask=encoder_attention_mask.bool(),
            backend="sdpa",
            caches=caches,
        )
        return (m.heads["lm"](y, m.embeddings), *_flat(caches, cross=False))


def example_axes(config: Config) -> tuple[torch.export.Dim, torch.export.Dim, Tensor]:
    """The batch and sequence axes every graph's example shares, and its (2, T) attention mask with row 1 padded."""
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=config.max_positions)
    length = min(9, config.max_positions)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length // 2 + 1 :] = 0
    return batch, seq, mask


def decoder_example(model: Transformer, graph: str) -> tuple[tuple, dict, list[str], list[str]]:
    """Example inputs (batch 2, so the exporter keeps axes symbolic), dynamic shapes, input and output names of one decoder graph.

    Args:
        model: the export's fp32 copy.
        graph: "decoder" or "decoder_with_past".
    """
    config = model.config
    batch, seq, mask = example_axes(config)
    length = mask.shape[1]
    layers = len(model.decoder.share)
    if graph == "decoder":
        dec = torch.randint(0, config.vocab_size, (2, max(2, length - 2)))
        memory = torch.randn(2, length, config.dim)
        decoder_seq = torch.export.Dim("decoder_sequence", max=config.max_positions)
        shapes = {
            "decoder_input_ids": {0: batch, 1: decoder_seq},
            "encoder_hidden_states": {0: batch, 1: seq},
            "encoder_attention_mask": {0: batch, 1: seq},
        }
        outputs = ["decoder_hidden_states"]
        if has_cache(model):
            outputs += ["lm_logits", *cache_names(layers, "present")]
        return (dec, memory, mask), shapes, list(DECODER_INPUTS), outputs
    past = torch.export.Dim("past_sequence", max=config.max_positions - 1)
    cached = min(3, config.max_positions - 1)
    past_values = []
    for shape in config.decoder:
        own = torch.randn(2, shape.n_heads, cached, shape.head_dim)
        cross = torch.randn(2, shape.n_heads, length, shape.head_dim)
        past_values += [own, own.clone(), cross, cross.clone()]
    past_shapes = [{0: batch, 2: past}, {0: batch, 2: past}, {0: batch, 2: seq}, {0: batch, 2: seq}] * layers
    shapes = {
        "decoder_input_ids": {0: batch, 1: past + 1},
        "encoder_attention_mask": {0: batch, 1: seq},
        "past_key_values": past_shapes,
    }
    dec = torch.randint(0, config.vocab_size, (2, cached + 1))
    inputs = [*PAST_INPUTS, *cache_names(layers, "past_key_values")]
    outputs = ["lm_logits", *cache_names(layers, "present", cross=False)]
    return (dec, mask, past_values), shapes, inputs, outputs

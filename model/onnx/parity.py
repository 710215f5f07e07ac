"""The parity check: ONNX Runtime on an exported graph against the PyTorch model (fp32, exact attention), output by output.

With a decoder-with-past graph it also checks the cached decoding step: the decoder graph caches
the first P target tokens (its present.* outputs), the with-past graph runs token P over them,
and its logits must equal the PyTorch model's at position P, for several P (`past_lengths`).
"""

from __future__ import annotations

import copy
import os

import numpy as np
import torch
import torch.nn.functional as F

from model.onnx import layout
from model.onnx.export_ops import has_dynamic
from model.onnx.runtime import OrtModel
from model.transformer import Transformer

PARITY_BATCHES = (1, 3)
PARITY_LENGTHS = (8, 33)  # plus one near max_positions (capped by `max_len`)
CACHED = "cached_lm_logits"  # the with-past graph's logits, in `check_parity`'s report
DYNAMIC_RTOL = 1e-2  # see check_parity


class ParityError(ValueError):
    """ONNX Runtime's outputs differ from PyTorch's by more than the tolerance."""


def fp32_copy(model: Transformer) -> Transformer:
    """An fp32, eval-mode copy with exact attention; the tokenizer is not copied (the graph does not need it)."""
    copied = copy.deepcopy(model, memo={id(model.tokenizer): None})
    copied.attention_backend = "sdpa"
    return copied.float().eval().requires_grad_(False)


def sentence_embedding(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' mean pooling over the mask's tokens, then L2 normalization: (B,T,dim) -> (B,dim)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(mean, p=2, dim=1)


def parity_batches(config, max_len: int) -> list[dict[str, torch.Tensor]]:
    """The padded batches the parity check runs: batch {1,3} x seq {8, 33, min(max_positions, max_len)}.

    Row lengths T, T//2+1 and T-3 (so batch 3 mixes padding amounts); token types switch to 1
    halfway when the model has two or more; decoder inputs (for encoder-decoder models) are
    the encoder ids. Seeded, so every export checks the same numbers.
    """
    generator = torch.Generator().manual_seed(0)
    lengths = sorted({min(t, config.max_positions) for t in (*PARITY_LENGTHS, min(config.max_positions, max_len))})
    batches = []
    for b in PARITY_BATCHES:
        for t in lengths:
            ids = torch.randint(0, config.vocab_size, (b, t), generator=generator)
            mask = torch.zeros_like(ids)
            for row, n in enumerate((t, t // 2 + 1, max(1, t - 3))[:b]):
                mask[row, :n] = 1
            batch = {"input_ids": ids, "attention_mask": mask}
            if config.type_vocab_size >= 2:
                types = torch.zeros_like(ids)
                types[:, t // 2 :] = 1
                batch["token_type_ids"] = types
            if config.decoder:
                batch["decoder_input_ids"] = ids
            batches.append(batch)
    return batches


@torch.no_grad()
def check_parity(
    model: Transformer, path: str | os.PathLike, *, atol: float = 1e-4, max_len: int = 256
) -> tuple[dict[str, float], list[tuple[int, int]]]:
    """Compare ONNX Runtime on the export at `path` with `model` (fp32, exact attention) on `parity_batches`.

    Returns (output name -> max abs difference over all batches, the (batch, seq) shapes run).
    Raises ParityError naming the first output off by more than `atol`. Models with int8-dynamic
    layers round activations to int8 at run time, where a 1e-7 difference upstream can round one
    value the other way and move an output by a quantization step; they are held to
    max(atol, 1e-2 * max|output|) instead.
    """
    reference = fp32_copy(model)
    runner = OrtModel(path)
    rtol = DYNAMIC_RTOL if has_dynamic(reference) else 0.0
    worst: dict[str, float] = {}
    shapes = []
    for batch in parity_batches(reference.config, max_len):
        if runner.decoder is None:
            batch.pop("decoder_input_ids", None)
        expected, got = reference(**batch), runner(batch)
        shape = tuple(batch["input_ids"].shape)
        shapes.append(shape)
        pairs = list(output_pairs(expected, got))
        if runner.decoder_with_past is not None:
            ids, memory = batch["decoder_input_ids"].numpy(), np.asarray(got.hidden_states)
            for past in past_lengths(ids.shape[1]):
                have = cached_logits(runner, memory, batch["attention_mask"].numpy(), ids, past)
                pairs.append((CACHED, expected.head_logits["lm"][:, past], torch.from_numpy(have)))
        if layout.SENTENCE_EMBEDDING in runner.encoder.outputs:
            feeds = runner.encoder_feeds(batch)
            embedding = runner.encoder.session.run([layout.SENTENCE_EMBEDDING], feeds)[0]
            want = sentence_embedding(expected.hidden_states, batch["attention_mask"])
            pairs.append((layout.SENTENCE_EMBEDDING, want, torch.from_numpy(embedding)))
        for name, want, have in pairs:
            diff = float((want - have).abs().max())
            allowed = max(atol, rtol * float(want.abs().max()))
            if not np.isfinite(diff) or diff > allowed:
                raise ParityError(
                    f"ONNX Runtime output {name} differs from PyTorch by {diff:.3g} (allowed {allowed:.3g}) at batch x seq {shape}"
                )
            worst[name] = max(worst.get(name, 0.0), diff)
    return worst, shapes


def past_lengths(length: int) -> list[int]:
    """The cached lengths the parity check decodes after, for targets of `length` tokens: 1, about half, all but one."""
    return sorted({p for p in (1, length // 2, length - 1) if 1 <= p < length})


def past_feeds(
    runner: OrtModel, memory: np.ndarray, mask: np.ndarray, ids: np.ndarray, past: int
) -> dict[str, np.ndarray]:
    """The with-past graph's feeds for ids[:, past], the decoder graph having cached ids[:, :past] (its present.* outputs).

    Args:
        runner: an OrtModel with decoder and decoder-with-past graphs.
        memory, mask: the encoder's output (B,T,dim) and attention mask (B,T) int64.
        ids: decoder input ids (B,S) int64; past: how many of them the cache holds (1 <= past < S).
    """
    first = {"decoder_input_ids": ids[:, :past], "encoder_hidden_states": memory, "encoder_attention_mask": mask}
    decoder = runner.decoder
    out = dict(zip(decoder.outputs, decoder.session.run(list(decoder.outputs), first)))
    return layout.past_from_present(out) | {"decoder_input_ids": ids[:, : past + 1], "encoder_attention_mask": mask}


def cached_logits(runner: OrtModel, memory: np.ndarray, mask: np.ndarray, ids: np.ndarray, past: int) -> np.ndarray:
    """The with-past graph's next-token logits (B,vocab) for ids[:, past] after the first `past` are cached (see `past_feeds`)."""
    feeds = past_feeds(runner, memory, mask, ids, past)
    return runner.decoder_with_past.session.run(["lm_logits"], feeds)[0][:, -1]


def output_pairs(expected, got):
    """(output name, PyTorch value, ONNX Runtime value) for every output both produced."""
    yield "hidden_states", expected.hidden_states, got.hidden_states
    if got.decoder_hidden_states is not None:
        yield "decoder_hidden_states", expected.decoder_hidden_states, got.decoder_hidden_states
    for head, value in got.head_logits.items():
        yield f"{head}_logits", expected.head_logits[head], value

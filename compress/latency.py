"""A latency budget for Prune: time candidate shapes on ONNX Runtime on this machine and keep the largest that meets it.

A candidate is a uniform cut: `layers` whole layers dropped, a fraction of every layer's heads
and of its FFN channels removed. Candidates are ordered by their parameters outside the
embeddings (the weights every token multiplies), largest first; latency falls with them, so a
bisection over that order finds the largest candidate within the budget in a few timings. Each
timing builds the candidate with random weights, exports it, quantizes it with ONNX Runtime
(int8 dynamic, as it is deployed) and runs it on one batch; the weights do not change the time.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from compress.evaluate.measure import time_onnx
from compress.prune_shapes import STACKS, kept_heads, kept_width, param_count
from model.config import Config, LayerShape
from model.transformer import Transformer

RATIOS = (0.0, 0.25, 0.5, 0.75)

Timer = Callable[[Config], float]


def candidate(config: Config, layers: int, heads: float, ffn: float, round_to: int) -> Config:
    """The Config of `config` with `layers` encoder layers dropped and `heads`/`ffn` of every layer removed.

    Which layers Prune drops depends on importance; for timing only their number matters, so the
    candidate keeps the first ones, each running its own block.
    """

    def cut(shapes: tuple[LayerShape, ...]) -> tuple[LayerShape, ...]:
        return tuple(
            LayerShape(kept_heads(s.n_heads, heads), s.head_dim, kept_width(s.ffn_dim, ffn, round_to)) for s in shapes
        )

    encoder = cut(tuple(config.encoder[: len(config.encoder) - layers]))
    changes = {"encoder": encoder, "encoder_share": tuple(range(len(encoder)))}
    if config.decoder:
        changes |= {"decoder": cut(config.decoder), "decoder_share": tuple(range(len(config.decoder)))}
    return config.replace(**changes)


def candidates(config: Config, round_to: int) -> list[tuple[int, float, float]]:
    """(layers, heads, ffn) cuts, distinct in shape, largest (most parameters outside the embeddings) first."""
    seen: dict[tuple, tuple[int, tuple[int, float, float]]] = {}
    for layers in range(len(config.encoder)):
        for heads in RATIOS:
            if any(kept_heads(s.n_heads, heads, clamp=False) < 1 for name in STACKS for s in getattr(config, name)):
                continue
            for ffn in RATIOS:
                shape = candidate(config, layers, heads, ffn, round_to)
                key = (shape.encoder, shape.decoder)
                if key not in seen:
                    seen[key] = (param_count(shape), (layers, heads, ffn))
    return [cut for _, cut in sorted(seen.values(), key=lambda item: -item[0])]


def shape_for_latency(
    config: Config, budget_ms: float, *, round_to: int = 32, timer: Timer | None = None
) -> tuple[int, float, float]:
    """The largest uniform cut (layers, heads, ffn) whose measured latency is at most `budget_ms`.

    Args:
        config: the model's Config.
        budget_ms: the latency to meet, in milliseconds, as `timer` measures it.
        round_to: FFN widths are rounded to multiples of it (as Prune does).
        timer: Config -> milliseconds; None = `onnx_latency` (ONNX Runtime int8, batch 1 x seq 128).

    Returns:
        (layers dropped, heads ratio, ffn ratio). Raises ValueError when not even the smallest
        candidate meets the budget.
    """
    timer = timer or onnx_latency
    order = candidates(config, round_to)
    measured: dict[int, float] = {}

    def fits(i: int) -> bool:
        if i not in measured:
            measured[i] = timer(candidate(config, *order[i], round_to))
        return measured[i] <= budget_ms

    if not fits(len(order) - 1):
        smallest = order[-1]
        raise ValueError(
            f"latency_ms={budget_ms}: even the smallest cut (layers={smallest[0]}, heads={smallest[1]}, "
            f"ffn={smallest[2]}) takes {measured[len(order) - 1]:.2f} ms here; raise the budget"
        )
    low, high = -1, len(order) - 1  # order[high] fits; everything up to low is known not to
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return order[high]


def onnx_latency(config: Config, *, batch_size: int = 1, seq_len: int = 128, threads: int | None = None) -> float:
    """Median milliseconds of the model `config` describes, exported and quantized int8 by ONNX Runtime, on one batch.

    Args:
        config: the shape to time (random weights; a quantized config is timed as it stands).
        batch_size, seq_len: the batch (capped at the model's max_positions).
        threads: ONNX Runtime intra-op threads (None = its default).
    """
    from model.onnx.export import export_onnx
    from model.onnx.ort_quantize import quantize_onnx
    from model.onnx.runtime import OrtModel

    seq_len = min(seq_len, config.max_positions)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(Transformer(config).eval(), Path(tmp) / "model.onnx", verify=False)
        path = Path(tmp) / "model.onnx"
        if not config.quantized:
            path = quantize_onnx(path, Path(tmp) / "int8" / "model.onnx", "int8-dynamic").paths["encoder"]
        runner = OrtModel(path, threads=threads)
        return min(time_onnx(runner, batch, warmup=3, repeat=10)["p50_ms"] for _ in range(3))

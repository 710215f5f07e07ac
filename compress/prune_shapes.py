"""Shapes for Prune: widths kept by a ratio, parameter counts, and the model rebuilt from its pruned weights' shapes."""

from __future__ import annotations

import math

import torch
from torch import nn

from model.config import Config, LayerShape
from model.positions import sinusoid
from model.rebuild import rebuild
from model.transformer import Transformer

STACKS = ("encoder", "decoder")


def kept_heads(n_heads: int, ratio: float, *, clamp: bool = True) -> int:
    """Heads left after removing round(ratio * n_heads); at least 1 unless clamp=False."""
    kept = n_heads - math.floor(ratio * n_heads + 0.5)
    return max(kept, 1) if clamp else kept


def kept_width(width: int, ratio: float, round_to: int) -> int:
    """Channels left after removing `ratio` of `width`, rounded to a multiple of round_to where possible."""
    if ratio == 0:
        return width
    kept = width * (1 - ratio)
    if width >= round_to:
        return min(width, round_to * max(1, math.floor(kept / round_to + 0.5)))
    return max(1, math.floor(kept + 0.5))


def _width(model: Transformer) -> int:
    """The model width, read off the weights (the first encoder block's query projection input)."""
    return model.encoder.blocks[0].self_attn.q_proj.weight.shape[1]


def block_shapes(config: Config, stack: str) -> list[LayerShape]:
    """The shape of each weight block of a stack (block b is first used by layer share.index(b))."""
    share = getattr(config, f"{stack}_share")
    return [getattr(config, stack)[share.index(b)] for b in range(len(set(share)))]


def param_count(config: Config) -> int:
    """Unique parameters of a model with this config, counted on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(config).parameters())


def reshaped(pruned: Transformer, drop: dict[str, set[int]]) -> tuple[Transformer, dict[str, list[int]]]:
    """A fresh Transformer whose Config is read off `pruned`'s weight shapes, holding those weights.

    drop: layer positions per stack to remove; blocks no layer runs any more go, the rest are
    renumbered in order of first use. Returns the model and, per stack, the old index of each
    new block.
    """
    config, state = pruned.config, pruned.state_dict()
    changes: dict = {"dim": _width(pruned), "embed_dim": pruned.embeddings.word.weight.shape[1]}
    kept_blocks: dict[str, list[int]] = {}
    for name in STACKS:
        stack = getattr(pruned, name)
        if stack is None:
            kept_blocks[name] = []
            continue
        old = block_shapes(config, name)
        shapes = [_read_shape(block, old[b].head_dim, f"{name}.blocks.{b}") for b, block in enumerate(stack.blocks)]
        share = getattr(config, f"{name}_share")
        keep = [i for i in range(len(share)) if i not in drop.get(name, ())]
        kept_blocks[name] = list(dict.fromkeys(share[i] for i in keep))
        new_index = {b: n for n, b in enumerate(kept_blocks[name])}
        changes[name] = tuple(shapes[share[i]] for i in keep)
        changes[f"{name}_share"] = tuple(new_index[share[i]] for i in keep)
        state = _renumber(state, f"{name}.blocks.", new_index)
    return rebuild(pruned, config.replace(**changes), state), kept_blocks


def tabulated_positions(model: Transformer) -> Transformer:
    """`model` with its sinusoid positions (Marian) stored as an "absolute" table holding the same values.

    Pruning the width then keeps each remaining channel's own position values; a sinusoid
    recomputed at the narrower width would have other frequencies.
    """
    config, state = model.config, model.state_dict()
    word = model.embeddings.word.weight
    table = sinusoid(config.max_positions, config.dim, word.device).to(word.dtype)
    state["embeddings.position.weight"] = table
    if model.decoder_embeddings is not None:
        state["decoder_embeddings.position.weight"] = table.clone()
    return rebuild(model, config.replace(positions="absolute"), state)


def _read_shape(block: nn.Module, head_dim: int, where: str) -> LayerShape:
    """A block's LayerShape, read from its weights."""
    inner = block.self_attn.q_proj.weight.shape[0]
    cross = block.cross_attn.q_proj.weight.shape[0] if block.cross_attn is not None else inner
    if inner % head_dim or cross != inner:
        raise RuntimeError(f"{where}: attention widths {inner}/{cross} are not whole {head_dim}-wide heads")
    return LayerShape(n_heads=inner // head_dim, head_dim=head_dim, ffn_dim=block.ffn.up.weight.shape[0])


def _renumber(state: dict[str, torch.Tensor], prefix: str, new_index: dict[int, int]) -> dict[str, torch.Tensor]:
    """Rename `prefix{old}.…` keys to `prefix{new}.…`; drop the blocks not in new_index."""
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        block, rest = key[len(prefix) :].split(".", 1)
        if int(block) in new_index:
            out[f"{prefix}{new_index[int(block)]}.{rest}"] = value
    return out

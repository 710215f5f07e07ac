"""GPTQ: error-compensating rounding of Linear weights to the int8 / int4 grids, from calibration inputs.

Rounding each weight to its nearest grid point minimizes the error of the weights; GPTQ
(Frantar et al., 2022) minimizes the error of the layer's outputs on real inputs instead,
||X W^T - X Q^T||^2 summed over calibration tokens x. With H = X^T X (in x in) it rounds the
input columns of W one at a time and spreads each column's rounding error over the columns not
yet rounded, in proportion to H^-1 (through its upper Cholesky factor), so correlated inputs
cancel each other's errors; by default the columns go in order of decreasing input energy
(the "act-order" of the reference implementation). The grid is the one `model.quantized`
stores (same formulas, one scale, and for int4 a zero-point, per row and group of inputs, set
from the original weights, or in column order from the weights as they stand when the rounding
reaches the group; int4 ranges are searched for the least rounding error), so the result drops
into `Int8Linear` / `Int4Linear` unchanged. `round_sequentially` gathers H for a model's
Linears in order, each from inputs that pass through the layers before it already rounded (the
sequential GPTQ order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from model.quantized import pack, quantize_int4, quantize_int8
from model.transformer import MODEL_INPUTS

Tensor = torch.Tensor
BLOCK = 128  # columns per lazy-update block
RANGE_SHRINKS = torch.linspace(1.0, 0.75, 26).tolist()  # int4 ranges searched, as fractions of the full range


def round_int8(
    w: Tensor, hessian: Tensor, group_size: int | None = None, *, damp: float = 0.01, act_order: bool = True
) -> tuple[Tensor, Tensor]:
    """GPTQ rounding of w (out, in) to `quantize_int8`'s format: (q (out, in) int8, scale (out,) or (out, in/g))."""

    def grid(block: Tensor) -> tuple[Tensor, Tensor]:
        scale = quantize_int8(block)[1]
        return scale, torch.zeros_like(scale)

    q, scale, _ = _gptq(w, hessian, group_size, grid, -127, 127, damp, act_order)
    return q.to(torch.int8), scale if group_size else scale.squeeze(1)


def round_int4(
    w: Tensor, hessian: Tensor, group_size: int, *, symmetric: bool = False, damp: float = 0.01, act_order: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ rounding of w (out, in) to `quantize_int4`'s format: (packed (out, in/2) uint8, scale, zero (out, in/g))."""

    def grid(block: Tensor) -> tuple[Tensor, Tensor]:
        return _searched_int4_grid(block, symmetric)

    q, scale, zero = _gptq(w, hessian, group_size, grid, 0, 15, damp, act_order)
    return pack(q.to(torch.uint8), 4), scale, zero.to(torch.uint8)


def _searched_int4_grid(block: Tensor, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Per row of `block` (out, g): the int4 scale and zero-point of the range `quantize_int4` would take, shrunk by
    the factor of RANGE_SHRINKS whose nearest rounding of the row has the least squared error (clipping a
    few large weights buys a finer step for the rest: 16 levels are coarse)."""
    best_error = scale = zero = None
    for shrink in RANGE_SHRINKS:
        _, s, z = quantize_int4(block * shrink, block.shape[1], symmetric)  # min/max (or max|w|) times shrink
        s, z = s.squeeze(1), z.squeeze(1).float()
        rounded = (torch.clamp(torch.round(block / s[:, None]) + z[:, None], 0, 15) - z[:, None]) * s[:, None]
        error = (rounded - block).square().sum(1)
        if best_error is None:
            best_error, scale, zero = error, s, z
        else:
            better = error < best_error
            best_error, scale, zero = torch.where(better, error, best_error), torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def _gptq(
    w: Tensor, hessian: Tensor, group_size: int | None, grid: Callable[[Tensor], tuple[Tensor, Tensor]],
    low: int, high: int, damp: float, act_order: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The GPTQ loop: integers q (out, in) in [low, high], scale and zero (out, groups); w ~ (q - zero) * scale.

    act_order: round the inputs in order of decreasing energy (diagonal of H), so the columns
    that matter most are rounded while there are the most columns left to take their errors. The
    groups' members are then scattered over the order, so every group's grid is set up front from
    the original weights; in column order it is set when the rounding reaches the group.
    """
    rows, cols = w.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"the Hessian must be ({cols}, {cols}) for a weight with {cols} inputs; got {tuple(hessian.shape)}")
    group = group_size or cols
    if cols % group:
        raise ValueError(f"in_features {cols} is not divisible by group_size {group}")
    w = w.detach().double().clone()
    h = hessian.detach().double().clone()
    dead = h.diagonal() == 0  # inputs that were always 0: their errors cannot show, they spread nothing
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * h.diagonal().mean())
    scales = w.new_empty(rows, cols // group)
    zeros = torch.empty_like(scales)

    def set_grid(g: int, weights: Tensor) -> None:
        scale, zero = grid(weights.float())
        scales[:, g], zeros[:, g] = scale.double(), zero.double()

    if act_order:
        for g in range(cols // group):
            set_grid(g, w[:, g * group: (g + 1) * group])
        order = torch.argsort(h.diagonal(), descending=True, stable=True)
    else:
        order = torch.arange(cols)
    w, h = w[:, order], h[order][:, order]
    group_of = (order // group).tolist()  # the group of the column rounded at each step
    # Upper Cholesky factor of H^-1: row i holds how column i's error is spread over the columns after it.
    spread = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.empty_like(w)
    block = group if group <= BLOCK else BLOCK  # a group never starts inside a block, so its grid sees updated weights
    for start in range(0, cols, block):
        end = min(start + block, cols)
        errors = w.new_empty(rows, end - start)
        for col in range(start, end):
            g = group_of[col]
            if not act_order and col % group == 0:
                set_grid(g, w[:, col: col + group])
            s, z = scales[:, g], zeros[:, g]
            q[:, col] = torch.clamp(torch.round(w[:, col] / s) + z, low, high)
            error = (w[:, col] - (q[:, col] - z) * s) / spread[col, col]
            w[:, col:end] -= error[:, None] * spread[col, col:end][None, :]
            errors[:, col - start] = error
        w[:, end:] -= errors @ spread[start:end, end:]  # the block's errors reach the later columns at once
    q[:, order] = q.clone()  # back to the inputs' own order
    return q, scales.float(), zeros.float()


@torch.no_grad()
def round_sequentially(
    model: nn.Module, names: Iterable[str], batches: list[dict[str, Tensor]],
    round_layer: Callable[[str, Tensor], Tensor],
) -> None:
    """Round the Linears `names` of `model` in order, each from the inputs the layers before it, already rounded, give it.

    For each name: H = sum of x x^T over the real tokens of `batches` that reach the layer (padding
    left out: the encoder side's by `attention_mask`, the decoder side's by `decoder_attention_mask`),
    then `round_layer(name, H)` returns the layer's rounded float weight, which replaces the weight
    in `model` (a working copy the caller owns, in eval mode), so the next layers see it.
    """
    for name in names:
        module = model.get_submodule(name)
        hessian = torch.zeros(module.in_features, module.in_features, dtype=torch.float64, device=module.weight.device)
        mask_key = input_mask_key(name)
        stop_early = False  # set once the first batch shows the layer runs once per forward (not a shared block)
        for batch in batches:
            mask, calls = batch.get(mask_key), 0

            def accumulate(_module, args, mask=mask) -> None:
                nonlocal calls
                calls += 1
                x = real_tokens(args[0].detach(), mask).double()
                hessian.add_(x.T @ x)
                if stop_early:
                    raise _Reached  # the rest of the forward pass cannot change this layer's input

            hook = module.register_forward_pre_hook(accumulate)
            try:
                model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS})
            except _Reached:
                pass
            finally:
                hook.remove()
            stop_early = calls == 1
        module.weight.copy_(round_layer(name, hessian).to(module.weight.dtype))


class _Reached(Exception):
    """Ends a calibration forward pass once the layer being calibrated has seen its input."""


def real_tokens(x: Tensor, mask: Tensor | None) -> Tensor:
    """A Linear's input x (..., in) as rows (N, in): only the tokens `mask` marks real where it covers x's (batch, seq)."""
    if x.dim() == 3 and mask is not None and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


def input_mask_key(name: str) -> str:
    """Which attention mask marks the real tokens of a Linear's input: the decoder stream's or the encoder's."""
    reads_encoder = name.endswith(("cross_attn.k_proj", "cross_attn.v_proj"))
    on_decoder = name.startswith("decoder.") or name.startswith("heads.lm")
    return "decoder_attention_mask" if on_decoder and not reads_encoder else "attention_mask"

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

Asymmetric calibration (GPTAQ, Li et al., 2025): those rounded inputs X~ differ from the float
model's X by the noise of the layers before, and the layer's output should match the float
model's, X W^T, not X~ W^T. With C = X^T X~ and the damping d, ||X W^T - X~ Q^T||^2 + d ||Q - W||^2
= ||X~ (W* - Q)^T||^2 + d ||W* - Q||^2 + const for the target W* = W + W (C - H) (H + d I)^-1, so
GPTQ (on the damped H) rounds W* instead of W (`cross=C`): each layer also cancels, as far as its
inputs allow, the error of those before it, and keeps W where the calibration inputs say nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from model.quant_math import pack, quantize_int4, quantize_int8
from model.transformer import MODEL_INPUTS

BLOCK = 128  # columns per lazy-update block
RANGE_SHRINKS = torch.linspace(1.0, 0.75, 26).tolist()  # int4 ranges searched, as fractions of the full range


def round_int8(
    w: Tensor,
    hessian: Tensor,
    group_size: int | None = None,
    *,
    cross: Tensor | None = None,
    damp: float = 0.01,
    act_order: bool = True,
) -> tuple[Tensor, Tensor]:
    """GPTQ rounding of w (out, in) to `quantize_int8`'s format: (q (out, in) int8, scale (out,) or (out, in/g)).

    hessian: H = X~^T X~ over the calibration inputs; cross: C = X^T X~ with X the float model's inputs
    (asymmetric calibration), or None."""

    def grid(block: Tensor) -> tuple[Tensor, Tensor]:
        scale = quantize_int8(block)[1]
        return scale, torch.zeros_like(scale)

    q, scale, _ = _gptq(w, hessian, cross, group_size, grid, -127, 127, damp, act_order)
    return q.to(torch.int8), scale if group_size else scale.squeeze(1)


def round_int4(
    w: Tensor,
    hessian: Tensor,
    group_size: int,
    *,
    symmetric: bool = False,
    cross: Tensor | None = None,
    damp: float = 0.01,
    act_order: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ rounding of w (out, in) to `quantize_int4`'s format: (packed (out, in/2) uint8, scale, zero (out, in/g));
    hessian and cross as in `round_int8`."""

    def grid(block: Tensor) -> tuple[Tensor, Tensor]:
        return _searched_int4_grid(block, symmetric)

    q, scale, zero = _gptq(w, hessian, cross, group_size, grid, 0, 15, damp, act_order)
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
            best_error, scale, zero = (
                torch.where(better, error, best_error),
                torch.where(better, s, scale),
                torch.where(better, z, zero),
            )
    return scale, zero


def _gptq(
    w: Tensor,
    hessian: Tensor,
    cross: Tensor | None,
    group_size: int | None,
    grid: Callable[[Tensor], tuple[Tensor, Tensor]],
    low: int,
    high: int,
    damp: float,
    act_order: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The GPTQ loop: integers q (out, in) in [low, high], scale and zero (out, groups); w ~ (q - zero) * scale
    (with `cross`, the target w + w (cross - H) (H + d I)^-1 ~ (q - zero) * scale).

    act_order: round the inputs in order of decreasing energy (diagonal of H), so the columns
    that matter most are rounded while there are the most columns left to take their errors. The
    groups' members are then scattered over the order, so every group's grid is set up front from
    the original weights; in column order it is set when the rounding reaches the group.
    """
    rows, cols = w.shape
    for what, matrix in (("the Hessian", hessian), ("the cross term", cross)):
        if matrix is not None and tuple(matrix.shape) != (cols, cols):
            raise ValueError(
                f"{what} must be ({cols}, {cols}) for a weight with {cols} inputs; got {tuple(matrix.shape)}"
            )
    group = group_size or cols
    if cols % group:
        raise ValueError(f"in_features {cols} is not divisible by group_size {group}")
    w = w.detach().double().clone()
    h = hessian.detach().double().clone()
    dead = h.diagonal() == 0  # inputs that were always 0: their errors cannot show, they spread nothing
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * h.diagonal().mean())
    if cross is not None:  # dead inputs have zero rows and columns in C - H: they add nothing
        w += torch.linalg.solve(h, (cross.double() - hessian.double()).T @ w.T).T  # w (C - H) H^-1, H symmetric
    scales = w.new_empty(rows, cols // group)
    zeros = torch.empty_like(scales)

    def set_grid(g: int, weights: Tensor) -> None:
        scale, zero = grid(weights.float())
        scales[:, g], zeros[:, g] = scale.double(), zero.double()

    if act_order:
        for g in range(cols // group):
            set_grid(g, w[:, g * group : (g + 1) * group])
        order = torch.argsort(h.diagonal(), descending=True, stable=True)
    else:
        order = torch.arange(cols)
    w, h = w[:, order], h[order][:, order]
    group_of = (order // group).tolist()  # the group of the column rounded at each step
    # Upper Cholesky factor of H^-1: row i holds how column i's error is spread over the columns after it.
    spread = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.empty_like(w)
    block = min(group, BLOCK)  # a group never starts inside a block, so its grid sees updated weights
    for start in range(0, cols, block):
        end = min(start + block, cols)
        errors = w.new_empty(rows, end - start)
        for col in range(start, end):
            g = group_of[col]
            if not act_order and col % group == 0:
                set_grid(g, w[:, col : col + group])
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
    model: nn.Module,
    names: Iterable[str],
    batches: list[dict[str, Tensor]],
    round_layer: Callable[[str, Tensor, Tensor | None], Tensor],
    *,
    reference: nn.Module | None = None,
) -> None:
    """Round the Linears `names` of `model` in order, each from the inputs the layers before it, already rounded, give it.

    For each name: H = sum of x~ x~^T over the real tokens of `batches` that reach the layer (padding
    left out: the encoder side's by `attention_mask`, the decoder side's by `decoder_attention_mask`),
    and with a `reference` model (the float model, in eval mode) the cross term C = sum of x x~^T,
    x its input to the same layer at the same use; then `round_layer(name, H, C or None)` returns the
    layer's rounded float weight, which replaces the weight in `model` (a working copy the caller
    owns, in eval mode), so the next layers see it. Consecutive names that read the very same input
    tensors (an attention's q, k and v projections) share one H and C, gathered once.
    """
    if not batches:
        raise ValueError("round_sequentially needs at least one calibration batch")
    for group in _groups_sharing_inputs(model, list(names), batches[0]):
        module = model.get_submodule(group[0])
        hessian = torch.zeros(module.in_features, module.in_features, dtype=torch.float64, device=module.weight.device)
        cross = None if reference is None else torch.zeros_like(hessian)
        mask_key = input_mask_key(group[0])
        once = False  # set once the first batch shows the layer runs once per forward (not a shared block)
        for batch in batches:
            mask = batch.get(mask_key)
            rounded = [real_tokens(x, mask).double() for x in _layer_inputs(model, group[0], batch, once)]
            for x in rounded:
                hessian.add_(x.T @ x)
            if reference is not None:
                for x_float, x in zip(_layer_inputs(reference, group[0], batch, once), rounded, strict=True):
                    cross.add_(real_tokens(x_float, mask).double().T @ x)
            once = len(rounded) == 1
        for name in group:  # none of them changes the others' inputs: they exist before any of them runs
            weight = model.get_submodule(name).weight
            weight.copy_(round_layer(name, hessian, cross).to(weight.dtype))


def _groups_sharing_inputs(model: nn.Module, names: list[str], batch: dict[str, Tensor]) -> list[list[str]]:
    """`names` split into runs of consecutive names whose modules receive the same tensor objects, call by call, in
    a forward pass of `model` on `batch`."""
    inputs: dict[str, list[Tensor]] = {name: [] for name in names}
    run_with_input_hooks(model, batch, {name: seen.append for name, seen in inputs.items()})
    groups: list[list[str]] = []
    for name in names:
        first = inputs[groups[-1][0]] if groups else []
        same = len(first) == len(inputs[name]) > 0 and all(a is b for a, b in zip(first, inputs[name]))
        if same:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def _layer_inputs(model: nn.Module, name: str, batch: dict[str, Tensor], once: bool) -> list[Tensor]:
    """The inputs the module `name` receives, one per call, in a forward pass of `model` on `batch`; with `once`
    the pass stops at the first call (the rest of it cannot change the layer's input)."""
    seen: list[Tensor] = []

    def record(x: Tensor) -> None:
        seen.append(x)
        if once:
            raise StopForward

    run_with_input_hooks(model, batch, {name: record})
    return seen


def run_with_input_hooks(
    model: nn.Module, batch: dict[str, Tensor], record: dict[str, Callable[[Tensor], None]]
) -> None:
    """One forward pass of `model` on `batch` (its model inputs) in which `record[name](x)` sees the input x of the
    module `name` at each of its calls; a recorder may raise `StopForward` to end the pass there."""
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(lambda _module, args, fn=fn: fn(args[0]))
        for name, fn in record.items()
    ]
    try:
        model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS})
    except StopForward:
        pass
    finally:
        for hook in hooks:
            hook.remove()


class StopForward(Exception):
    """Raised by a recorder of `run_with_input_hooks` to end the forward pass: the rest cannot change what it needs."""


def real_tokens(x: Tensor, mask: Tensor | None) -> Tensor:
    """A Linear's input x (..., in) as rows (N, in): only the tokens `mask` marks real where it covers x's (batch, seq)."""
    if x.dim() == 3 and mask is not None and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


def input_mask_key(name: str) -> str:
    """Which attention mask marks the real tokens of a Linear's input: the decoder stream's or the encoder's."""
    reads_encoder = name.endswith(("cross_attn.k_proj", "cross_attn.v_proj"))
    on_decoder = name.startswith(("decoder.", "heads.lm"))
    return "decoder_attention_mask" if on_decoder and not reads_encoder else "attention_mask"

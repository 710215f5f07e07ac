"""Flash attention in Triton: tiled online-softmax forward kernel and the custom op `flash_attention`.

Semantics (masks, causality, rows that see no key) are those of `model.attention.reference_attention`,
as `model.kernels.common` spells out. The forward follows the Triton fused-attention tutorial: `_attn_fwd`
sets up one query block and writes its rows, `_attn_fwd_inner` runs the online softmax over key tiles.
The backward kernels are in `model.kernels.flash_bwd`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from model.kernels.common import (
    LOG2E,
    _block_d,
    _dead_rows,
    _dot_precision,
    _finish_rows,
    _key_range,
    _launch_config,
    _mask_arg,
    _mask_scores,
    _softmax_step,
    _strides,
)
from model.kernels.flash_bwd import _flash_bwd


@triton.jit
def _attn_fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    K,
    V,
    key_mask_row,
    offs_m,
    offs_d,
    dead,
    lo,
    hi,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    TQ,
    TK,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BOUNDS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Key tiles lo..hi for one block of queries q; BOUNDS: the tiles may cross the causal diagonal or TK."""
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < TK
        kt = tl.load(
            K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=n_ok[None, :] & d_ok[:, None], other=0
        )  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        s = _mask_scores(s, offs_m, offs_n, dead, key_mask_row, TQ, TK, CAUSAL, HAS_MASK, BOUNDS)
        v = tl.load(
            V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=n_ok[:, None] & d_ok[None, :], other=0.0
        )
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, s, v, PRECISION)
    return acc, l_i, m_i


# Over 80 lines only because the formatter puts each launch and inner-loop argument on a line of its own.
@triton.jit
def _attn_fwd(
    Q,
    K,
    V,
    O,
    LSE,
    KEY_MASK,
    DEAD,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    H,
    TQ,
    TK,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One query block: key tiles that need no causal/bounds mask first, then those that do."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=(offs_m[:, None] < TQ) & (offs_d[None, :] < HEAD_DIM),
        other=0,
    )
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    key_mask_row = KEY_MASK + b * TK
    dead = tl.load(DEAD + b)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    full_hi, hi = _key_range(start_m, dead, TQ, TK, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _attn_fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        K,
        V,
        key_mask_row,
        offs_m,
        offs_d,
        dead,
        0,
        full_hi,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        TQ,
        TK,
        qk_scale,
        HEAD_DIM,
        BLOCK_N,
        CAUSAL,
        HAS_MASK,
        False,
        PRECISION,
    )
    acc, l_i, m_i = _attn_fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        K,
        V,
        key_mask_row,
        offs_m,
        offs_d,
        dead,
        full_hi,
        hi,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        TQ,
        TK,
        qk_scale,
        HEAD_DIM,
        BLOCK_N,
        CAUSAL,
        HAS_MASK,
        True,
        PRECISION,
    )
    _finish_rows(
        acc,
        l_i,
        m_i,
        O + b * stride_ob + h * stride_oh,
        LSE + bh * TQ,
        offs_m,
        offs_d,
        stride_om,
        stride_od,
        TQ,
        HEAD_DIM,
    )


@torch.library.custom_op("flashlite::flash_fwd", mutates_args=())
def _flash_fwd(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, causal: bool, scale: float
) -> tuple[Tensor, Tensor]:
    b, h, tq, d = q.shape
    tk = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(b, h, tq, dtype=torch.float32, device=q.device)
    dead = _dead_rows(key_mask, causal, b, tq, tk, q.device)
    cfg = _launch_config(q, "fwd")
    grid = (triton.cdiv(tq, cfg["BLOCK_M"]), b * h)
    _attn_fwd[grid](
        q,
        k,
        v,
        out,
        lse,
        _mask_arg(key_mask, q),
        dead,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(out),
        h,
        tq,
        tk,
        scale * LOG2E,
        HEAD_DIM=d,
        BLOCK_D=_block_d(d),
        CAUSAL=causal,
        HAS_MASK=key_mask is not None,
        PRECISION=_dot_precision(q.dtype),
        **cfg,
    )
    return out, lse


@_flash_fwd.register_fake
def _flash_fwd_fake(q, k, v, key_mask, causal, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, key_mask, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_mask)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, d_out, _d_lse):
    q, k, v, out, lse, key_mask = ctx.saved_tensors
    dq, dk, dv = _flash_bwd(d_out, q, k, v, out, lse, key_mask, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None


_flash_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(
    q: Tensor, k: Tensor, v: Tensor, *, key_mask: Tensor | None = None, causal: bool = False, scale: float | None = None
) -> Tensor:
    """Exact attention of q (B,H,Tq,D) over k, v (B,H,Tk,D) with the Triton flash kernels; returns (B,H,Tq,D).

    Differentiable in q, k and v. Inputs are fp16, bf16 or fp32 (one dtype), D <= 128; they run on
    CUDA, or on CPU under TRITON_INTERPRET=1. `model.attention.attend` checks all that first.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _flash_fwd(q, k, v, key_mask, causal, scale)[0]

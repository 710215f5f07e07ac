"""Backward kernels of `model.kernels.flash`: dK/dV per key block and dQ per query block, behind `_flash_bwd`.

Dead rows (queries that may see no key) get the reference's gradients: the softmax Jacobian at
uniform weights, which autograd takes through the reference's finite bias (see `model.kernels.common`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from model.kernels.common import (
    LOG2E,
    _block_d,
    _dead_rows,
    _dot_precision,
    _key_range,
    _launch_config,
    _mask_arg,
    _mask_scores,
    _strides,
)


@triton.jit
def _attn_bwd_delta(
    O,
    DO,
    DELTA,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_db,
    stride_dh,
    stride_dm,
    stride_dd,
    H,
    TQ,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta_i = sum_d O_id dO_id: the softmax-Jacobian term every backward tile needs."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < TQ) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(
        O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        mask=ok,
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :] * stride_dd,
        mask=ok,
        other=0.0,
    )
    tl.store(DELTA + bh * TQ + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < TQ)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk,
    dv,
    k,
    v,
    Q,
    DO,
    LSE,
    DELTA,
    key_mask_row,
    offs_n,
    offs_d,
    dead,
    lo,
    hi,
    stride_qm,
    stride_qd,
    stride_dm,
    stride_dd,
    TQ,
    TK,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Query tiles lo..hi against one key block k, v: accumulates that block's dK (unscaled) and dV."""
    d_ok = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        ok = (offs_m[:, None] < TQ) & d_ok[None, :]
        q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=ok, other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dm + offs_d[None, :] * stride_dd, mask=ok, other=0.0)
        lse = tl.load(LSE + offs_m, mask=offs_m < TQ, other=float("inf"))  # inf: rows past TQ get p = 0
        delta = tl.load(DELTA + offs_m, mask=offs_m < TQ, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = _mask_scores(s, offs_m, offs_n, dead, key_mask_row, TQ, TK, CAUSAL, HAS_MASK, True)
        p = tl.math.exp2(s - lse[:, None])
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    return dk, dv


# Over 80 lines only because the formatter puts each launch and inner-loop argument on a line of its own.
@triton.jit
def _attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
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
    stride_db,
    stride_dh,
    stride_dm,
    stride_dd,
    H,
    TQ,
    TK,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dK and dV for one key block, scanning the query blocks that see it (DK/DV share K/V's strides)."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_n[:, None] < TK) & (offs_d[None, :] < HEAD_DIM)
    k_off = b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_off = b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    k = tl.load(K + k_off, mask=ok, other=0.0)
    v = tl.load(V + v_off, mask=ok, other=0.0)
    Q += b * stride_qb + h * stride_qh
    DO += b * stride_db + h * stride_dh
    LSE += bh * TQ
    DELTA += bh * TQ
    key_mask_row = KEY_MASK + b * TK
    dead = tl.load(DEAD + b)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    first = 0
    if CAUSAL:
        # Queries before `first` cannot see this key block, except dead rows, which weigh every key.
        first = tl.maximum(start_n - (TK - TQ), 0) // BLOCK_M * BLOCK_M
        dead_hi = tl.minimum((dead + BLOCK_M - 1) // BLOCK_M * BLOCK_M, first)
        dk, dv = _attn_bwd_dkdv_inner(
            dk,
            dv,
            k,
            v,
            Q,
            DO,
            LSE,
            DELTA,
            key_mask_row,
            offs_n,
            offs_d,
            dead,
            0,
            dead_hi,
            stride_qm,
            stride_qd,
            stride_dm,
            stride_dd,
            TQ,
            TK,
            qk_scale,
            HEAD_DIM,
            BLOCK_M,
            CAUSAL,
            HAS_MASK,
            PRECISION,
        )
    dk, dv = _attn_bwd_dkdv_inner(
        dk,
        dv,
        k,
        v,
        Q,
        DO,
        LSE,
        DELTA,
        key_mask_row,
        offs_n,
        offs_d,
        dead,
        first,
        TQ,
        stride_qm,
        stride_qd,
        stride_dm,
        stride_dd,
        TQ,
        TK,
        qk_scale,
        HEAD_DIM,
        BLOCK_M,
        CAUSAL,
        HAS_MASK,
        PRECISION,
    )
    tl.store(DK + k_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + v_off, dv.to(DV.dtype.element_ty), mask=ok)


@triton.jit
def _attn_bwd_dq(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
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
    stride_db,
    stride_dh,
    stride_dm,
    stride_dd,
    H,
    TQ,
    TK,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dQ for one query block, scanning the key blocks it sees (DQ shares Q's strides)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    ok = (offs_m[:, None] < TQ) & d_ok[None, :]
    q_off = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(Q + q_off, mask=ok, other=0.0)
    do = tl.load(
        DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :] * stride_dd,
        mask=ok,
        other=0.0,
    )
    lse = tl.load(LSE + bh * TQ + offs_m, mask=offs_m < TQ, other=float("inf"))
    delta = tl.load(DELTA + bh * TQ + offs_m, mask=offs_m < TQ, other=0.0)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    key_mask_row = KEY_MASK + b * TK
    dead = tl.load(DEAD + b)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    _, hi = _key_range(start_m, dead, TQ, TK, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < TK) & d_ok[None, :]
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = _mask_scores(s, offs_m, offs_n, dead, key_mask_row, TQ, TK, CAUSAL, HAS_MASK, True)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=ok)


@torch.library.custom_op("flashlite::flash_bwd", mutates_args=())
def _flash_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    key_mask: Tensor | None,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    b, h, tq, d = q.shape
    tk = k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    dead = _dead_rows(key_mask, causal, b, tq, tk, q.device)
    mask = _mask_arg(key_mask, q)
    common = dict(
        HEAD_DIM=d, BLOCK_D=_block_d(d), CAUSAL=causal, HAS_MASK=key_mask is not None, PRECISION=_dot_precision(q.dtype)
    )
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    _attn_bwd_delta[(triton.cdiv(tq, 64), b * h)](
        out, do, delta, *_strides(out), *_strides(do), h, tq, HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=64
    )
    cfg = _launch_config(q, "dkdv")
    _attn_bwd_dkdv[(triton.cdiv(tk, cfg["BLOCK_N"]), b * h)](
        q, k, v, do, lse, delta, dk, dv, mask, dead, *strides, h, tq, tk, scale * LOG2E, scale, **common, **cfg
    )
    cfg = _launch_config(q, "dq")
    _attn_bwd_dq[(triton.cdiv(tq, cfg["BLOCK_M"]), b * h)](
        q, k, v, do, lse, delta, dq, mask, dead, *strides, h, tq, tk, scale * LOG2E, scale, **common, **cfg
    )
    return dq, dk, dv


@_flash_bwd.register_fake
def _flash_bwd_fake(do, q, k, v, out, lse, key_mask, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

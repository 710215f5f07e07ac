"""Flash attention in Triton: tiled online-softmax forward and backward kernels behind one custom op, `flash_attention`.

Semantics are those of `model.attention.reference_attention`: `key_mask` (B,Tk) True = attend,
causal masks are bottom-right aligned (query i sees keys j <= i + Tk - Tq), and a query row
that may see no key at all ("dead") averages V uniformly over all Tk keys, as the reference's
finite `finfo.min` bias gives, and gets the reference's gradients too (the softmax Jacobian at
uniform weights, which autograd takes through that bias). Dead rows always form a prefix
of each batch row's queries (the allowed key set only grows with i), so one count per batch
row (`_dead_rows`) describes them.

The kernels also serve `model.kernels.int8` and `model.kernels.lsh`, which reuse the
masking and online-softmax helpers below.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

LOG2E = math.log2(math.e)  # the kernels use exp2: scores are carried in log2 units
# A finite stand-in for -inf on disallowed scores: a tile that is fully disallowed for a row
# must not produce exp2(-inf - -inf) = NaN in the running max, and exp2(_MASKED - m) is 0.
_MASKED = tl.constexpr(-1.0e30)


def _dead_rows(key_mask: Tensor | None, causal: bool, b: int, tq: int, tk: int, device) -> Tensor:
    """(B,) int32: how many leading queries of each batch row may attend to no key at all."""
    if key_mask is None:
        return torch.full((b,), max(tq - tk, 0) if causal else 0, dtype=torch.int32, device=device)
    has_key = key_mask.any(dim=1)
    if not causal:
        return torch.where(has_key, 0, tq).to(torch.int32)
    first = torch.where(has_key, key_mask.to(torch.int8).argmax(dim=1), tk)  # argmax gives the first True
    return (first - (tk - tq)).clamp(0, tq).to(torch.int32)


def _block_d(head_dim: int) -> int:
    """tl.dot needs a power-of-two inner size of at least 16: narrower heads are zero-padded in registers."""
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get 3xTF32 products (split-precision tensor-core passes, accurate to ~1e-6):
    # plain TF32 would cost ~1e-3, and IEEE FMA products spill registers badly on sm_90.
    return "tf32x3" if dtype == torch.float32 else "tf32"


@triton.jit
def _mask_scores(
    s, offs_m, offs_n, dead, key_mask_row, TQ, TK, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BOUNDS: tl.constexpr
):
    """Disallowed scores become _MASKED (0 in dead rows: uniform weights); keys past TK become -inf."""
    masked = tl.where(offs_m < dead, 0.0, _MASKED)[:, None]
    if HAS_MASK:
        keep = tl.load(key_mask_row + offs_n, mask=offs_n < TK, other=0)
        s = tl.where(keep[None, :] != 0, s, masked)
    if BOUNDS:
        if CAUSAL:
            s = tl.where(offs_n[None, :] <= offs_m[:, None] + (TK - TQ), s, masked)
        s = tl.where(offs_n[None, :] < TK, s, float("-inf"))
    return s


@triton.jit
def _softmax_step(acc, l_i, m_i, s, v, PRECISION: tl.constexpr):
    """One online-softmax update with a tile of scores s (log2 units) and values v; returns (acc, l_i, m_i)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _finish_rows(acc, l_i, m_i, O, LSE, offs_m, offs_d, stride_om, stride_od, TQ, HEAD_DIM: tl.constexpr):
    """Normalize and store a block of output rows and their log2-sum-exp."""
    row_ok = offs_m < TQ
    tl.store(
        O + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        (acc / l_i[:, None]).to(O.dtype.element_ty),
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
    )
    tl.store(LSE + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit
def _key_range(start_m, dead, TQ, TK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(full_hi, hi) for a query block: key tiles below full_hi need no causal/bounds mask, tiles up to hi matter."""
    full_hi = TK // BLOCK_N * BLOCK_N
    hi = TK
    if CAUSAL:
        full_hi = tl.minimum(full_hi, tl.maximum(start_m + TK - TQ + 1, 0) // BLOCK_N * BLOCK_N)
        # Dead rows average over every key, so a block holding one scans them all.
        hi = tl.where(start_m < dead, TK, tl.minimum(TK, tl.maximum(start_m + BLOCK_M + TK - TQ, 0)))
    return full_hi, hi


@triton.jit
def _fwd_tiles(
    acc,
    l_i,
    m_i,
    q,
    K,
    V,
    K_SCALE,
    K_ORDER,
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
    QUANT: tl.constexpr,
    GATHER: tl.constexpr,
):
    """Key tiles lo..hi of the forward pass, shared by flash (plain), flash-int8 (QUANT) and flash-lsh (GATHER).

    QUANT: q and K are int8, qk_scale holds q's row scales and K_SCALE K's (one per key).
    GATHER: tiles index sorted key slots; K_ORDER maps a slot to its original key position.
    """
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if GATHER:  # slots past the end map to TK, which every mask below treats as out of bounds
            offs_n = tl.load(K_ORDER + offs_n, mask=offs_n < TK, other=TK)
        n_ok = offs_n < TK
        kt = tl.load(
            K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=n_ok[None, :] & d_ok[:, None], other=0
        )  # (BLOCK_D, BLOCK_N)
        if QUANT:
            k_scale = tl.load(K_SCALE + offs_n, mask=n_ok, other=0.0)
            s = tl.dot(q, kt, out_dtype=tl.int32).to(tl.float32) * qk_scale[:, None] * k_scale[None, :]
        else:
            s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        s = _mask_scores(s, offs_m, offs_n, dead, key_mask_row, TQ, TK, CAUSAL, HAS_MASK, BOUNDS)
        v = tl.load(
            V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=n_ok[:, None] & d_ok[None, :], other=0.0
        )
        if QUANT:  # SageAttention keeps P.V in fp16 with fp32 accumulation
            v = v.to(tl.float16)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, s, v, PRECISION)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q,
    K,
    V,
    O,
    LSE,
    KEY_MASK,
    DEAD,
    Q_SCALE,
    K_SCALE,
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
    QUANT: tl.constexpr,
):
    """One query block of flash (or, with QUANT, flash-int8: Q/K int8 with per-token scales Q_SCALE/K_SCALE)."""
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
    if QUANT:  # q's row scales already hold the softmax scale and log2(e)
        qk_scale = tl.load(Q_SCALE + bh * TQ + offs_m, mask=offs_m < TQ, other=0.0)
        K_SCALE += bh * TK
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    key_mask_row = KEY_MASK + b * TK
    dead = tl.load(DEAD + b)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    full_hi, hi = _key_range(start_m, dead, TQ, TK, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_tiles(
        acc,
        l_i,
        m_i,
        q,
        K,
        V,
        K_SCALE,
        K,
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
        QUANT,
        False,
    )
    acc, l_i, m_i = _fwd_tiles(
        acc,
        l_i,
        m_i,
        q,
        K,
        V,
        K_SCALE,
        K,
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
        QUANT,
        False,
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
def _bwd_kv_tiles(
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
        dk, dv = _bwd_kv_tiles(
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
    dk, dv = _bwd_kv_tiles(
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


def _strides(t: Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())


def _launch_config(q: Tensor, kind: str) -> dict:
    """Tiles and launch options for kind "fwd", "dkdv" or "dq": small tiles in the CPU interpreter;
    on GPU the largest that compile for sm_90 without spilling registers (checked with ptxas)."""
    if not q.is_cuda:
        return dict(BLOCK_M=16, BLOCK_N=16)
    wide = q.shape[-1] > 64
    if q.dtype == torch.float32:  # 3xTF32 products hold more operand tiles: smaller tiles
        block_m = {"fwd": 32 if wide else 64, "dkdv": 16, "dq": 32 if wide else 64}[kind]
        return dict(BLOCK_M=block_m, BLOCK_N=32, num_warps=4, num_stages=2)
    if kind == "fwd":
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    if kind == "dkdv":
        return dict(BLOCK_M=32, BLOCK_N=64, num_warps=8 if wide else 4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=32 if wide else 64, num_warps=8, num_stages=3)


def _mask_arg(key_mask: Tensor | None, q: Tensor) -> Tensor:
    # Triton reads the bool mask as bytes; without a mask any tensor serves as the never-read pointer.
    return q if key_mask is None else key_mask.contiguous().view(torch.uint8)


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
        q,
        q,
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
        QUANT=False,
        **cfg,
    )
    return out, lse


@_flash_fwd.register_fake
def _flash_fwd_fake(q, k, v, key_mask, causal, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


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


def inference_only(backend: str):
    """A custom op's backward for a kernel that has none: it says so instead of failing obscurely."""

    def backward(ctx, *grads):
        raise RuntimeError(f"{backend} is inference-only (no backward); run it under torch.no_grad() or use 'flash'")

    return backward


def flash_attention(
    q: Tensor, k: Tensor, v: Tensor, *, key_mask: Tensor | None = None, causal: bool = False, scale: float | None = None
) -> Tensor:
    """Exact attention of q (B,H,Tq,D) over k, v (B,H,Tk,D) with the Triton flash kernels; returns (B,H,Tq,D).

    Differentiable in q, k and v. Inputs are fp16, bf16 or fp32 (one dtype), D <= 128; they run on
    CUDA, or on CPU under TRITON_INTERPRET=1. `model.attention.attend` checks all that first.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _flash_fwd(q, k, v, key_mask, causal, scale)[0]

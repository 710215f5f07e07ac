"""flash-lsh: approximate attention for long sequences, with angular LSH buckets and block-sparse Triton tiles.

Queries and keys are hashed with the same random rotations R (bucket = argmax over [xR; -xR],
so directions that are close share a bucket), each is sorted by bucket, and a tile of sorted
queries attends only to the key tiles whose bucket range meets its own. Keys outside those
tiles get no weight, which is the approximation; with one bucket every tile meets every
other and the result is exact attention. Masks and causality apply by original position, and
disallowed keys get weight zero. A query whose visited tiles hold no key it may see (only padded
or future keys, or none at all for a row that may see no key) gets the exact result instead,
as `model.attention.reference_attention` gives it: its tile scans the keys again in their original
order (`model.kernels.flash._attn_fwd_inner`). Inference only. `_attn_lsh_fwd` sets up one tile of
sorted queries, `_lsh_fwd_inner` runs the online softmax over the sorted key slots it is given.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from model.kernels.common import (
    _MASKED,
    LOG2E,
    _block_d,
    _dead_rows,
    _dot_precision,
    _finish_rows,
    _launch_config,
    _mask_arg,
    _mask_scores,
    _softmax_step,
    _strides,
    inference_only,
)
from model.kernels.flash import _attn_fwd_inner


def default_buckets(tk: int) -> int:
    """About 256 keys per bucket from 1024 keys on (an even count, as the hash needs); 1 (exact) below that."""
    n = tk // 256
    return 1 if n < 4 else n - n % 2


@triton.jit
def _lsh_fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    K,
    V,
    K_ORDER,
    key_mask_row,
    offs_m,
    offs_d,
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
    PRECISION: tl.constexpr,
):
    """Sorted key slots lo..hi for a tile of queries at original positions offs_m; K_ORDER maps a slot to its key.

    Every disallowed score is _MASKED, so a row whose slots hold no key it may see ends with m_i = _MASKED.
    """
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        slots = start_n + tl.arange(0, BLOCK_N)
        # Slots past the end map to TK, which every mask below treats as out of bounds.
        offs_n = tl.load(K_ORDER + slots, mask=slots < TK, other=TK)
        n_ok = offs_n < TK
        kt = tl.load(
            K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=n_ok[None, :] & d_ok[:, None], other=0
        )  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        # Gathered keys are in no order, so every tile gets the causal and bounds masks. No row counts
        # as dead here (0): one that may see no key is left to the exact scan like any other blind row.
        s = _mask_scores(s, offs_m, offs_n, 0, key_mask_row, TQ, TK, CAUSAL, HAS_MASK, True)
        v = tl.load(
            V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=n_ok[:, None] & d_ok[None, :], other=0.0
        )
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, s, v, PRECISION)
    return acc, l_i, m_i


@triton.jit
def _exact_blind_rows(
    q,
    K,
    V,
    O,
    LSE,
    key_mask_row,
    offs_m,
    offs_d,
    blind,
    dead,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    stride_om,
    stride_od,
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
    """Exact attention for the tile's blind rows (their visited slots held no key they may see), written in place.

    The keys are scanned in their original order, as flash does, as far as the blind rows need: to
    their causal limit, or to TK for a row that may see no key at all (it averages every key, as the
    reference does). A tile without blind rows does nothing.
    """
    row_hi = TK
    if CAUSAL:
        row_hi = tl.where(offs_m < dead, TK, tl.minimum(offs_m + (TK - TQ) + 1, TK))
    exact_hi = tl.max(tl.where(blind, row_hi, 0), 0)
    if exact_hi > 0:
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
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
            exact_hi,
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
        _finish_rows(acc, l_i, m_i, O, LSE, tl.where(blind, offs_m, TQ), offs_d, stride_om, stride_od, TQ, HEAD_DIM)


# Over 80 lines only because the formatter puts each launch and inner-loop argument on a line of its own.
@triton.jit
def _attn_lsh_fwd(
    Q,
    K,
    V,
    O,
    LSE,
    KEY_MASK,
    DEAD,
    Q_ORDER,
    K_ORDER,
    K_SLOTS,
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
    """One tile of bucket-sorted queries over the sorted key slots K_SLOTS gives it; rows are written in place."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    slots = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = tl.load(Q_ORDER + bh * TQ + slots, mask=slots < TQ, other=TQ)  # original query positions
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=(offs_m[:, None] < TQ) & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    key_mask_row = KEY_MASK + b * TK
    lo = tl.load(K_SLOTS + (bh * tl.num_programs(0) + tile) * 2)
    hi = tl.load(K_SLOTS + (bh * tl.num_programs(0) + tile) * 2 + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    acc, l_i, m_i = _lsh_fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        K,
        V,
        K_ORDER + bh * TK,
        key_mask_row,
        offs_m,
        offs_d,
        lo,
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
        PRECISION,
    )
    O += b * stride_ob + h * stride_oh
    LSE += bh * TQ
    # Rows whose visited slots held no key they may see ("blind") still have the running max _MASKED:
    # the others are written now, the blind ones by an exact scan, one accumulator live at a time.
    blind = (m_i <= _MASKED) & (offs_m < TQ)
    _finish_rows(acc, l_i, m_i, O, LSE, tl.where(blind, TQ, offs_m), offs_d, stride_om, stride_od, TQ, HEAD_DIM)
    _exact_blind_rows(
        q,
        K,
        V,
        O,
        LSE,
        key_mask_row,
        offs_m,
        offs_d,
        blind,
        tl.load(DEAD + b),
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        stride_om,
        stride_od,
        TQ,
        TK,
        qk_scale,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_M,
        BLOCK_N,
        CAUSAL,
        HAS_MASK,
        PRECISION,
    )


def _rotations(head_dim: int, n_buckets: int, seed: int, device) -> Tensor | None:
    """The hash's random rotations R (head_dim, n_buckets / 2), drawn from seed; None for one bucket."""
    if n_buckets == 1:
        return None
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(head_dim, n_buckets // 2, generator=generator, device=device)


def _sorted_buckets(x: Tensor, rotations: Tensor | None) -> tuple[Tensor, Tensor]:
    """Bucket ids of x (B,H,T,D) in sorted order and the positions that sort them, both (B,H,T)."""
    if rotations is None:
        buckets = torch.zeros(x.shape[:3], dtype=torch.int64, device=x.device)
    else:
        proj = torch.matmul(x, rotations.to(x.dtype))  # (B, H, T, n_buckets / 2)
        buckets = torch.cat([proj, -proj], dim=-1).argmax(dim=-1)
    ordered, order = torch.sort(buckets, dim=-1, stable=True)
    return ordered, order.to(torch.int32)


def _tile_ends(ordered: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """First and last bucket of each tile of `block` sorted slots: two (B,H,n_tiles)."""
    t = ordered.shape[-1]
    starts = torch.arange(0, t, block, device=ordered.device)
    return ordered[..., starts].contiguous(), ordered[..., (starts + block - 1).clamp(max=t - 1)].contiguous()


def _key_slots(q_ordered: Tensor, k_ordered: Tensor, block_m: int, block_n: int) -> Tensor:
    """(B,H,n_query_tiles,2) int32: the sorted key slots [lo, hi) each query tile attends to.

    Both sides are sorted by bucket, so the key tiles whose bucket range meets a query tile's
    are contiguous. A query tile that meets none gets the next key tile in bucket order, so
    every query attends to something.
    """
    q_first, q_last = _tile_ends(q_ordered, block_m)
    k_first, k_last = _tile_ends(k_ordered, block_n)
    lo = torch.searchsorted(k_last, q_first).clamp(max=k_first.shape[-1] - 1)
    hi = torch.maximum(torch.searchsorted(k_first, q_last, right=True), lo + 1)
    return (torch.stack([lo, hi], dim=-1) * block_n).to(torch.int32).contiguous()


@torch.library.custom_op("flashlite::lsh_fwd", mutates_args=())
def _lsh_fwd(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, causal: bool, scale: float, n_buckets: int, seed: int
) -> Tensor:
    b, h, tq, d = q.shape
    tk = k.shape[2]
    rotations = _rotations(d, n_buckets, seed, q.device)
    q_ordered, q_order = _sorted_buckets(q, rotations)
    k_ordered, k_order = _sorted_buckets(k, rotations)
    cfg = _launch_config(q, "fwd")
    slots = _key_slots(q_ordered, k_ordered, cfg["BLOCK_M"], cfg["BLOCK_N"])
    out = torch.empty_like(q)
    lse = torch.empty(b, h, tq, dtype=torch.float32, device=q.device)
    dead = _dead_rows(key_mask, causal, b, tq, tk, q.device)
    _attn_lsh_fwd[(slots.shape[2], b * h)](
        q,
        k,
        v,
        out,
        lse,
        _mask_arg(key_mask, q),
        dead,
        q_order,
        k_order,
        slots,
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
    return out


@_lsh_fwd.register_fake
def _lsh_fwd_fake(q, k, v, key_mask, causal, scale, n_buckets, seed):
    return torch.empty_like(q)


_lsh_fwd.register_autograd(inference_only("flash-lsh"))


def lsh_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    n_buckets: int | None = None,
    seed: int = 0,
) -> Tensor:
    """Approximate attention of q (B,H,Tq,D) over k, v (B,H,Tk,D) within LSH buckets; returns (B,H,Tq,D).

    n_buckets: 1 (exact) or an even count; default `default_buckets(Tk)`. seed: picks the
    random rotations, so equal inputs give equal outputs. Inference only.
    """
    n_buckets = default_buckets(k.shape[2]) if n_buckets is None else n_buckets
    if not isinstance(n_buckets, int) or n_buckets < 1 or (n_buckets > 1 and n_buckets % 2):
        raise ValueError(f"n_buckets must be 1 or an even integer >= 2, got {n_buckets!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _lsh_fwd(q, k, v, key_mask, causal, scale, n_buckets, seed)

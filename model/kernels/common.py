"""What the Triton attention kernels share: launch helpers on the host and the small `@triton.jit` steps
their inner loops are made of (masking, the online-softmax update, the output store).

Semantics are those of `model.attention.reference_attention`: `key_mask` (B,Tk) True = attend,
causal masks are bottom-right aligned (query i sees keys j <= i + Tk - Tq), and a query row
that may see no key at all ("dead") averages V uniformly over all Tk keys, as the reference's
finite `finfo.min` bias gives. Dead rows always form a prefix of each batch row's queries (the
allowed key set only grows with i), so one count per batch row (`_dead_rows`) describes them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

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


def inference_only(backend: str):
    """A custom op's backward for a kernel that has none: it says so instead of failing obscurely."""

    def backward(ctx, *grads):
        raise RuntimeError(f"{backend} is inference-only (no backward); run it under torch.no_grad() or use 'flash'")

    return backward


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

"""attend(): scaled dot-product attention with a choice of backend, and the exact reference math."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _masked_scores_bias(key_mask: Tensor | None, causal: bool, tq: int, tk: int, device, dtype) -> Tensor | None:
    """An additive bias (B or 1, 1, Tq, Tk): 0 where attending is allowed, the dtype's minimum elsewhere.

    The minimum (not -inf) keeps a fully masked row finite, as Hugging Face BERT does, so that
    padded query positions still produce numbers equal to the original model's.
    """
    if key_mask is None and not causal:
        return None
    allowed = torch.ones(1, 1, tq, tk, dtype=torch.bool, device=device)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    if causal:
        # Bottom-right aligned: with a cache (Tq < Tk) query i is key position i + Tk - Tq.
        allowed = allowed & torch.ones(tq, tk, dtype=torch.bool, device=device).tril(tk - tq)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Exact attention in the inputs' dtype (use float64 for test references).

    Returns (output (B,H,Tq,D), weights (B,H,Tq,Tk)).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    bias = _masked_scores_bias(key_mask, causal, q.shape[-2], k.shape[-2], q.device, scores.dtype)
    if bias is not None:
        scores = scores + bias
    weights = torch.softmax(scores, dim=-1)
    if dropout > 0.0:
        weights = F.dropout(weights, p=dropout)
    return torch.matmul(weights, v), weights


def _reference(q, k, v, *, key_mask, causal, scale, dropout):
    return reference_attention(q, k, v, key_mask=key_mask, causal=causal, scale=scale, dropout=dropout)[0]


def _sdpa(q, k, v, *, key_mask, causal, scale, dropout):
    tq, tk = q.shape[-2], k.shape[-2]
    if key_mask is None and (not causal or tq == tk):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal, scale=scale)
    bias = _masked_scores_bias(key_mask, causal, tq, tk, q.device, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)


BACKENDS: dict[str, Callable[..., Tensor]] = {"reference": _reference, "sdpa": _sdpa}


def choose_backend(q: Tensor, requested: str = "auto") -> tuple[str, str]:
    """The backend `attend` will run for `q` and why: returns (name, reason)."""
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}; got {requested!r}")
        return requested, "requested"
    return "sdpa", "no Triton backend is installed for this device"


def _check(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, H, T, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, heads and head_dim")
    if key_mask is not None:
        if key_mask.dtype != torch.bool:
            raise TypeError(f"key_mask must be a bool tensor (True = attend), got {key_mask.dtype}")
        if key_mask.shape != (k.shape[0], k.shape[2]):
            raise ValueError(f"key_mask must be (B, Tk) = {(k.shape[0], k.shape[2])}, got {tuple(key_mask.shape)}")


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout: float = 0.0,
    backend: str = "auto",
) -> Tensor:
    """Attention of q (B,H,Tq,D) over k, v (B,H,Tk,D); returns (B,H,Tq,D).

    key_mask: (B,Tk) bool, True = a real token to attend to (the polarity of attention_mask).
    causal: query i sees keys j <= i + Tk - Tq. scale: defaults to 1/sqrt(D).
    dropout: probability of dropping attention weights (training only).
    backend: "auto", "reference" or "sdpa"; "auto" picks the fastest exact backend available.
    """
    _check(q, k, v, key_mask)
    name, _ = choose_backend(q, backend)
    return BACKENDS[name](q, k, v, key_mask=key_mask, causal=causal, scale=scale, dropout=dropout)

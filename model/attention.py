"""attend(): scaled dot-product attention with a choice of backend, the exact reference math, and the decoding cache."""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


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
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact attention in the inputs' dtype (use float64 for test references); `bias` is added to the scores.

    Returns (output (B,H,Tq,D), weights (B,H,Tq,Tk)).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    if bias is not None:
        scores = scores + bias
    masked = _masked_scores_bias(key_mask, causal, q.shape[-2], k.shape[-2], q.device, scores.dtype)
    if masked is not None:
        scores = scores + masked
    weights = torch.softmax(scores, dim=-1)
    if dropout > 0.0:
        weights = F.dropout(weights, p=dropout)
    return torch.matmul(weights, v), weights


def _reference(q, k, v, *, key_mask, causal, scale, dropout, bias=None):
    return reference_attention(q, k, v, key_mask=key_mask, causal=causal, scale=scale, dropout=dropout, bias=bias)[0]


def _sdpa(q, k, v, *, key_mask, causal, scale, dropout, bias=None):
    tq, tk = q.shape[-2], k.shape[-2]
    if bias is None and key_mask is None and (not causal or tq == tk):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal, scale=scale)
    masked = _masked_scores_bias(key_mask, causal, tq, tk, q.device, q.dtype)
    if bias is not None:
        masked = bias if masked is None else bias + masked
    return F.scaled_dot_product_attention(q, k, v, attn_mask=masked, dropout_p=dropout, scale=scale)


# The Triton kernels are imported on first use: a CPU-only install never imports triton, and
# TRITON_INTERPRET (which triton reads when a module's kernels are defined) can still be set by then.
def _flash(q, k, v, *, key_mask, causal, scale, dropout):
    from model.kernels.flash import flash_attention

    return flash_attention(q, k, v, key_mask=key_mask, causal=causal, scale=scale)


def _flash_int8(q, k, v, *, key_mask, causal, scale, dropout):
    from model.kernels.int8 import int8_attention

    return int8_attention(q, k, v, key_mask=key_mask, causal=causal, scale=scale)


def _flash_lsh(q, k, v, *, key_mask, causal, scale, dropout):
    from model.kernels.lsh import lsh_attention

    return lsh_attention(q, k, v, key_mask=key_mask, causal=causal, scale=scale)


BACKENDS: dict[str, Callable[..., Tensor]] = {
    "reference": _reference,
    "sdpa": _sdpa,
    "flash": _flash,
    "flash-int8": _flash_int8,
    "flash-lsh": _flash_lsh,
}
# Inference-only approximations: never picked by "auto", and their reason says so when requested.
APPROXIMATE_BACKENDS = frozenset({"flash-int8", "flash-lsh"})
KERNEL_BACKENDS = ("flash", "flash-int8", "flash-lsh")  # the Triton kernels: asked for by name, they may fall back
_WARNED: set[tuple[str, str]] = set()  # the (requested, reason) fallbacks already warned about
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_MAX_HEAD_DIM = 128  # the kernels' register tiles are sized for head_dim <= 128


def _interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, as in the tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _exporting() -> bool:
    """Whether an exporter is tracing: ONNX (TorchScript) export, or torch.export (the dynamo ONNX exporter)."""
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def _kernel_unsupported(q: Tensor) -> str | None:
    """Why the Triton kernels cannot take q (B,H,Tq,D) here, or None when they can."""
    if not _HAS_TRITON:
        return "triton is not installed"
    if not q.is_cuda and not _interpreting():
        return f"the Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU, for tests); q is on {q.device}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the Triton kernels take float16, bfloat16 or float32; q is {q.dtype}"
    if q.dtype == torch.bfloat16 and not q.is_cuda:
        return "bfloat16 needs a GPU: Triton's CPU interpreter has no bfloat16 dot"
    if q.shape[-1] > _MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} is over {_MAX_HEAD_DIM}, the largest the kernels take"
    return None


def choose_backend(q: Tensor, requested: str = "auto", *, dropout: float = 0.0) -> tuple[str, str]:
    """The backend `attend` will run for `q` (B,H,Tq,D) and why: returns (name, reason).

    "auto" picks flash for fp16/bf16 on CUDA with head_dim <= 128 and sdpa otherwise; a named
    kernel backend that cannot run on q raises ValueError with the reason. Dropout > 0 always
    runs sdpa (the kernels have none), and so does export: ONNX or torch.export tracing gets
    exact attention whatever was asked for. A q that is not 4-D only has the name checked
    (`Transformer` validates its `attention_backend` that way).
    """
    if requested != "auto" and requested not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}; got {requested!r}")
    if requested in ("reference", "sdpa"):
        return requested, "requested"
    if _exporting():
        return "sdpa", "exporting: the exported graph always holds exact attention"
    if q.dim() != 4:
        return (requested, "requested") if requested != "auto" else ("sdpa", "q is not (B, H, T, D)")
    if dropout > 0.0:
        return "sdpa", f"dropout={dropout}: the Triton kernels have no dropout"
    reason = _kernel_unsupported(q)
    if requested != "auto":
        if reason is not None:
            raise ValueError(f"backend {requested!r} cannot run here: {reason}")
        return requested, "requested (approximate)" if requested in APPROXIMATE_BACKENDS else "requested"
    if reason is not None or not q.is_cuda:
        return "sdpa", reason or f"q is on {q.device}: auto uses the Triton kernels on CUDA only"
    if q.dtype == torch.float32:
        return "sdpa", "float32: auto keeps sdpa; 'flash' takes fp32 too (3xTF32 products), unmeasured against it"
    return "flash", f"CUDA, {q.dtype}, head_dim {q.shape[-1]}: the Triton flash kernel"


def warn_fallback(requested: str, used: str, reason: str) -> None:
    """Warn that a Triton kernel asked for by name runs `used` instead, and why; once per (requested, reason).

    Nothing for "auto" (its choice is the point), for a backend that ran as asked, or while an
    exporter traces (the exported graph holds exact attention by design).

    Args:
        requested: the backend asked for.
        used: the backend that runs.
        reason: why, as `choose_backend` says it.
    """
    if requested not in KERNEL_BACKENDS or used == requested or _exporting() or (requested, reason) in _WARNED:
        return
    _WARNED.add((requested, reason))
    warnings.warn(
        f"attention backend {requested!r} falls back to {used}: {reason} (warned once per backend and reason)",
        stacklevel=3,
    )


def _check(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, H, T, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
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
    bias: Tensor | None = None,
) -> Tensor:
    """Attention of q (B,H,Tq,D) over k, v (B,H,Tk,D); returns (B,H,Tq,D).

    key_mask: (B,Tk) bool, True = a real token to attend to (the polarity of attention_mask).
    causal: query i sees keys j <= i + Tk - Tq. scale: defaults to 1/sqrt(D).
    dropout: probability of dropping attention weights (training only).
    backend: "auto", or one of BACKENDS: "reference", "sdpa", "flash" (exact), "flash-int8" and
    "flash-lsh" (approximate, inference only); see `choose_backend` for what "auto" picks and
    when a request is overridden (dropout, export); a kernel asked for by name that falls back
    for dropout warns, naming the reason.
    bias: added to the scores, broadcast to (B,H,Tq,Tk) (T5's relative positions); the Triton
    kernels take none, so it runs sdpa instead.
    """
    _check(q, k, v, key_mask)
    if bias is not None:
        name = backend if backend in ("reference", "sdpa") else "sdpa"
        warn_fallback(backend, name, "an additive score bias: the Triton kernels take none")
        return BACKENDS[name](q, k, v, key_mask=key_mask, causal=causal, scale=scale, dropout=dropout, bias=bias)
    name, reason = choose_backend(q, backend, dropout=dropout)
    warn_fallback(backend, name, reason)
    return BACKENDS[name](q, k, v, key_mask=key_mask, causal=causal, scale=scale, dropout=dropout)


@dataclass
class LayerCache:
    """One decoder layer's keys and values while generating, each (B,H,S,D).

    `keys`/`values` (self-attention) grow by the new tokens at every step; `memory_keys`/
    `memory_values` (cross-attention over the encoder output) are computed at the first step only.
    """

    keys: Tensor | None = None
    values: Tensor | None = None
    memory_keys: Tensor | None = None
    memory_values: Tensor | None = None

    @property
    def length(self) -> int:
        """Tokens cached so far."""
        return 0 if self.keys is None else self.keys.shape[2]

    def extend(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new tokens' keys and values (B,H,T,D); returns all of them."""
        if self.keys is not None:
            keys, values = torch.cat((self.keys, keys), dim=2), torch.cat((self.values, values), dim=2)
        self.keys, self.values = keys, values
        return keys, values

    def reorder(self, rows: Tensor) -> None:
        """Keep self-attention rows `rows` (beam search); the memory's rows stay (beams of one source share it)."""
        if self.keys is not None:
            self.keys, self.values = self.keys.index_select(0, rows), self.values.index_select(0, rows)

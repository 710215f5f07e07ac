"""Position schemes that have no learned table of their own: sinusoid tables, rotary angles, T5's relative buckets."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _angles(start: int, t: int, d: int, device) -> Tensor:
    """Angles (T, d/2) in float64 of positions start..start+T-1: position / 10000**(2i/d)."""
    freq = 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)  # (d/2,)
    return torch.arange(start, start + t, dtype=torch.float64, device=device)[:, None] / freq


def sinusoid(t: int, dim: int, device) -> Tensor:
    """Marian's fixed position table (T, dim) in float64: sin of the angles in dims < dim/2, cos in the rest."""
    angles = _angles(0, t, dim, device)
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


def rotate(x: Tensor, start: int = 0) -> Tensor:
    """Rotary positions: x (B,H,T,D) with dims i and i + D/2 turned by angle t / 10000**(2i/D) at position t.

    The angles are computed in float64 (as RoFormer's sinusoid table is) and cast to x's dtype;
    `start`: the position of x's first token (after a key/value cache).
    """
    t, d = x.shape[-2], x.shape[-1]
    angles = _angles(start, t, d, x.device)  # (T, D/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def relative_buckets(queries: Tensor, keys: Tensor, n: int, max_distance: int, bidirectional: bool) -> Tensor:
    """T5's bucket (Tq, Tk) of each query/key position pair: exact for small distances, logarithmic up to max_distance.

    Args:
        queries, keys: positions (Tq,) and (Tk,), int64.
        n, max_distance: Config.relative_buckets and relative_max_distance.
        bidirectional: the encoder's (half the buckets for keys after the query); else keys after it share bucket 0.
    """
    relative = keys[None, :] - queries[:, None]  # (Tq, Tk)
    buckets = torch.zeros_like(relative)
    if bidirectional:
        n //= 2
        buckets += (relative > 0).long() * n
        relative = relative.abs()
    else:
        relative = -torch.min(relative, torch.zeros_like(relative))
    exact = n // 2
    large = exact + (torch.log(relative.float() / exact) / math.log(max_distance / exact) * (n - exact)).long()
    large = torch.min(large, torch.full_like(large, n - 1))
    return buckets + torch.where(relative < exact, relative, large)

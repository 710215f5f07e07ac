"""The integer codes behind model/quantized.py's modules: bit packing, int8/int4 (de)quantization, 1-D k-means.

Formulas (w is one weight matrix (out, in); rows are output channels):
  int8     symmetric, one scale per row r, or per group of `group_size` inputs of a row:
           s = max|w_group| / 127, q = clamp(round(w / s), -127, 127); w ~ q * s. Groups help
           BERT-family models, whose FFNs hold single weights far larger than the rest of their
           row (they make the outlier hidden dimension). Tables (rows are tokens) take the same
           groups along each row. What groups buy on all-MiniLM-L6-v2: benchmarks/RESULTS.md
           (`benchmarks/quantize_sqnr.py`).
  int4     per group g of `group_size` inputs in a row, values 0..15, two per byte:
           symmetric  s_g = max|w_g| / 7, z_g = 8, q = clamp(round(w / s_g) + 8, 0, 15)
           asymmetric lo = min(w_g, 0), hi = max(w_g, 0), s_g = (hi - lo) / 15,
                      z_g = clamp(round(-lo / s_g), 0, 15), q = clamp(round(w / s_g) + z_g, 0, 15)
           w ~ (q - z_g) * s_g
  cluster  2**bits centroids c (1-D k-means over the matrix), index i per weight; w ~ c[i]
A zero row or group gets scale 1 (its integers are all zero-point, so it dequantizes to 0).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

KMEANS_ITERATIONS = 100


def pack(values: Tensor, width: int) -> Tensor:
    """Pack unsigned integers of `width` bits (1, 2, 4 or 8) along the last dim: (..., n) uint8 -> (..., n*width/8).

    Value j of each byte sits in bits [j*width, (j+1)*width); n must be a multiple of 8 // width.
    """
    per = 8 // width
    if width not in (1, 2, 4, 8) or values.shape[-1] % per:
        raise ValueError(
            f"cannot pack a last dim of {values.shape[-1]} at width {width} (need 1/2/4/8 and a multiple of {per})"
        )
    v = values.to(torch.uint8).reshape(*values.shape[:-1], values.shape[-1] // per, per)
    packed = v[..., 0].clone()
    for j in range(1, per):
        packed |= v[..., j] << (j * width)
    return packed


def unpack(packed: Tensor, width: int) -> Tensor:
    """Inverse of `pack`: (..., m) uint8 -> (..., m * 8 // width) uint8."""
    mask = (1 << width) - 1
    v = torch.stack([(packed >> shift) & mask for shift in range(0, 8, width)], dim=-1)  # (..., m, 8 // width)
    return v.reshape(*packed.shape[:-1], -1)


def storage_width(bits: int) -> int:
    """Bits each index occupies once packed: the smallest of 1, 2, 4, 8 that holds `bits`."""
    return next(w for w in (1, 2, 4, 8) if w >= bits)


def quantize_int8(w: Tensor, group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric int8: w (R, C) -> (q (R, C) int8, scale (R,) fp32 per row, or (R, C/g) with `group_size` g)."""
    w = w.detach().float()
    rows, cols = w.shape
    g = w.reshape(rows, -1, group_size or cols)  # (R, groups, g)
    absmax = g.abs().amax(-1)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    q = torch.clamp(torch.round(g / scale[..., None]), -127, 127).to(torch.int8).reshape(rows, cols)
    return q, scale if group_size else scale.squeeze(1)


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    """The float matrix that (q, scale) from `quantize_int8` stands for."""
    if scale.dim() == 1:
        return q.float() * scale[:, None]
    rows, groups = scale.shape
    return (q.float().view(rows, groups, -1) * scale[..., None]).reshape(q.shape)


def quantize_int4(w: Tensor, group_size: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Group-wise int4: w (out, in) -> (packed (out, in/2) uint8, scale (out, in/g) fp32, zero (out, in/g) uint8)."""
    out_features, in_features = w.shape
    if in_features % group_size:
        raise ValueError(f"in_features {in_features} is not divisible by group_size {group_size}")
    g = w.detach().float().reshape(out_features, in_features // group_size, group_size)  # (out, groups, g)
    if symmetric:
        scale = g.abs().amax(-1) / 7
        zero = torch.full_like(scale, 8)
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = (hi - lo) / 15
        zero = torch.clamp(torch.round(-lo / torch.where(scale > 0, scale, 1)), 0, 15)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, 15)
    return pack(q.reshape(out_features, in_features), 4), scale, zero.to(torch.uint8)


def dequantize_int4(packed: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """The float matrix that (packed, scale, zero) from `quantize_int4` stands for: (q - zero) * scale per group."""
    out_features, groups = scale.shape
    q = unpack(packed, 4).float().view(out_features, groups, -1)  # (out, groups, g)
    return ((q - zero.float()[..., None]) * scale[..., None]).reshape(out_features, -1)


def kmeans_1d(
    values: Tensor, k: int, iterations: int = KMEANS_ITERATIONS, *, pin_zero: bool = False
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on scalars: values (any shape) -> (centroids (k,) fp32 ascending, index (n,) int64 of the flattened values).

    Deterministic: centroids start at the (i + 0.5) / k quantiles. In 1-D the clusters are runs
    of the sorted values split at the midpoints between centroids, so after one sort each Lloyd
    step costs O(k log n) (binary search + prefix sums). An emptied cluster keeps its centroid.
    pin_zero: the centroid nearest 0 is held at exactly 0, so zeros stay exact (a table's padding row).
    """
    values = values.detach().float().flatten()
    ordered = values.sort().values
    n = ordered.numel()
    prefix = F.pad(ordered.double().cumsum(0), (1, 0))  # prefix[i] = sum of the i smallest values
    positions = ((torch.arange(k, dtype=torch.float64, device=values.device) + 0.5) / k * (n - 1)).round().long()
    centroids = _pinned(ordered[positions], pin_zero)
    for _ in range(iterations):
        cuts = torch.searchsorted(
            ordered, _midpoints(centroids), right=True
        )  # values <= midpoint i lie in clusters <= i
        bounds = F.pad(cuts, (1, 0), value=0)
        bounds = F.pad(bounds, (0, 1), value=n)
        counts = bounds[1:] - bounds[:-1]
        sums = prefix[bounds[1:]] - prefix[bounds[:-1]]
        centroids = _pinned(
            torch.where(counts > 0, (sums / counts.clamp(min=1)).float(), centroids).sort().values, pin_zero
        )
    return centroids, torch.bucketize(values, _midpoints(centroids))


def _pinned(centroids: Tensor, pin_zero: bool) -> Tensor:
    """Ascending centroids with the one nearest 0 set to exactly 0 (with `pin_zero`; none lies between it and 0,
    so they stay ascending)."""
    return centroids.index_fill(0, centroids.abs().argmin(), 0.0) if pin_zero else centroids


def _midpoints(centroids: Tensor) -> Tensor:
    """Boundaries between ascending centroids: a value goes to the nearest one (ties to the lower)."""
    return (centroids[1:] + centroids[:-1]) / 2


# torch._int_mm's CUDA kernel (cuBLASLt int8) takes N > 16 rows and K, M multiples of 8, and
# needs int8 tensor cores (compute capability 7.5, Turing, or later); its CPU kernel takes any shape.
CUDA_INT_MM_MIN_ROWS, CUDA_INT_MM_MULTIPLE, CUDA_INT_MM_CAPABILITY = 17, 8, (7, 5)
_WARNED_DEVICES: set[str] = set()


def integer_kernel(device: torch.device) -> str | None:
    """Why `integer_matmul` has no integer kernel on `device` (None: torch._int_mm runs there).

    Args:
        device: the operands' device.
    """
    if device.type in ("cpu", "meta"):  # meta: shapes only (torch._int_mm has a meta kernel)
        return None
    if device.type == "cuda":
        if torch.version.hip is None and torch.cuda.get_device_capability(device) < CUDA_INT_MM_CAPABILITY:
            major, minor = torch.cuda.get_device_capability(device)
            return f"torch._int_mm needs int8 tensor cores (compute capability 7.5+); {device} has {major}.{minor}"
        return None
    return f"torch._int_mm runs on CPU and CUDA only, not {device.type}"


def integer_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact int8 (N, K) @ int8 (K, M) -> int32 (N, M) on torch._int_mm, its path chosen before it runs.

    CPU: torch._int_mm as is. CUDA: its kernel's shape limits (N > 16, K and M multiples of 8)
    are met by zero-padding the operands (zero rows and columns add nothing to the sums) and
    cutting the result back. A device without the kernel (`integer_kernel` says why) computes
    on CPU and warns once per device; nothing here retries after a kernel fails.

    Args:
        a: int8 (N, K).
        b: int8 (K, M); a transposed (column-major) view suits CUDA's kernel best.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"integer_matmul takes int8 operands, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"integer_matmul takes (N, K) @ (K, M), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"integer_matmul's operands are on {a.device} and {b.device}")
    reason = integer_kernel(a.device)
    if reason is not None:
        if str(a.device) not in _WARNED_DEVICES:
            _WARNED_DEVICES.add(str(a.device))
            warnings.warn(f"integer_matmul computes on CPU: {reason}", stacklevel=2)
        return torch._int_mm(a.cpu(), b.cpu()).to(a.device)
    if a.device.type != "cuda":
        return torch._int_mm(a, b)
    return padded_int_mm(a, b)


def padded_int_mm(a: Tensor, b: Tensor) -> Tensor:
    """torch._int_mm(a, b) with a and b zero-padded to CUDA's limits (N > 16, K and M multiples of 8).

    b keeps its layout: a column-major b is padded as its transpose and stays column-major.

    Args:
        a: int8 (N, K).
        b: int8 (K, M).
    """
    (n, k), m = a.shape, b.shape[1]
    if 0 in (n, k, m):
        return torch.zeros(n, m, dtype=torch.int32, device=a.device)
    rows = max(n, CUDA_INT_MM_MIN_ROWS)
    inner, cols = (-(-size // CUDA_INT_MM_MULTIPLE) * CUDA_INT_MM_MULTIPLE for size in (k, m))
    if (rows, inner) != (n, k):
        a = F.pad(a, (0, inner - k, 0, rows - n))
    if (inner, cols) != (k, m):
        column_major = b.stride(0) == 1 and b.stride(1) != 1
        b = F.pad(b.t(), (0, inner - k, 0, cols - m)).t() if column_major else F.pad(b, (0, cols - m, 0, inner - k))
    out = torch._int_mm(a, b)
    return out[:n, :m] if (rows, cols) != (n, m) else out

"""Integer-storage twins of nn.Linear and nn.Embedding: int8, int8 dynamic, int4 group-wise, k-means codebook.

Each module keeps its quantized weight in persistent buffers (integers + float scales or a
codebook), so `model.safetensors` stores integers and `load(save(m))` is bit-identical. Every
module has a `weight` property returning the dequantized float matrix (the tied MLM/LM heads
read `embeddings.word.weight`); `from_float(...)` builds one from a float module and
`swap_quantized` rebuilds them, empty, from the Config's `quantized` list so that
`load_state_dict` can fill them. The bias stays a float Parameter, so it can still be trained.
The integer codes' formulas are in model/quant_math.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import QuantizedLayer
from model.quant_math import (
    dequantize_int4,
    dequantize_int8,
    integer_matmul,
    kmeans_1d,
    pack,
    quantize_int4,
    quantize_int8,
    storage_width,
    unpack,
)

GROUP_SIZES = (32, 64, 128)


class Int8Linear(nn.Module):
    """Weight-only int8 linear, as gpt-fast's WeightOnlyInt8Linear: y = (x @ q^T) * s + b with one scale per
    output channel, or y = x @ (q * s)^T + b with a scale per `group_size` inputs of each channel."""

    def __init__(self, in_features: int, out_features: int, group_size: int | None = None, *, bias: bool = True):
        super().__init__()
        _check_group(in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer(
            "scale", torch.ones(out_features, in_features // group_size) if group_size else torch.ones(out_features)
        )
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_float(
        cls, linear: nn.Linear, group_size: int | None = None, codes: tuple[Tensor, Tensor] | None = None
    ) -> Int8Linear:
        """The int8 twin of `linear` (of type `cls`): quantized weight, float bias copied.

        codes: (q, scale) in `quantize_int8`'s format to store instead of rounding to nearest
        (e.g. from `compress.gptq.round_int8`).
        """
        q, scale = codes if codes is not None else quantize_int8(linear.weight, group_size)
        module = cls(linear.in_features, linear.out_features, group_size, bias=linear.bias is not None)
        return _linear_twin(module, linear, weight_int8=q, scale=scale)

    @property
    def weight(self) -> Tensor:
        return dequantize_int8(self.weight_int8, self.scale)

    def forward(self, x: Tensor) -> Tensor:
        if self.group_size:
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        y = F.linear(x, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int8DynamicLinear(Int8Linear):
    """Int8 weights and int8 activations quantized per token and per weight group at run time.

    Storage and `from_float` are Int8Linear's, plus, when `smoothed`, SmoothQuant's per-input
    factors `smooth` (s): the stored integers are those of W * s and inputs are divided by s
    before they are rounded, which moves the activations' outlier channels into the weights.
    With x' = x / s (or x): y = sum over weight groups g of (q_x,g @ q_w,g^T) * s_w,g * s_x,g + b,
    s_x,g = max|x'_t,g| / 127 for each token t and group g (one group when the weight scales are
    per channel). The integer products run on `torch._int_mm` (int32 accumulation); the path is
    chosen before they run (`model.quant_math.integer_matmul`). In backward the activation rounding is passed straight through (gradients as for
    the dequantized weight, `weight`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int | None = None,
        *,
        bias: bool = True,
        smoothed: bool = False,
    ):
        super().__init__(in_features, out_features, group_size, bias=bias)
        self.register_buffer("smooth", torch.ones(in_features) if smoothed else None)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        group_size: int | None = None,
        codes: tuple[Tensor, Tensor] | None = None,
        smooth: Tensor | None = None,
    ) -> Int8DynamicLinear:
        """The int8 twin of `linear`; with `smooth` (in,) it stores W * smooth (`codes`, if given, round W * smooth)."""
        if smooth is None:
            return super().from_float(linear, group_size, codes)
        q, scale = codes if codes is not None else quantize_int8(linear.weight.detach() * smooth, group_size)
        module = cls(linear.in_features, linear.out_features, group_size, bias=linear.bias is not None, smoothed=True)
        return _linear_twin(module, linear, weight_int8=q, scale=scale, smooth=smooth.detach().float().clone())

    @property
    def weight(self) -> Tensor:
        w = dequantize_int8(self.weight_int8, self.scale)
        return w if self.smooth is None else w / self.smooth

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)  # (N, in)
        with torch.no_grad():
            scale = self.scale.view(self.out_features, -1)  # (out, groups)
            groups = scale.shape[1]
            width = self.in_features // groups
            smoothed = rows.float() if self.smooth is None else rows.float() / self.smooth
            x_groups = smoothed.view(-1, groups, width)
            absmax = x_groups.abs().amax(dim=-1)
            x_scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))  # (N, groups)
            x_int8 = torch.clamp(torch.round(x_groups / x_scale[..., None]), -127, 127).to(torch.int8)
            y = sum(
                integer_matmul(x_int8[:, g], self.weight_int8[:, g * width : (g + 1) * width].t()).float()
                * scale[:, g]
                * x_scale[:, g : g + 1]
                for g in range(groups)
            ).to(x.dtype)  # (N, out)
        if torch.is_grad_enabled() and x.requires_grad:  # straight-through: adds exactly 0 in forward
            z = F.linear(rows, self.weight.to(x.dtype))
            y = y + (z - z.detach())
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """Weight-only int4 linear, group-wise with a scale and an integer zero-point per group; two values per byte."""

    def __init__(self, in_features: int, out_features: int, group_size: int, *, bias: bool = True):
        super().__init__()
        if group_size is None:
            raise ValueError("Int4Linear needs a group_size")
        _check_group(in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight_int4", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, groups))
        self.register_buffer("zero", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        group_size: int,
        symmetric: bool = False,
        codes: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> Int4Linear:
        """The int4 twin of `linear`; codes: (packed, scale, zero) in `quantize_int4`'s format instead of nearest rounding."""
        packed, scale, zero = codes if codes is not None else quantize_int4(linear.weight, group_size, symmetric)
        module = cls(linear.in_features, linear.out_features, group_size, bias=linear.bias is not None)
        return _linear_twin(module, linear, weight_int4=packed, scale=scale, zero=zero)

    @property
    def weight(self) -> Tensor:
        return dequantize_int4(self.weight_int4, self.scale, self.zero)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class ClusteredLinear(nn.Module):
    """Linear whose weights are indices into a codebook of 2**bits fp32 centroids (packed when bits <= 4)."""

    def __init__(self, in_features: int, out_features: int, bits: int, *, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        _register_codebook(self, in_features * out_features, bits)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int) -> ClusteredLinear:
        codebook, indices = _cluster(linear.weight, bits)
        module = cls(linear.in_features, linear.out_features, bits, bias=linear.bias is not None)
        return _linear_twin(module, linear, codebook=codebook, indices=indices)

    @property
    def weight(self) -> Tensor:
        return _decode_clusters(self.codebook, self.indices, self.bits, (self.out_features, self.in_features))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Int8Embedding(nn.Module):
    """Embedding table in int8 with one scale per row (token), or per `group_size` columns of each row;
    lookups dequantize only the rows they read."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int | None = None):
        super().__init__()
        _check_group(embedding_dim, group_size)
        self.num_embeddings, self.embedding_dim, self.group_size = num_embeddings, embedding_dim, group_size
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        shape = (num_embeddings, embedding_dim // group_size) if group_size else (num_embeddings,)
        self.register_buffer("scale", torch.ones(shape))

    @classmethod
    def from_float(cls, embedding: nn.Embedding, group_size: int | None = None) -> Int8Embedding:
        module = cls(embedding.num_embeddings, embedding.embedding_dim, group_size)
        module.weight_int8, module.scale = quantize_int8(embedding.weight, group_size)
        return module

    @property
    def weight(self) -> Tensor:
        return dequantize_int8(self.weight_int8, self.scale)

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        rows = dequantize_int8(self.weight_int8[flat], self.scale[flat])  # (N, E)
        return rows.reshape(*ids.shape, self.embedding_dim)


class ClusteredEmbedding(nn.Module):
    """Embedding table stored as indices into a codebook of 2**bits fp32 centroids; a table with a padding row
    (all zeros, as the correction table of adaptive input embeddings) keeps a centroid at exactly 0."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.bits = num_embeddings, embedding_dim, bits
        _register_codebook(self, num_embeddings * embedding_dim, bits)

    @classmethod
    def from_float(cls, embedding: nn.Embedding, bits: int) -> ClusteredEmbedding:
        module = cls(embedding.num_embeddings, embedding.embedding_dim, bits)
        module.codebook, module.indices = _cluster(embedding.weight, bits, pin_zero=embedding.padding_idx is not None)
        return module

    @property
    def weight(self) -> Tensor:
        return _decode_clusters(self.codebook, self.indices, self.bits, (self.num_embeddings, self.embedding_dim))

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight)


def _check_group(in_features: int, group_size: int | None) -> None:
    if group_size is not None and (group_size not in GROUP_SIZES or in_features % group_size):
        raise ValueError(
            f"group_size must be None or one of {GROUP_SIZES} dividing in_features {in_features}, got {group_size}"
        )


def _register_codebook(module: nn.Module, numel: int, bits: int) -> None:
    module.register_buffer("codebook", torch.zeros(2**bits))
    module.register_buffer("indices", torch.zeros(_packed_length(numel, bits), dtype=torch.uint8))


def _linear_twin(module: nn.Module, linear: nn.Linear, **buffers: Tensor) -> nn.Module:
    """Fill a new integer-storage `module` with its quantized `buffers` and a float copy of `linear`'s bias."""
    for name, value in buffers.items():
        setattr(module, name, value)
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach().float().clone())
    return module


def _packed_length(n: int, bits: int) -> int:
    return math.ceil(n * storage_width(bits) / 8)


def _cluster(w: Tensor, bits: int, pin_zero: bool = False) -> tuple[Tensor, Tensor]:
    """k-means codebook of one matrix and its packed, flattened indices (zero-padded to whole bytes)."""
    width = storage_width(bits)
    codebook, index = kmeans_1d(w, 2**bits, pin_zero=pin_zero)
    padded = F.pad(index.to(torch.uint8), (0, -index.numel() % (8 // width)))
    return codebook, pack(padded, width)


def _decode_clusters(codebook: Tensor, indices: Tensor, bits: int, shape: tuple[int, int]) -> Tensor:
    index = unpack(indices, storage_width(bits))[: shape[0] * shape[1]]
    return codebook[index.long()].view(shape)


def empty_twin(module: nn.Module, layer: QuantizedLayer) -> nn.Module:
    """The integer-storage module that replaces `module` for `layer` (zero-filled buffers, for load_state_dict)."""
    if isinstance(module, nn.Embedding):
        if layer.mode == "int8":
            return Int8Embedding(module.num_embeddings, module.embedding_dim, layer.group_size)
        if layer.mode == "cluster":
            return ClusteredEmbedding(module.num_embeddings, module.embedding_dim, layer.bits)
        raise ValueError(f"quantized layer {layer.name}: embeddings support modes int8 and cluster, not {layer.mode!r}")
    if not isinstance(module, nn.Linear):
        raise ValueError(
            f"quantized layer {layer.name} is a {type(module).__name__}; only Linear and Embedding can be quantized"
        )
    args, bias = (module.in_features, module.out_features), module.bias is not None
    if layer.mode == "int8":
        return Int8Linear(*args, layer.group_size, bias=bias)
    if layer.mode == "int8-dynamic":
        return Int8DynamicLinear(*args, layer.group_size, bias=bias, smoothed=layer.smoothed)
    if layer.mode == "int4":
        return Int4Linear(*args, layer.group_size, bias=bias)
    return ClusteredLinear(*args, layer.bits, bias=bias)


def swap_quantized(model: nn.Module, layers: Iterable[QuantizedLayer]) -> None:
    """Replace each named module of `model` with its empty integer-storage twin, in place.

    Called by `Transformer.__init__` for `config.quantized`; the buffers are then filled by
    `load_state_dict`. A name that is not a Linear/Embedding of the model raises ValueError.
    """
    for layer in layers:
        parent_name, _, child = layer.name.rpartition(".")
        try:
            module = model.get_submodule(layer.name)
        except AttributeError:
            raise ValueError(f"quantized layer {layer.name!r} is not a module of this model") from None
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            raise ValueError(
                f"quantized layer {layer.name} is a {type(module).__name__}; only Linear and Embedding can be quantized"
            )
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, empty_twin(module, layer))

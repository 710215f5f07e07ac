"""Export twins of model/quantized.py's integer-storage modules: they trace to integer ONNX weights + DequantizeLinear.

`swap_for_export(model)` replaces, in place (on export's private copy), every quantized module
with a twin that computes the same numbers through two custom ops, and `TRANSLATIONS` maps those
ops to ONNX for torch's exporter:
  int8 Linear          int8 (in,out) weight, DequantizeLinear per output channel (axis 1) or, with
                       group scales, blocked along the inputs (axis 0, block = group size; opset 21)
  int4 Linear          uint4 (in,out) weight, blocked DequantizeLinear (axis 0, block = group_size,
                       uint4 zero-points; opset 21), MatMul: ONNX Runtime fuses it into MatMulNBits
  int8 dynamic Linear  activation quantization per token and weight group, after the smoothing
                       factors (as the PyTorch module), MatMulInteger on int8 x int8 (one product
                       per weight group), rescale: the same integers
  clustered Linear     codebook Gather: fp32 codebook (2**bits) + uint8 indices (in,out), one per weight
  int8 Embedding       Gather the int8 rows and their scales, DequantizeLinear on the rows (axis 0), or
                       with group scales blocked along each row (axis 1, block = group size)
  clustered Embedding  Gather the index rows, then the codebook
Weights are stored transposed (in, out) so that the dequantized matrix feeds MatMul directly,
the pattern ONNX Runtime's quantized-weight fusions look for. The 4-bit values travel as uint8
through the exporter (torch has no 4-bit dtype) behind a Cast to UINT4 that `should_fold`
folds into a packed 4-bit initializer.
"""

from __future__ import annotations

import onnx_ir as ir
import torch
from onnxscript import opset21 as op
from torch import Tensor, nn

from model.quant_math import storage_width, unpack
from model.quantized import (
    ClusteredEmbedding,
    ClusteredLinear,
    Int4Linear,
    Int8DynamicLinear,
    Int8Embedding,
    Int8Linear,
)

FOUR_BIT = (ir.DataType.UINT4, ir.DataType.INT4)
_STORAGE = (ir.DataType.INT8, ir.DataType.UINT8)


@torch.library.custom_op("flashlite::dequantize_linear", mutates_args=())
def dequantize_linear(q: Tensor, scale: Tensor, zero: Tensor | None, axis: int, block_size: int, bits: int) -> Tensor:
    """ONNX DequantizeLinear: (q - zero) * scale, scale per index of `axis` (block_size 0) or per block of `axis`."""
    if block_size:
        scale = scale.repeat_interleave(block_size, dim=axis)
        zero = None if zero is None else zero.repeat_interleave(block_size, dim=axis)
    else:
        shape = [-1 if d == axis else 1 for d in range(q.dim())]
        scale = scale.reshape(shape)
        zero = None if zero is None else zero.reshape(shape)
    x = q.float() if zero is None else q.float() - zero.float()
    return x * scale


@dequantize_linear.register_fake
def _(q, scale, zero, axis, block_size, bits):
    return q.new_empty(q.shape, dtype=torch.float32)


@torch.library.custom_op("flashlite::codebook_lookup", mutates_args=())
def codebook_lookup(codebook: Tensor, indices: Tensor) -> Tensor:
    """codebook[indices]: uint8 indices into a float codebook."""
    return codebook[indices.long()]


@codebook_lookup.register_fake
def _(codebook, indices):
    return codebook.new_empty(indices.shape)


@torch.library.custom_op("flashlite::matmul_integer", mutates_args=())
def matmul_integer(a: Tensor, b: Tensor) -> Tensor:
    """Exact int8 @ int8 -> int32 with broadcasting, as ONNX MatMulInteger (float64 is exact for these sums)."""
    return torch.matmul(a.double(), b.double()).to(torch.int32)


@matmul_integer.register_fake
def _(a, b):
    return torch.empty(
        torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]), dtype=torch.int32
    )


def _dequantize_onnx(q, scale, zero, axis: int, block_size: int, bits: int):
    if bits == 4:
        q, zero = op.Cast(q, to=ir.DataType.UINT4), op.Cast(zero, to=ir.DataType.UINT4)
        return op.DequantizeLinear(q, scale, zero, axis=axis, block_size=block_size)
    if block_size:
        return op.DequantizeLinear(q, scale, axis=axis, block_size=block_size)
    return op.DequantizeLinear(q, scale, axis=axis)  # no block_size attribute: valid before opset 21 too


def _codebook_onnx(codebook, indices):
    return op.Gather(codebook, op.Cast(indices, to=ir.DataType.INT32))


def _matmul_integer_onnx(a, b):
    return op.MatMulInteger(a, b)


TRANSLATIONS = {
    torch.ops.flashlite.dequantize_linear.default: _dequantize_onnx,
    torch.ops.flashlite.codebook_lookup.default: _codebook_onnx,
    torch.ops.flashlite.matmul_integer.default: _matmul_integer_onnx,
}


def should_fold(node: ir.Node) -> bool | None:
    """The exporter's constant-folding rule (None: the optimizer's default size-based rule).

    Integer weights stay integer, except that 4-bit Casts of them are folded into packed 4-bit
    initializers; the optimizer alone would fold small integer weights into float ones (undoing
    the quantization) and leave large 4-bit Casts unfolded (a byte per 4-bit value). A weight
    read only through Transposes (a Linear; one per layer that runs a shared block) is folded
    into its transposed form whatever its size: MatMul then gets a constant weight, which ONNX
    Runtime's quantizers need, and nothing is transposed at run time. A weight also read
    directly, such as the word embeddings tied to an output head, keeps its one stored copy.
    """
    weights = [v for v in node.inputs if v is not None and v.const_value is not None]
    if any(v.dtype in _STORAGE for v in weights):
        return node.op_type == "Cast" and node.domain == "" and node.attributes["to"].as_int() in FOUR_BIT
    transposed_weight = node.op_type == "Transpose" and node.domain == "" and weights and node.inputs[0] is weights[0]
    if transposed_weight and all(user.op_type == "Transpose" and user.domain == "" for user in weights[0].consumers()):
        return True
    return None


class _DequantizedLinear(nn.Module):
    """y = x @ DequantizeLinear(q_t) + b, with q_t the (in, out) integer weight."""

    def __init__(self, q_t: Tensor, scale: Tensor, zero: Tensor | None, axis: int, block_size: int, bits: int, bias):
        super().__init__()
        self.register_buffer("q_t", q_t.contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("zero", None if zero is None else zero.contiguous())
        self.axis, self.block_size, self.bits, self.bias = axis, block_size, bits, bias

    @property
    def weight(self) -> Tensor:  # (out, in), for the tied unembedding of a factorized embedding
        return dequantize_linear(self.q_t, self.scale, self.zero, self.axis, self.block_size, self.bits).T

    def forward(self, x: Tensor) -> Tensor:
        y = x @ dequantize_linear(self.q_t, self.scale, self.zero, self.axis, self.block_size, self.bits)
        return y if self.bias is None else y + self.bias


class _DynamicInt8Linear(nn.Module):
    """Int8DynamicLinear's arithmetic: inputs divided by the smoothing factors (if any), int8 per token and
    weight group, exact integer products, then both scales."""

    def __init__(self, module: Int8DynamicLinear):
        super().__init__()
        scale = module.scale.reshape(module.out_features, -1).T  # (groups, out)
        self.groups, self.width = scale.shape[0], module.in_features // scale.shape[0]
        q_t = module.weight_int8.T  # (in, out)
        self.register_buffer(
            "q_t", (q_t if self.groups == 1 else q_t.reshape(self.groups, self.width, -1)).contiguous()
        )
        self.register_buffer("scale", (scale[0] if self.groups == 1 else scale[:, None, :]).contiguous())
        self.register_buffer("smooth", module.smooth)
        self.bias = module.bias

    @property
    def weight(self) -> Tensor:
        w = (self.q_t.float() * self.scale).reshape(-1, self.scale.shape[-1]).T
        return w if self.smooth is None else w / self.smooth

    def forward(self, x: Tensor) -> Tensor:
        x = x.float() if self.smooth is None else x.float() / self.smooth
        if self.groups > 1:  # (..., G, 1, W): one integer product per input group, each with its own scales
            x = x.reshape(*x.shape[:-1], self.groups, 1, self.width)
        absmax = x.abs().amax(dim=-1, keepdim=True)
        x_scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
        x_int8 = torch.clamp(torch.round(x / x_scale), -127, 127).to(torch.int8)
        y = matmul_integer(x_int8, self.q_t).float() * self.scale * x_scale
        if self.groups > 1:
            y = y.sum(dim=-3).squeeze(-2)  # (..., out)
        return y if self.bias is None else y + self.bias


class _CodebookLinear(nn.Module):
    """y = x @ codebook[indices_t] + b, indices_t (in, out) uint8."""

    def __init__(self, module: ClusteredLinear):
        super().__init__()
        shape = (module.out_features, module.in_features)
        self.register_buffer("codebook", module.codebook)
        self.register_buffer("indices_t", _codebook_indices(module.indices, module.bits, shape).T.contiguous())
        self.bias = module.bias

    @property
    def weight(self) -> Tensor:
        return codebook_lookup(self.codebook, self.indices_t).T

    def forward(self, x: Tensor) -> Tensor:
        y = x @ codebook_lookup(self.codebook, self.indices_t)
        return y if self.bias is None else y + self.bias


class _DequantizedEmbedding(nn.Module):
    """Int8Embedding: gather int8 rows and their scales, dequantize only what was gathered."""

    def __init__(self, module: Int8Embedding):
        super().__init__()
        self.register_buffer("weight_int8", module.weight_int8)
        self.register_buffer("scale", module.scale)
        # One scale per row: DequantizeLinear along the rows; a scale per group: blocks of each row.
        self.axis, self.block_size = (0, 0) if module.group_size is None else (1, module.group_size)

    @property
    def weight(self) -> Tensor:  # the whole table, for the tied MLM/LM heads
        return dequantize_linear(self.weight_int8, self.scale, None, self.axis, self.block_size, 8)

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)  # (N,)
        rows = dequantize_linear(
            self.weight_int8[flat], self.scale[flat], None, self.axis, self.block_size, 8
        )  # (N, E)
        return rows.reshape(*ids.shape, rows.shape[-1])


class _CodebookEmbedding(nn.Module):
    """ClusteredEmbedding: gather index rows (uint8), then look them up in the codebook."""

    def __init__(self, module: ClusteredEmbedding):
        super().__init__()
        shape = (module.num_embeddings, module.embedding_dim)
        self.register_buffer("codebook", module.codebook)
        self.register_buffer("indices", _codebook_indices(module.indices, module.bits, shape))

    @property
    def weight(self) -> Tensor:
        return codebook_lookup(self.codebook, self.indices)

    def forward(self, ids: Tensor) -> Tensor:
        return codebook_lookup(self.codebook, self.indices[ids])


def _codebook_indices(packed: Tensor, bits: int, shape: tuple[int, int]) -> Tensor:
    """Packed codebook indices -> (rows, cols) uint8, one byte per weight (ONNX Gather takes whole-integer indices)."""
    return unpack(packed, storage_width(bits))[: shape[0] * shape[1]].view(shape)


def _twin(module: nn.Module) -> nn.Module | None:
    # Int8DynamicLinear before Int8Linear: it is a subclass with different arithmetic.
    if isinstance(module, Int8DynamicLinear):
        return _DynamicInt8Linear(module)
    if isinstance(module, Int8Linear):
        if module.scale.dim() == 1:  # one scale per output channel
            return _DequantizedLinear(module.weight_int8.T, module.scale, None, 1, 0, 8, module.bias)
        block = module.in_features // module.scale.shape[1]
        return _DequantizedLinear(module.weight_int8.T, module.scale.T, None, 0, block, 8, module.bias)
    if isinstance(module, Int4Linear):
        values = unpack(module.weight_int4, 4).view(module.out_features, module.in_features)  # (out, in) 0..15
        return _DequantizedLinear(values.T, module.scale.T, module.zero.T, 0, module.group_size, 4, module.bias)
    if isinstance(module, ClusteredLinear):
        return _CodebookLinear(module)
    if isinstance(module, Int8Embedding):
        return _DequantizedEmbedding(module)
    if isinstance(module, ClusteredEmbedding):
        return _CodebookEmbedding(module)
    return None


def swap_for_export(model: nn.Module) -> int:
    """Replace every integer-storage module of `model` by its export twin, in place; returns how many were swapped.

    A module shared by several parents (tied blocks) gets one twin, so its integers stay stored once.
    """
    twins: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) not in twins:
                twin = _twin(child)
                if twin is None:
                    continue
                twins[id(child)] = twin
            setattr(parent, name, twins[id(child)])
    return len(twins)


def needs_blocks(model: nn.Module) -> bool:
    """Whether `model` holds group-quantized layers (int4, grouped int8): blocked DequantizeLinear needs opset >= 21."""
    return any(
        isinstance(m, Int4Linear)
        or (isinstance(m, Int8Linear) and not isinstance(m, Int8DynamicLinear) and m.scale.dim() == 2)
        for m in model.modules()
    )


def has_dynamic(model: nn.Module) -> bool:
    """Whether `model` quantizes activations at run time (int8-dynamic layers)."""
    return any(isinstance(m, Int8DynamicLinear) for m in model.modules())

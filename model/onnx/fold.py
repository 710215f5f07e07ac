"""Fold a graph's constant 8-bit DequantizeLinear weights into float initializers, so ONNX Runtime can requantize them.

flashlite exports an int8 weight as an integer initializer behind DequantizeLinear. ONNX Runtime
runs that as "dequantize every weight on every call, then a float MatMul", and its quantizers
skip such MatMuls (their weight is no initializer). Folding gives them back the float weight
flashlite rounded, which ONNX Runtime's int8 quantizers turn into integer products
(DynamicQuantizeLinear + MatMulInteger, fused at load). 4-bit weights are left alone: ONNX
Runtime already fuses their DequantizeLinear + MatMul into MatMulNBits.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

_EIGHT_BIT = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
_QUANTIZABLE = {"MatMul": 1, "Gemm": 1, "Gather": 0}  # op -> the input that holds its weight


def fold_dequantized_weights(proto: onnx.ModelProto) -> int:
    """Replace, in place, each DequantizeLinear of constant 8-bit weights by a float initializer of its output.

    Args:
        proto: an ONNX model (its main graph is folded).

    Returns:
        How many DequantizeLinear nodes were folded.
    """
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    kept, folded = [], []
    for node in graph.node:
        constant = all(not name or name in initializers for name in node.input)
        if (
            node.op_type != "DequantizeLinear"
            or not constant
            or initializers[node.input[0]].data_type not in _EIGHT_BIT
        ):
            kept.append(node)
            continue
        arrays = [numpy_helper.to_array(initializers[name]) if name else None for name in node.input]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        value = dequantize(*arrays, axis=int(attrs.get("axis", 1)), block_size=int(attrs.get("block_size", 0)))
        folded.append(numpy_helper.from_array(value, node.output[0]))
    if not folded:
        return 0
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    survivors = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(survivors + folded)
    return len(folded)


def dequantize(
    q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None = None, *, axis: int = 1, block_size: int = 0
) -> np.ndarray:
    """ONNX DequantizeLinear in numpy: (q - zero) * scale, per tensor, per index of `axis`, or per block of it.

    Args:
        q: the integer tensor.
        scale: a scalar, one value per index of `axis` (block_size 0), or q's shape with `axis`
            divided into blocks of `block_size`.
        zero: the zero points, shaped as `scale` (None = 0).
        axis: the quantized axis (negative counts from the end).
        block_size: 0, or the block length along `axis`.

    Returns:
        The float tensor, in scale's dtype.
    """
    axis = axis % q.ndim
    x = q.astype(np.float64)
    if zero is not None:
        x = x - _expand(zero, q.shape, axis, block_size)
    return (x * _expand(scale, q.shape, axis, block_size)).astype(scale.dtype)


def _expand(t: np.ndarray, shape: tuple[int, ...], axis: int, block_size: int) -> np.ndarray:
    """A scale or zero-point tensor broadcastable against a tensor of `shape`, in float64."""
    t = t.astype(np.float64)
    if block_size:
        return np.repeat(t, block_size, axis=axis).take(np.arange(shape[axis]), axis=axis)
    if t.size == 1:
        return t.reshape(())
    return t.reshape([-1 if d == axis else 1 for d in range(len(shape))])


def quantizable_weights(proto: onnx.ModelProto) -> list[str]:
    """The float initializers (2-D or more) that feed a MatMul, Gemm or Gather as its weight."""
    floats = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2}
    return [
        node.input[_QUANTIZABLE[node.op_type]]
        for node in proto.graph.node
        if node.op_type in _QUANTIZABLE and node.input[_QUANTIZABLE[node.op_type]] in floats
    ]

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
_PRODUCTS = ("MatMul", "Gemm")  # their weight is input 1
_QUANTIZABLE = {**dict.fromkeys(_PRODUCTS, 1), "Gather": 0}  # op -> the input that holds its weight


def fold_dequantized_weights(proto: onnx.ModelProto) -> int:
    """Replace, in place, each DequantizeLinear of constant 8-bit weights that feeds matrix products by a float initializer.

    Only weights whose every consumer is a MatMul or Gemm (as its weight), directly or through a 2-D
    Transpose (a tied output head), are folded: those are what ONNX Runtime's quantizer takes back.
    Any other use (say a table that is also gathered) keeps its integers, so the file does not grow.

    Args:
        proto: an ONNX model (its main graph is folded).

    Returns:
        How many DequantizeLinear nodes were folded.
    """
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    dropped, folded = set(), []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or not all(not name or name in initializers for name in node.input):
            continue
        if initializers[node.input[0]].data_type not in _EIGHT_BIT or node.output[0] in outputs:
            continue
        users = consumers.get(node.output[0], [])
        transpose = users[0] if len(users) == 1 and users[0].op_type == "Transpose" else None
        name = transpose.output[0] if transpose is not None else node.output[0]
        if not _feeds_products(name, consumers) or transpose is not None and _perm(transpose) not in ([1, 0], None):
            continue
        arrays = [numpy_helper.to_array(initializers[n]) if n else None for n in node.input]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        value = dequantize(*arrays, axis=int(attrs.get("axis", 1)), block_size=int(attrs.get("block_size", 0)))
        folded.append(numpy_helper.from_array(value.T.copy() if transpose is not None else value, name))
        dropped |= {id(node)} | ({id(transpose)} if transpose is not None else set())
    if not folded:
        return 0
    kept = [node for node in graph.node if id(node) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input} | outputs
    survivors = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(survivors + folded)
    return len(folded)


def _feeds_products(name: str, consumers: dict[str, list[onnx.NodeProto]]) -> bool:
    """Whether every consumer of `name` is a MatMul or Gemm that takes it as its weight."""
    users = consumers.get(name, [])
    return bool(users) and all(n.op_type in _PRODUCTS and list(n.input).index(name) == 1 for n in users)


def _perm(node: onnx.NodeProto) -> list[int] | None:
    return next((list(onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), None)


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

"""Numeric paths are chosen before they run: integer_matmul never retries in float, OrtModel converts only ORT's refusals."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from model import quant_math
from model.config import Config
from model.onnx import deployed
from model.onnx.runtime import OrtModel, graph_metadata
from model.quant_math import integer_matmul, padded_int_mm

REAL_INT_MM = torch._int_mm


def int8(*shape: int) -> torch.Tensor:
    return torch.randint(-127, 128, shape, dtype=torch.int8)


def exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.long() @ b.long()).int()


def cuda_like_int_mm(calls: list):
    """torch._int_mm with the CUDA kernel's shape limits: refuses N <= 16 and K, M not multiples of 8."""

    def int_mm(a, b):
        calls.append((tuple(a.shape), tuple(b.shape), b.stride()))
        if a.shape[0] <= 16 or a.shape[1] % 8 or b.shape[1] % 8:
            raise RuntimeError(f"self.size(0) needs to be greater than 16 ... got {tuple(a.shape)} @ {tuple(b.shape)}")
        return REAL_INT_MM(a, b)

    return int_mm


def test_a_failing_integer_kernel_is_not_retried_in_float64(monkeypatch):
    def broken(a, b):
        raise RuntimeError("the int8 kernel failed")

    monkeypatch.setattr(torch, "_int_mm", broken)
    with pytest.raises(RuntimeError, match="the int8 kernel failed"):
        integer_matmul(int8(33, 64), int8(64, 24))


@pytest.mark.parametrize("n, k, m", [(1, 13, 5), (16, 64, 24), (33, 40, 7), (3, 8, 8), (17, 8, 8), (4, 0, 8)])
@pytest.mark.parametrize("column_major", [False, True])
def test_cuda_shapes_are_padded_up_front_to_what_its_kernel_takes(monkeypatch, n, k, m, column_major):
    calls = []
    monkeypatch.setattr(torch, "_int_mm", cuda_like_int_mm(calls))
    a = int8(n, k)
    b = int8(m, k).t() if column_major else int8(k, m)  # the weight's transpose, as Int8DynamicLinear passes it
    out = padded_int_mm(a, b)
    assert out.dtype == torch.int32 and torch.equal(out, exact(a, b))
    if k:
        ((rows, inner), (_, cols), stride) = calls[0]
        assert rows == max(n, 17) and inner == -(-k // 8) * 8 and cols == -(-m // 8) * 8
        assert (stride[0] == 1) == column_major or (inner, cols) == (k, m)  # padding keeps b's layout


def test_integer_matmul_routes_by_device_before_running(monkeypatch):
    calls = []
    a, b = int8(3, 12), int8(12, 5)  # CPU: the kernel takes any shape, so no padding
    monkeypatch.setattr(torch, "_int_mm", lambda x, y: calls.append(x.shape) or REAL_INT_MM(x, y))
    assert torch.equal(integer_matmul(a, b), exact(a, b)) and calls == [(3, 12)]
    assert quant_math.integer_kernel(torch.device("cpu")) is None
    assert "CPU and CUDA only, not mps" in quant_math.integer_kernel(torch.device("mps"))


def test_a_device_without_the_kernel_computes_on_cpu_and_says_so_once(monkeypatch):
    monkeypatch.setattr(quant_math, "_WARNED_DEVICES", set())
    monkeypatch.setattr(quant_math, "integer_kernel", lambda device: "no int8 kernel here (test)")
    a, b = int8(5, 16), int8(16, 3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert torch.equal(integer_matmul(a, b), exact(a, b))
        assert torch.equal(integer_matmul(a, b), exact(a, b))
    assert [str(w.message) for w in record] == ["integer_matmul computes on CPU: no int8 kernel here (test)"]


def test_integer_matmul_refuses_what_it_cannot_multiply():
    with pytest.raises(TypeError, match="int8 operands"):
        integer_matmul(int8(2, 8).float(), int8(8, 8))
    with pytest.raises(ValueError, match=r"\(2, 8\) and \(4, 8\)"):
        integer_matmul(int8(2, 8), int8(4, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n, k, m", [(1, 13, 5), (16, 64, 24), (33, 40, 7), (64, 256, 64)])
def test_integer_matmul_on_cuda_is_exact_without_warnings(n, k, m):
    a, b = int8(n, k).cuda(), int8(m, k).cuda().t()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = integer_matmul(a, b)
    assert out.is_cuda and torch.equal(out.cpu(), exact(a.cpu(), b.cpu()))


# ---------------------------------------------------------------- ONNX Runtime's load errors


def flashlite_graph(path, output_type=TensorProto.FLOAT):
    """A flashlite-tagged Identity graph; an INT64 output type makes ONNX Runtime refuse it (the checker does not)."""
    w = numpy_helper.from_array(np.arange(4, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", output_type, [4])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    for key, value in graph_metadata(Config.preset("tiny"), "encoder").items():
        model.metadata_props.add(key=key, value=value)
    onnx.save_model(model, str(path))
    return path


def test_a_file_onnx_runtime_refuses_is_a_value_error_naming_it(tmp_path):
    path = flashlite_graph(tmp_path / "model.onnx", TensorProto.INT64)
    with pytest.raises(ValueError, match="ONNX Runtime cannot load") as err:
        OrtModel(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "error",
    [MemoryError("out of memory"), RuntimeError("a bug"), ort_errors.RuntimeException("ORT internal")],
    ids=["memory", "runtime", "ort-runtime"],
)
def test_other_errors_while_opening_a_session_propagate(tmp_path, monkeypatch, error):
    path = flashlite_graph(tmp_path / "model.onnx")

    def session(*args, **kwargs):
        raise error

    monkeypatch.setattr(deployed.ort, "InferenceSession", session)  # the one place sessions are opened
    with pytest.raises(type(error)) as caught:
        OrtModel(path)
    assert caught.value is error

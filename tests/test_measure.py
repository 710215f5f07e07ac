"""Tests for compress.evaluate.measure: parameter counts, bytes on disk (safetensors, ONNX with external data), peak memory, latency."""

import sys
import time

import numpy as np
import pytest
import torch

from compress.evaluate import measure
from model import Config, Transformer, save


@pytest.fixture(scope="module")
def tiny():
    return Transformer(Config.preset("tiny", decoder_layers=0, heads=("classify",), n_labels=2)).eval()


def _batch():
    return {
        "input_ids": torch.randint(5, 512, (2, 16)),
        "attention_mask": torch.ones(2, 16, dtype=torch.int64),
        "labels": torch.tensor([0, 1]),
    }


def test_count_params_counts_a_shared_block_once_per_use_and_once_stored():
    shared = Transformer(Config.preset("tiny", n_layers=4, encoder_share=(0, 0, 1, 1)))
    stored = sum(p.numel() for p in shared.parameters())  # torch yields each shared Parameter once
    blocks = sum(p.numel() for p in shared.encoder.blocks.parameters())
    assert measure.count_params(shared) == (stored + blocks, stored)  # each of the two blocks runs twice


def test_size_on_disk(tmp_path, tiny):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"x" * 12345)
    assert measure.size_on_disk(path) == 12345
    save(tiny, tmp_path / "saved")
    weights = (tmp_path / "saved" / "model.safetensors").stat().st_size
    assert measure.size_on_disk(tmp_path / "saved") == weights  # config and manifest are not weights
    with pytest.raises(FileNotFoundError, match="no model file"):
        measure.size_on_disk(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .safetensors or .onnx"):
        measure.size_on_disk(tmp_path / "empty")


def test_size_on_disk_counts_onnx_external_data(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((64, 64), dtype=np.float32), name="w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [weight],
    )
    model = helper.make_model(graph)
    folder = tmp_path / "onnx"
    folder.mkdir()
    onnx.save_model(model, folder / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    data = (folder / "m.onnx.data").stat().st_size
    assert data >= 64 * 64 * 4
    total = (folder / "m.onnx").stat().st_size + data
    assert measure.size_on_disk(folder / "m.onnx") == total == measure.size_on_disk(folder)
    (folder / "m.onnx.data").unlink()
    with pytest.raises(FileNotFoundError, match="m.onnx.data"):
        measure.size_on_disk(folder / "m.onnx")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU peak memory reads /proc/self (Linux)")
def test_peak_memory_sees_a_temporary_allocation():
    def allocate():
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, every page touched
        del block

    peak = measure.peak_memory(allocate)
    assert 60 * 2**20 <= peak <= 200 * 2**20
    assert measure.peak_memory(lambda: None) < 8 * 2**20
    with pytest.raises(ValueError, match="device must be 'cpu' or a CUDA device"):
        measure.peak_memory(lambda: None, device="meta")


def test_latency_of_a_sleep():
    result = measure.latency(lambda: time.sleep(0.01), warmup=1, repeat=5)
    assert set(result) == {"p50_ms", "p90_ms", "mean_ms"}
    assert 10 <= result["p50_ms"] <= result["p90_ms"] < 500
    calls = []
    measure.latency(lambda: calls.append(1), warmup=2, repeat=3, sync=lambda: calls.append(0))
    assert calls.count(1) == 5 and calls.count(0) == 6  # a sync before and after each timed call
    with pytest.raises(ValueError, match="repeat must be >= 1"):
        measure.latency(lambda: None, repeat=0)


def test_time_model_restores_backend_and_mode(tiny):
    tiny.train()
    result = measure.time_model(tiny, _batch(), warmup=1, repeat=3, backend="reference")
    assert result["p50_ms"] > 0
    assert tiny.attention_backend == "auto" and tiny.training
    tiny.eval()


def test_time_onnx_takes_a_session_or_a_callable(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["y"], to=TensorProto.FLOAT)],
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t"])],
    )
    path = tmp_path / "cast.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert measure.time_onnx(session, _batch(), warmup=1, repeat=3)["p50_ms"] > 0
    seen = []
    measure.time_onnx(lambda batch: seen.append(sorted(batch)), _batch(), warmup=0, repeat=2)
    assert seen == [["attention_mask", "input_ids", "labels"]] * 2
    with pytest.raises(ValueError, match="lacks \\['input_ids'\\]"):
        measure.time_onnx(session, {"attention_mask": torch.ones(1, 2)})

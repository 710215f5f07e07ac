"""Tests for model/onnx/fold.py and the integer products that ONNX Runtime quantization gives a flashlite int8 export."""

import collections

import numpy as np
import onnx
import pytest
import torch

from compress import Quantize
from model import Config, OrtModel, Transformer, export_onnx
from model.onnx.fold import dequantize, fold_dequantized_weights, quantizable_weights
from model.onnx.ort_quantize import quantize_onnx

TINY = dict(decoder_layers=0, heads=("mlm",))


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_dequantize_matches_hand_computed_values():
    q = np.array([[1, -2, 3, 4], [5, 6, -7, 8]], dtype=np.int8)
    per_row = dequantize(q, np.array([0.5, 2.0], dtype=np.float32), axis=0)
    np.testing.assert_array_equal(per_row, [[0.5, -1.0, 1.5, 2.0], [10.0, 12.0, -14.0, 16.0]])
    blocked = dequantize(
        q.astype(np.uint8) & 15,
        np.array([[1.0, 10.0], [2.0, 20.0]], dtype=np.float32),
        np.array([[1, 0], [0, 2]], dtype=np.uint8),
        axis=1,
        block_size=2,
    )  # rows [1, 14, 3, 4] and [5, 6, 9, 8] after masking to 4 bits
    np.testing.assert_array_equal(blocked, [[0.0, 13.0, 30.0, 40.0], [10.0, 12.0, 140.0, 120.0]])
    assert dequantize(q, np.array(0.25, dtype=np.float32))[1, 3] == 2.0
    assert dequantize(q, np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32), axis=-1)[1, 2] == -21.0


@pytest.mark.parametrize("group_size", [None, 32])
def test_folding_keeps_the_graph_s_outputs(group_size, tmp_path):
    torch.manual_seed(0)
    model = Quantize("int8", group_size=group_size)(Transformer(Config.preset("tiny", **TINY)).eval())
    export_onnx(model, tmp_path / "int8.onnx")
    proto = onnx.load(str(tmp_path / "int8.onnx"))
    before = len(quantizable_weights(proto))
    folded = fold_dequantized_weights(proto)
    assert folded >= 6 * len(model.config.encoder)  # q, k, v, out, up, down of every layer at least
    assert len(quantizable_weights(proto)) >= before + 6 * len(model.config.encoder)  # float MatMul weights again
    constants = {i.name for i in proto.graph.initializer}
    assert not [n.name for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants]
    onnx.save(proto, str(tmp_path / "folded.onnx"))
    onnx.checker.check_model(str(tmp_path / "folded.onnx"), full_check=True)
    batch = {"input_ids": torch.randint(5, 500, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.int64)}
    batch["attention_mask"][1, 7:] = 0
    a, b = OrtModel(tmp_path / "int8.onnx")(batch), OrtModel(tmp_path / "folded.onnx")(batch)
    np.testing.assert_allclose(b.hidden_states, a.hidden_states, atol=1e-5)


def test_ort_int8_dynamic_of_a_flashlite_int8_export_runs_integer_products(tmp_path):
    torch.manual_seed(0)
    model = Quantize("int8")(Transformer(Config.preset("tiny", **TINY)).eval())
    export_onnx(model, tmp_path / "int8.onnx")
    assert _ops(tmp_path / "int8.onnx")["MatMulInteger"] == 0  # weights dequantized on every call
    report = quantize_onnx(tmp_path / "int8.onnx", tmp_path / "int8-dynamic.onnx", "int8-dynamic")
    ops = _ops(report.paths["encoder"])
    assert ops["MatMulInteger"] >= 6 * len(model.config.encoder) and ops["DynamicQuantizeLinear"] > 0
    assert report.sqnr["hidden_states"] > 20  # against the flashlite int8 file: ORT's int8 activations add noise


def test_ort_quantization_refuses_a_graph_with_nothing_left_to_quantize(tmp_path):
    torch.manual_seed(0)
    classifier = Config.preset("tiny", decoder_layers=0, heads=("classify",), n_labels=2)  # no tied table to fold
    model = Quantize("int8-dynamic", group_size=None)(Transformer(classifier).eval())
    export_onnx(model, tmp_path / "dynamic.onnx")
    with pytest.raises(ValueError, match="no float MatMul or Gather weight"):
        quantize_onnx(tmp_path / "dynamic.onnx", tmp_path / "again.onnx", "int8-dynamic")
    assert not (tmp_path / "again.onnx").exists()

"""Tests for model/onnx/residual_sum.py: residual sums before layer norms, which ONNX Runtime leaves unfused."""

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from model import Config, OrtModel, Transformer, export_onnx
from model.onnx.ort_quantize import quantize_onnx

TINY_ENCODER = dict(decoder_layers=0, heads=("mlm",))


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _ops_run(path, tmp_path) -> collections.Counter:
    """The operators of the graph ONNX Runtime runs after its load-time fusions."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}.run.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return _ops(options.optimized_model_filepath)


def _norm_inputs(path) -> collections.Counter:
    """The op type producing each LayerNormalization's input."""
    graph = onnx.load(str(path)).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    return collections.Counter(
        producer.get(n.input[0], "graph input") for n in graph.node if n.op_type == "LayerNormalization"
    )


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("residual-sum")
    model = Transformer(Config.preset("tiny", **TINY_ENCODER)).eval()
    sums = export_onnx(model, folder / "sum.onnx").paths["encoder"]
    plain = export_onnx(model, folder / "add.onnx", unfuse_norms=False).paths["encoder"]
    return model, sums, plain


def test_every_layer_norm_reads_a_sum_and_onnx_runtime_runs_no_skip_layer_norm(exports, tmp_path):
    model, sums, plain = exports
    # pre-LN blocks: the embeddings' norm, every block norm but the first and the final norm read a
    # sum; the first attention norm reads the embeddings' norm, the MLM head's norm its GELU
    residual = 2 * model.config.encoder_layers + 1
    assert _norm_inputs(sums) == {"Sum": residual, "LayerNormalization": 1, "Gelu": 1}
    assert _norm_inputs(plain) == {"Add": residual, "LayerNormalization": 1, "Gelu": 1}
    assert _ops(sums)["Add"] == _ops(plain)["Add"] - residual  # no other addition is rewritten
    assert "SkipLayerNormalization" not in _ops_run(sums, tmp_path)
    assert _ops_run(plain, tmp_path)["SkipLayerNormalization"] > 0  # what the rewrite keeps ONNX Runtime from


def test_the_rewritten_graph_computes_what_pytorch_does(exports, tmp_path):
    model, sums, plain = exports
    ids = torch.randint(0, model.config.vocab_size, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).hidden_states
    got = OrtModel(sums, threads=1)({"input_ids": ids, "attention_mask": mask}).hidden_states
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=0)
    quantized = quantize_onnx(sums, tmp_path / "q" / "model.onnx", "int8-dynamic").paths["encoder"]
    assert _norm_inputs(quantized) == _norm_inputs(sums)  # ONNX Runtime's quantizer keeps the sums
    batch = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    reference = OrtModel(plain, threads=1)(batch).hidden_states
    np.testing.assert_allclose(OrtModel(sums, threads=1)(batch).hidden_states, reference, atol=1e-5, rtol=0)


def test_unfuse_norms_must_be_a_bool(exports, tmp_path):
    with pytest.raises(TypeError, match="unfuse_norms must be True or False, got 'yes'"):
        export_onnx(exports[0], tmp_path / "x.onnx", unfuse_norms="yes")
    assert not (tmp_path / "x.onnx").exists()

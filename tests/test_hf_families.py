"""from_hf() beyond BERT: RoBERTa, XLM-R and DistilBERT match transformers on padded batches, compress and export."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="needs the `hf` extra (transformers)")

from compress import Pipeline, Prune, Quantize  # noqa: E402
from compress.cli import main  # noqa: E402
from model import from_hf  # noqa: E402
from model.onnx.export import export_onnx  # noqa: E402

TOL = 1e-5
VOCAB = 100


def _config(cls_name: str, **overrides):
    """A small config of the class's family: width 32, 2 layers, 4 heads, 40 positions."""
    if cls_name.startswith("RoFormer"):
        sizes = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, max_position_embeddings=40)
        return transformers.RoFormerConfig(vocab_size=VOCAB, hidden_size=32, **sizes, **overrides)
    if cls_name.startswith("DistilBert"):
        sizes = dict(dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=40)
        return transformers.DistilBertConfig(vocab_size=VOCAB, **sizes, **overrides)
    config = transformers.XLMRobertaConfig if cls_name.startswith("XLM") else transformers.RobertaConfig
    sizes = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, max_position_embeddings=40)
    return config(vocab_size=VOCAB, hidden_size=32, type_vocab_size=1, **sizes, **overrides)


def _small(cls_name: str, **overrides):
    """A small random HF model in eval mode; every weight perturbed so zero biases and unit norms hide no mapping error."""
    model = getattr(transformers, cls_name)(_config(cls_name, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("embed_positions.weight"):  # RoFormer's sinusoid table is fixed, not learned
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _padded_batch(pad_id: int) -> dict[str, torch.Tensor]:
    """Four rows of lengths 12, 7, 3 (right padding) and 9 (left padding); padding holds pad_id."""
    ids = torch.randint(3, VOCAB, (4, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 3:], mask[3, :3] = 0, 0, 0
    ids[mask == 0] = pad_id
    return {"input_ids": ids, "attention_mask": mask}


def _expected(hf, batch) -> dict[str, torch.Tensor]:
    """The HF model's last hidden states and head logits, by flashlite head name."""
    with torch.no_grad():
        out = hf(**batch, output_hidden_states=True)
    name = type(hf).__name__
    heads = {}
    if "QuestionAnswering" in name:
        heads["qa"] = torch.stack((out.start_logits, out.end_logits), dim=-1)
    elif "SequenceClassification" in name:
        heads["classify"] = out.logits
    elif "MaskedLM" in name:
        heads["mlm"] = out.logits
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.hidden_states[-1]
    return {"hidden_states": hidden, **heads}


def _assert_parity(model, hf, batch):
    expected = _expected(hf, batch)
    with torch.no_grad():
        out = model(**batch)
    got = {"hidden_states": out.hidden_states, **out.head_logits}
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].shape == tensor.shape, name
        assert (got[name] - tensor).abs().max().item() <= TOL, name


ROBERTA_CASES = [
    ("RobertaModel", dict()),
    ("RobertaForSequenceClassification", dict(num_labels=3)),
    ("RobertaForSequenceClassification", dict(num_labels=1)),
    ("RobertaForMaskedLM", dict()),
    ("RobertaForQuestionAnswering", dict(hidden_act="gelu_new")),
    ("XLMRobertaModel", dict()),
    ("XLMRobertaForSequenceClassification", dict(num_labels=2)),
    ("XLMRobertaForMaskedLM", dict()),
    ("XLMRobertaForQuestionAnswering", dict()),
]


@pytest.mark.parametrize("cls_name, overrides", ROBERTA_CASES)
def test_roberta_family_parity_from_object_and_folder(tmp_path, cls_name, overrides):
    hf = _small(cls_name, **overrides)
    batch = _padded_batch(hf.config.pad_token_id)
    hf.save_pretrained(tmp_path)
    for model in (from_hf(hf), from_hf(tmp_path)):
        assert model.config.positions == "padding_offset" and model.config.max_positions == 40 - 2
        _assert_parity(model, hf, batch)


def test_roberta_positions_skip_padding_and_start_after_it():
    model = from_hf(_small("RobertaModel"))
    ids = torch.tensor([[5, 6, 1, 7], [1, 1, 5, 6]])
    assert model.embeddings._positions(ids).tolist() == [[2, 3, 1, 4], [1, 1, 2, 3]]
    assert model.embeddings.position.num_embeddings == 40


def test_roberta_mlm_needs_exact_gelu(tmp_path):
    _small("RobertaForMaskedLM", hidden_act="relu").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="hidden_act is 'relu'.*exact gelu"):
        from_hf(tmp_path)


def test_unsupported_model_type_is_one_line_naming_every_family(tmp_path, capsys):
    transformers.ElectraModel(
        transformers.ElectraConfig(
            vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type is 'electra'") as err:
        from_hf(tmp_path)
    message = str(err.value)
    assert "\n" not in message
    for supported in ("bert (BertModel", "roberta / xlm-roberta (", "distilbert (", "roformer (RoFormerModel"):
        assert supported in message
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["import", "--hf", str(tmp_path), "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "model_type is 'electra'" in lines[0]
    assert not out.exists()


def test_prune_and_quantize_an_imported_roberta():
    hf = _small("RobertaForSequenceClassification", num_labels=2)
    model = from_hf(hf)
    batches = [{**_padded_batch(1), "labels": torch.tensor([0, 1, 1, 0])} for _ in range(2)]
    lite = Pipeline([Prune(heads=0.5, ffn=0.5), Quantize("int8")]).run(model, data=batches)
    assert [layer.n_heads for layer in lite.config.encoder] == [2, 2]
    assert lite.config.positions == "padding_offset" and lite.config.quantized
    with torch.no_grad():
        logits = lite(**_padded_batch(1)).logits
    assert logits.shape == (4, 2) and torch.isfinite(logits).all()


def test_roberta_exports_to_onnx_with_parity(tmp_path):
    model = from_hf(_small("RobertaForMaskedLM"))
    report = export_onnx(model, tmp_path / "roberta.onnx")  # raises ParityError past 1e-4
    assert max(report.parity.values()) <= 1e-4 and (3, 38) in report.shapes


def test_saved_and_loaded_roberta_is_bit_identical(tmp_path):
    from model import load, save

    model = from_hf(_small("RobertaForSequenceClassification", num_labels=2))
    save(model, tmp_path / "lite")
    batch = _padded_batch(1)
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "lite")(**batch).logits, model(**batch).logits)


DISTILBERT_CASES = [
    ("DistilBertModel", dict()),
    ("DistilBertModel", dict(sinusoidal_pos_embds=True, activation="relu")),
    ("DistilBertForSequenceClassification", dict(num_labels=3)),
    ("DistilBertForSequenceClassification", dict(num_labels=1)),
    ("DistilBertForMaskedLM", dict()),
    ("DistilBertForMaskedLM", dict(activation="gelu_new")),
    ("DistilBertForQuestionAnswering", dict()),
]


@pytest.mark.parametrize("cls_name, overrides", DISTILBERT_CASES)
def test_distilbert_parity_from_object_and_folder(tmp_path, cls_name, overrides):
    hf = _small(cls_name, **overrides)
    batch = _padded_batch(hf.config.pad_token_id)
    hf.save_pretrained(tmp_path)
    for model in (from_hf(hf), from_hf(tmp_path)):
        assert (model.config.type_vocab_size, model.config.max_positions, model.config.norm_eps) == (0, 40, 1e-12)
        _assert_parity(model, hf, batch)


def test_distilbert_fresh_classifier_uses_the_relu_pre_classifier():
    model = from_hf(_small("DistilBertModel"), heads=("classify",), n_labels=2)
    assert model.config.pooler_activation == "relu" and isinstance(model.pooler.act, torch.nn.ReLU)


def test_distilbert_untied_output_weights_are_refused(tmp_path):
    hf = _small("DistilBertForMaskedLM", tie_word_embeddings=False)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="vocab_projector.weight differs from the word embeddings"):
        from_hf(tmp_path)


def test_distilbert_exports_to_onnx_with_parity(tmp_path):
    model = from_hf(_small("DistilBertForSequenceClassification", num_labels=2))
    report = export_onnx(model, tmp_path / "distilbert.onnx")  # raises ParityError past 1e-4
    assert max(report.parity.values()) <= 1e-4 and set(report.parity) == {"hidden_states", "classify_logits"}


def test_cli_compresses_a_roberta_folder_with_its_own_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    from model import load

    texts = [f"sentence number {i} about pruning, sharing and quantizing encoders" for i in range(40)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's: <pad> is 1, the model's pad_token_id
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    folder = tmp_path / "roberta"
    _small("RobertaForMaskedLM").save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    (tmp_path / "corpus.txt").write_text("\n\n".join(texts))
    settings = ["data.corpus=" + str(tmp_path / "corpus.txt"), "distill.steps=2", "data.batch_size=4"]
    argv = ["compress", "prune-only", "--hf", str(folder), "--out", str(tmp_path / "out")]
    assert main([*argv, *(arg for s in settings for arg in ("--set", s)), "--set", "export.onnx=false"]) == 0
    lite = load(tmp_path / "out" / "model")
    assert lite.config.positions == "padding_offset" and lite.config.encoder[0].n_heads == 2


ROFORMER_CASES = [
    ("RoFormerModel", dict()),
    ("RoFormerForSequenceClassification", dict(num_labels=3)),
    ("RoFormerForSequenceClassification", dict(num_labels=2, hidden_act="relu")),
    ("RoFormerForMaskedLM", dict()),
    ("RoFormerForQuestionAnswering", dict(hidden_act="gelu_new")),
]


@pytest.mark.parametrize("cls_name, overrides", ROFORMER_CASES)
def test_roformer_parity_from_object_and_folder(tmp_path, cls_name, overrides):
    hf = _small(cls_name, **overrides)
    batch = {**_padded_batch(0), "token_type_ids": (torch.arange(12) >= 6).long().expand(4, 12)}
    hf.save_pretrained(tmp_path)
    for model in (from_hf(hf), from_hf(tmp_path)):
        assert model.config.positions == "rotary" and model.embeddings.position is None
        _assert_parity(model, hf, batch)


@pytest.mark.parametrize(
    "change, message", [(dict(embedding_size=16), "embedding_size"), (dict(rotary_value=True), "rotary_value")]
)
def test_roformer_layouts_flashlite_lacks_are_refused(tmp_path, change, message):
    _small("RoFormerModel", **change).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        from_hf(tmp_path)


def test_roformer_prunes_quantizes_and_exports_to_onnx(tmp_path):
    model = from_hf(_small("RoFormerForSequenceClassification", num_labels=2))
    batches = [{**_padded_batch(0), "labels": torch.tensor([0, 1, 1, 0])} for _ in range(2)]
    lite = Pipeline([Prune(heads=0.5, ffn=0.5)]).run(model, data=batches)
    assert [layer.n_heads for layer in lite.config.encoder] == [2, 2]
    report = export_onnx(lite, tmp_path / "roformer.onnx")  # raises ParityError past 1e-4
    assert max(report.parity.values()) <= 1e-4
    quantized = Pipeline([Quantize("int8")]).run(lite, data=batches)
    with torch.no_grad():
        assert torch.isfinite(quantized(**_padded_batch(0)).logits).all()

"""Tests for the deployable export folder: its files, Hugging Face names, integrity checks, and the torch-free runner."""

import json

import numpy as np
import pytest
import torch
from deploy_models import PLAIN_SNIPPET, SENTENCES, run_without_torch, tiny_lite

from model import DeployedModel, OrtModel, export_onnx
from model.data.tokenizer import encode
from model.onnx.export import ParityError, sentence_embedding

TOL = 1e-4


@pytest.fixture(scope="module")
def classifier():
    return tiny_lite(("classify",), n_labels=3)


@pytest.fixture(scope="module")
def sentence_folder(classifier, tmp_path_factory):
    folder = tmp_path_factory.mktemp("deploy") / "sentence"
    report = export_onnx(
        classifier,
        folder,
        sentence_embedding=True,
        quantize=["int8-dynamic"],
        stages=[{"name": "Prune", "settings": {"heads": 0.5}, "params": 10, "metrics": {"fidelity": 0.9}}],
        labels=["neg", "neutral", "pos"],
    )
    return folder, report


def _expected(model, texts=SENTENCES):
    batch = encode(model.tokenizer, texts, max_len=model.config.max_positions)
    with torch.no_grad():
        out = model(**batch)
    return batch, out


def test_folder_holds_the_files_the_ecosystem_reads(classifier, sentence_folder):
    folder, report = sentence_folder
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert files == {
        "onnx/model.onnx",
        "onnx/model_qint8_quantized.onnx",
        "config.json",
        "flashlite_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "modules.json",
        "1_Pooling/config.json",
        "sentence_bert_config.json",
        "README.md",
        "manifest.json",
    }
    hf = json.loads((folder / "config.json").read_text())
    assert hf["model_type"] == "bert" and hf["architectures"] == ["BertForSequenceClassification"]
    assert hf["num_labels"] == 3 and hf["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    assert hf["label2id"]["pos"] == 2 and hf["hidden_size"] == classifier.config.dim
    assert (folder / "flashlite_config.json").read_text() == classifier.config.to_json()
    card = (folder / "README.md").read_text()
    assert "| Prune | heads=0.5 | 10 |" in card and "fidelity 0.9000" in card
    assert 'SentenceTransformer("FOLDER", backend="onnx")' in card and "onnx/model_qint8_quantized.onnx" in card
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and pooling["word_embedding_dimension"] == classifier.config.dim
    assert report.paths["encoder"] == folder / "onnx" / "model.onnx" and not report.skipped
    assert set(report.parity) == {"hidden_states", "classify_logits", "sentence_embedding"}


def test_transformers_reads_the_tokenizer_and_config(classifier, sentence_folder):
    from transformers import AutoConfig, AutoTokenizer

    folder, _ = sentence_folder
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ours = encode(classifier.tokenizer, SENTENCES, max_len=classifier.config.max_positions)
    theirs = tokenizer(SENTENCES, padding=True, return_tensors="np")
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(theirs[name], ours[name].numpy())
    assert AutoConfig.from_pretrained(folder).num_labels == 3


def test_graph_outputs_have_hugging_face_names_and_match_pytorch(classifier, sentence_folder):
    folder, _ = sentence_folder
    batch, expected = _expected(classifier)
    deployed = DeployedModel(folder)
    assert deployed.inputs == ["input_ids", "attention_mask", "token_type_ids"]
    assert deployed.outputs == ["last_hidden_state", "logits", "sentence_embedding"]
    got = deployed(deployed.tokenize(SENTENCES))
    np.testing.assert_allclose(got["last_hidden_state"], expected.hidden_states.numpy(), atol=TOL)
    np.testing.assert_allclose(got["logits"], expected.logits.numpy(), atol=TOL)
    embeddings = sentence_embedding(expected.hidden_states, batch["attention_mask"]).numpy()
    np.testing.assert_allclose(got["sentence_embedding"], embeddings, atol=TOL)
    np.testing.assert_allclose(np.linalg.norm(got["sentence_embedding"], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(deployed.embed(SENTENCES), embeddings, atol=TOL)
    runner = OrtModel(folder)  # the PyTorch-facing runner opens the folder too (its onnx/ graph)
    torch.testing.assert_close(runner(batch).logits, expected.logits, atol=TOL, rtol=0)
    int8 = DeployedModel(folder, file_name="onnx/model_qint8_quantized.onnx").embed(SENTENCES)
    assert (int8 * embeddings).sum(1).min() > 0.99


def test_question_answering_exports_start_and_end_logits(tmp_path):
    model = tiny_lite(("qa",))
    report = export_onnx(model, tmp_path / "qa")
    batch, expected = _expected(model)
    got = DeployedModel(tmp_path / "qa")(batch)
    assert list(got) == ["last_hidden_state", "start_logits", "end_logits"]
    np.testing.assert_allclose(got["start_logits"], expected.head_logits["qa"][..., 0].numpy(), atol=TOL)
    np.testing.assert_allclose(got["end_logits"], expected.head_logits["qa"][..., 1].numpy(), atol=TOL)
    torch.testing.assert_close(OrtModel(report.paths["encoder"])(batch).head_logits["qa"], expected.head_logits["qa"])
    assert json.loads((tmp_path / "qa" / "config.json").read_text())["architectures"] == ["BertForQuestionAnswering"]


def _copy(folder, target):
    import shutil

    shutil.copytree(folder, target)
    return target


def test_a_missing_truncated_or_altered_file_is_named(sentence_folder, tmp_path):
    folder, _ = sentence_folder
    cases = {
        "missing": ("tokenizer_config.json", lambda p: p.unlink(), "tokenizer_config.json is missing"),
        "truncated": ("onnx/model.onnx", lambda p: p.write_bytes(p.read_bytes()[:-100]), "model.onnx has .* bytes"),
        "altered": (
            "config.json",
            lambda p: p.write_text(p.read_text().replace('"bert"', '"BERT"')),
            "config.json differs from the file that was exported",
        ),
        "no manifest": ("manifest.json", lambda p: p.unlink(), "manifest.json is missing"),
    }
    for case, (name, damage, message) in cases.items():
        broken = _copy(folder, tmp_path / case.replace(" ", "_"))
        damage(broken / name)
        for loader in (DeployedModel, OrtModel):
            with pytest.raises(ValueError, match=message):
                loader(broken)


def test_a_failed_export_writes_nothing_and_a_new_export_drops_stale_files(classifier, sentence_folder, tmp_path):
    folder = _copy(sentence_folder[0], tmp_path / "kept")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(ParityError):
        export_onnx(classifier, folder, atol=1e-30)  # every output is off by more than that
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    with pytest.raises(ParityError):
        export_onnx(classifier, tmp_path / "new", atol=1e-30)
    assert not any((tmp_path / "new").iterdir())
    export_onnx(classifier, folder)  # plain layout over the sentence one: onnx/ and the pooling files go
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert "model.onnx" in files and not any(f.startswith(("onnx/", "1_Pooling")) or f == "modules.json" for f in files)
    assert DeployedModel(folder).outputs == ["last_hidden_state", "logits"]


def test_the_runner_and_a_plain_snippet_work_without_torch(classifier, sentence_folder, tmp_path):
    folder, _ = sentence_folder
    batch, expected = _expected(classifier)
    np.save(tmp_path / "want.npy", expected.logits.numpy())
    snippet = PLAIN_SNIPPET.format(folder=folder, graph="onnx/model.onnx", texts=SENTENCES)
    code = f"""
import sys
try:
    import torch
    sys.exit("torch imported")
except ImportError:
    pass
import model
from model import DeployedModel
got = DeployedModel({str(folder)!r}).embed({SENTENCES!r})
{snippet}
np.testing.assert_allclose(outputs["logits"], np.load("want.npy"), atol={TOL})
np.testing.assert_allclose(outputs["sentence_embedding"], got, atol={TOL})
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
print("ok")
"""
    done = run_without_torch(code, tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_cli_turns_the_sentence_layout_on_for_a_sentence_transformers_source(tmp_path):
    import argparse

    from compress.cli.export import is_sentence_transformer, source_stages

    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "modules.json").write_text("[]")
    (tmp_path / "plain").mkdir()
    assert is_sentence_transformer(argparse.Namespace(hf="all-MiniLM-L6-v2", model=None))
    assert is_sentence_transformer(argparse.Namespace(hf=str(tmp_path / "st"), model=None))
    assert not is_sentence_transformer(argparse.Namespace(hf=str(tmp_path / "plain"), model=None))
    assert not is_sentence_transformer(argparse.Namespace(hf=None, model=tmp_path / "st"))
    (tmp_path / "plain" / "manifest.json").write_text(json.dumps({"stages": [{"name": "input"}]}))
    assert source_stages(argparse.Namespace(model=tmp_path / "plain")) == [{"name": "input"}]
    assert source_stages(argparse.Namespace(model=tmp_path / "st")) is None


def test_a_graph_file_beside_a_saved_model_is_no_export_folder(classifier, tmp_path):
    from model import save

    save(classifier, tmp_path)  # its manifest.json is a saved model's, not an export's
    report = export_onnx(classifier, tmp_path / "model.onnx")
    assert OrtModel(report.paths["encoder"]).config == classifier.config


@pytest.mark.parametrize(
    "traits, model_type, architecture",
    [
        ({}, "bert", "BertForSequenceClassification"),
        ({"positions": "padding_offset", "pad_id": 1}, "roberta", "RobertaForSequenceClassification"),
        ({"pooler_activation": "relu", "type_vocab_size": 0}, "distilbert", "DistilBertForSequenceClassification"),
        ({"positions": "rotary"}, "roformer", "RoFormerForSequenceClassification"),
    ],
)
def test_config_json_names_the_source_family(traits, model_type, architecture):
    from transformers import AutoConfig

    from model import Config
    from model.onnx.hub_files import hf_config

    config = Config.preset("tiny", decoder_layers=0, heads=("classify",), n_labels=2, **traits)
    data = hf_config(config)
    assert data["model_type"] == model_type and data["architectures"] == [architecture]
    loaded = AutoConfig.for_model(**data)  # transformers reads every key with its family's class
    assert loaded.num_labels == 2 and loaded.vocab_size == config.vocab_size


def test_a_recipe_export_writes_the_sentence_layout(tmp_path):
    from compress.job import run_job
    from compress.recipe import parse_recipe

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(SENTENCES * 12))
    recipe = parse_recipe(
        {
            "passes": [{"prune": {"heads": 0.5, "ffn": 0.5}}],
            "data": {"corpus": str(corpus), "max_len": 24, "batch_size": 4},
            "export": {"quantize": "int8-dynamic", "sentence_embedding": True, "peer": False},
        }
    )
    result = run_job(recipe, tiny_lite(("mlm",)), tmp_path / "out")
    folder = tmp_path / "out" / "onnx"
    assert (folder / "modules.json").is_file() and (folder / "onnx" / "model_qint8_quantized.onnx").is_file()
    batch, out = _expected(result.model)
    expected = sentence_embedding(out.hidden_states, batch["attention_mask"]).numpy()
    np.testing.assert_allclose(DeployedModel(folder).embed(SENTENCES), expected, atol=TOL)
    with pytest.raises(ValueError, match="needs export.onnx"):
        parse_recipe({"passes": [{"prune": {}}], "export": {"onnx": False, "sentence_embedding": True}})
    with pytest.raises(TypeError, match="export.sentence_embedding must be true or false"):
        parse_recipe({"passes": [{"prune": {}}], "export": {"sentence_embedding": "yes"}})

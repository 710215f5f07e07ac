"""`flashlite import --hf` and `flashlite compress --hf` on every family from_hf supports, and bad model folders refused."""

import contextlib
import io
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="needs the `hf` extra (transformers)")

from compress.cli import build_parser, main  # noqa: E402
from model import load  # noqa: E402
from model.hf.importer import FAMILIES  # noqa: E402

VOCAB = 100
TEXTS = [
    f"The {a} model number {i} prunes its heads. It then shares {b} layers and quantizes them to int8 weights."
    for i, (a, b) in enumerate(zip(["small", "large", "quick", "shared"] * 10, ["two", "four", "six", "eight"] * 10))
]
RECIPE = """
passes:
  - prune: {heads: 0.5, ffn: 0.5}
  - distill: {steps: 2, progress: false}
  - quantize: {mode: int8}
data: {max_len: 24, batch_size: 4, limit: 40, corpus: CORPUS}
export: {onnx: false}
"""
ENCODER = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, max_position_embeddings=40)
SEQ2SEQ = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4)
SEQ2SEQ.update(encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=40, dropout=0.0)
T5 = dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4, dropout_rate=0.0)
T5.update(relative_attention_num_buckets=8, relative_attention_max_distance=12)
# (the HF class, its config, the tokenizer kind): one case per family, with a task head where transformers has one
CASES = {
    "bert": ("BertForMaskedLM", transformers.BertConfig(hidden_size=32, **ENCODER), "wordpiece"),
    "roberta": (
        "RobertaForSequenceClassification",
        transformers.RobertaConfig(hidden_size=32, type_vocab_size=1, num_labels=2, **ENCODER),
        "roberta",
    ),
    "xlm-roberta": (
        "XLMRobertaForMaskedLM",
        transformers.XLMRobertaConfig(hidden_size=32, type_vocab_size=1, **ENCODER),
        "roberta",
    ),
    "distilbert": (
        "DistilBertForQuestionAnswering",
        transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=40),
        "wordpiece",
    ),
    "roformer": ("RoFormerForMaskedLM", transformers.RoFormerConfig(hidden_size=32, **ENCODER), "wordpiece"),
    "bart": ("BartForConditionalGeneration", transformers.BartConfig(**SEQ2SEQ), "roberta"),
    "mbart": (
        "MBartForConditionalGeneration",
        transformers.MBartConfig(decoder_start_token_id=2, **SEQ2SEQ),
        "roberta",
    ),
    "marian": (
        "MarianMTModel",
        transformers.MarianConfig(
            decoder_vocab_size=VOCAB, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **SEQ2SEQ
        ),
        "t5",
    ),
    "t5": ("T5ForConditionalGeneration", transformers.T5Config(decoder_start_token_id=0, **T5), "t5"),
    "mt5": ("MT5ForConditionalGeneration", transformers.MT5Config(decoder_start_token_id=0, **T5), "t5"),
    "flan-t5": (
        "T5ForConditionalGeneration",
        transformers.T5Config(
            decoder_start_token_id=0, feed_forward_proj="gated-gelu", tie_word_embeddings=False, **T5
        ),
        "t5",
    ),
}


def _tokenizer(kind: str):
    """A tokenizer over TEXTS with the family's special tokens at the ids its config uses."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if kind == "wordpiece":
        from model.data.tokenizer import train_tokenizer

        return train_tokenizer(TEXTS, vocab_size=VOCAB)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    if kind == "roberta":  # RoBERTa's, BART's: <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4
        tok.train_from_iterator(
            TEXTS, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        )
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    else:  # T5's and (here) Marian's: <pad>=0 </s>=1 <unk>=2, each text ends with </s>
        tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "</s>", "<unk>"]))
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tok


def _hf_folder(family: str, root):
    """A small random model of `family` saved by transformers, with its tokenizer.json, in root/family."""
    cls_name, config, kind = CASES[family]
    config.vocab_size = VOCAB
    torch.manual_seed(0)
    hf = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if not name.endswith("embed_positions.weight"):  # RoFormer's and Marian's sinusoid tables are fixed
                p.add_(torch.randn_like(p) * 0.1)
    folder = root / family
    hf.save_pretrained(folder)
    _tokenizer(kind).save(str(folder / "tokenizer.json"))
    return hf, folder


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_the_cases_cover_every_family_from_hf_supports():
    covered = {CASES[name][1].model_type for name in CASES}
    assert covered == {model_type for family in FAMILIES for model_type in family.model_types}


@pytest.mark.parametrize("command", ["import", "compress"])
def test_help_names_every_supported_family(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for family in (
        "BERT",
        "RoBERTa",
        "XLM-R",
        "DistilBERT",
        "RoFormer",
        "BART",
        "mBART",
        "Marian",
        "T5",
        "mT5",
        "Flan-T5",
    ):
        assert family in text, family


@pytest.mark.parametrize("family", list(CASES))
def test_import_then_compress_from_the_command_line(family, tmp_path):
    hf, folder = _hf_folder(family, tmp_path)
    code, stdout, stderr = _run(["import", "--hf", str(folder), "--out", str(tmp_path / "imported")])
    assert code == 0, stderr
    imported = load(tmp_path / "imported")
    batch = _batch(imported, TEXTS[:3])
    encoder = hf.get_encoder() if hf.config.is_encoder_decoder else hf.base_model
    with torch.no_grad():
        want = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        got = imported(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).hidden_states
    mask = batch["attention_mask"].bool()
    assert (got - want)[mask].abs().max() < 1e-4, family  # real tokens; padding rows are not compared
    assert json.loads((tmp_path / "imported" / "manifest.json").read_text())["imported_from"] == str(folder)

    (tmp_path / "corpus.txt").write_text("\n\n".join(TEXTS))
    (tmp_path / "recipe.yaml").write_text(RECIPE.replace("CORPUS", str(tmp_path / "corpus.txt")))
    out = tmp_path / "lite"
    code, stdout, stderr = _run(["compress", str(tmp_path / "recipe.yaml"), "--hf", str(folder), "--out", str(out)])
    assert code == 0, stderr
    lite = load(out / "model")
    assert [layer.n_heads for layer in lite.config.encoder] == [2, 2] and lite.config.quantized
    rows = {row["name"]: row["metrics"] for row in json.loads((out / "report.json").read_text())["stages"]}
    assert list(rows) == ["input", "Prune", "Distill", "Quantize"]
    seq2seq = {"rouge1", "rouge2", "rougeL", "bleu"}
    assert all(seq2seq <= set(m) for m in rows.values()) == hf.config.is_encoder_decoder


def _batch(model, texts):
    from model.data.tokenizer import encode

    return encode(model.tokenizer, texts, max_len=24)


def _refused(argv: list[str], out, message: str) -> None:
    code, stdout, stderr = _run([*argv, "--out", str(out)])
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], stderr
    assert not out.exists(), "a refused folder must write nothing"


@pytest.mark.parametrize(
    "damage, message",
    [
        ("config", "is not valid UTF-8 JSON"),
        ("model_type", "model_type is 'electra'"),
        ("weights", "no weights in"),
        ("architecture", "architecture 'BartForCausalLM' is not supported"),
    ],
)
def test_a_bad_or_unsupported_folder_is_one_line_exit_2_nothing_written(damage, message, tmp_path):
    _, folder = _hf_folder("bart", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    if damage == "config":
        (folder / "config.json").write_text('{"model_type": "bart", ')
    elif damage == "weights":
        (folder / "model.safetensors").unlink()
    elif damage == "model_type":
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "electra"}))
    else:
        (folder / "config.json").write_text(json.dumps({**config, "architectures": ["BartForCausalLM"]}))
    _refused(["import", "--hf", str(folder)], tmp_path / "imported", message)
    _refused(["compress", "prune-only", "--hf", str(folder)], tmp_path / "lite", message)


def test_a_folder_without_config_json_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    _refused(["import", "--hf", str(tmp_path / "empty")], tmp_path / "imported", "no Hugging Face config.json")

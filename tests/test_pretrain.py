"""pretrain() end to end on real English text: held-out losses fall, tokenizer and heads are wired, runs repeat."""

import math

import pytest
import tokenizers
import torch

from model.config import Config
from model.data.corpus import builtin_corpus
from model.training.objectives import PretrainingData
from model.training.pretrain import evaluate_losses, pretrain

STEPS = 40


@pytest.fixture(scope="module")
def documents():
    """About 400 standard-library docstrings: short, real English prose."""
    docs = builtin_corpus(max_documents=400)
    assert len(docs) == 400
    return docs


def run(documents, **kwargs):
    options = dict(steps=4, batch_size=8, max_len=64, progress=False) | kwargs
    return pretrain(Config.preset("tiny"), corpus=documents, **options)


@pytest.fixture(scope="module")
def sop(documents):
    return run(documents, steps=STEPS, lr=1e-3, pair_task="sop")


@pytest.fixture(scope="module")
def single(documents):
    return run(documents, pair_task=None)


def test_training_lowers_the_held_out_losses(sop):
    vocab = sop.model.config.vocab_size
    # A fresh model guesses about uniformly: cross-entropy ln(V) per token, ln(2) per pair label.
    assert sop.eval_before["mlm"] == pytest.approx(math.log(vocab), abs=0.3)
    assert sop.eval_before["lm"] == pytest.approx(math.log(vocab), abs=0.3)
    assert sop.eval_before["pair"] == pytest.approx(math.log(2), abs=0.05)
    # 40 steps at lr 1e-3 take about 0.5 nats off both token losses; half of that is the bar.
    assert sop.eval_after["mlm"] < sop.eval_before["mlm"] - 0.25
    assert sop.eval_after["lm"] < sop.eval_before["lm"] - 0.25


def test_the_run_records_every_step(sop):
    assert len(sop.train.losses) == STEPS
    assert len(sop.head_losses) == STEPS
    assert sop.train.resumed_from == 0 and sop.train.tokens > 0
    for total, heads in zip(sop.train.losses, sop.head_losses):
        assert set(heads) == {"mlm", "pair", "lm"}
        assert total == pytest.approx(sum(heads.values()), rel=1e-5)  # the loss is the sum of the objectives


def test_the_model_carries_the_tokenizer_it_was_trained_with(sop):
    model = sop.model
    tok = model.tokenizer
    assert isinstance(tok, tokenizers.Tokenizer)
    assert model.config.vocab_size == tok.get_vocab_size()
    assert model.embeddings.word.num_embeddings == tok.get_vocab_size()
    assert model.config.pad_id == tok.token_to_id("[PAD]")
    ids = tok.encode("Return the number of items in the list.").ids
    assert ids and max(ids) < model.config.vocab_size
    assert tok.token_to_id("[UNK]") not in ids  # trained on English prose: common words are in the vocabulary
    assert not model.training  # handed back ready for inference


def test_heads_follow_the_pair_task(sop, single):
    assert sop.model.config.heads == ("mlm", "pair", "lm")
    assert set(sop.model.heads) == {"mlm", "pair", "lm"}
    assert set(sop.eval_before) == set(sop.eval_after) == {"mlm", "pair", "lm"}

    assert single.model.config.heads == ("mlm", "lm")
    assert "pair" not in single.model.heads
    assert set(single.eval_before) == set(single.eval_after) == {"mlm", "lm"}
    assert all(set(heads) == {"mlm", "lm"} for heads in single.head_losses)


def test_the_same_seed_repeats_exactly(documents, single):
    again = run(documents, pair_task=None)
    # The tokenizer is trained inside pretrain(), so it must come out the same too.
    assert again.model.tokenizer.get_vocab() == single.model.tokenizer.get_vocab(), (
        "train_tokenizer is not deterministic"
    )
    assert len(again.train.losses) == 4
    assert again.train.losses == single.train.losses
    assert again.eval_before == single.eval_before and again.eval_after == single.eval_after
    ours, theirs = single.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)

    other = run(documents, pair_task=None, seed=1)
    assert other.train.losses != single.train.losses  # the seed matters, so equality above means something


def test_a_given_tokenizer_is_used_as_is_and_runs_repeat(documents, single):
    tok = single.model.tokenizer
    first = run(documents, pair_task=None, tokenizer=tok)
    second = run(documents, pair_task=None, tokenizer=tok)
    assert first.model.tokenizer is tok and second.model.tokenizer is tok
    assert first.model.config.vocab_size == tok.get_vocab_size()
    assert len(first.train.losses) == 4
    assert first.train.losses == second.train.losses
    assert first.eval_after == second.eval_after


@pytest.mark.parametrize("holdout", [0.0, 1.0, -0.1, 1.5])
def test_holdout_outside_the_open_unit_interval_is_refused(documents, holdout):
    with pytest.raises(ValueError, match="holdout"):
        run(documents, holdout=holdout)


@pytest.mark.parametrize(
    "pair_task, denoise, expected",
    [(None, False, {"mlm"}), ("nsp", False, {"mlm", "pair"}), ("sop", True, {"mlm", "pair", "lm"})],
)
def test_evaluate_losses_reports_the_supervised_heads(sop, documents, pair_task, denoise, expected):
    model = sop.model
    data = PretrainingData(
        documents[:40], model.tokenizer, max_len=64, batch_size=8, pair_task=pair_task, denoise=denoise, seed=5
    )
    assert len(data) >= 2
    losses = evaluate_losses(model, data, 2)
    assert set(losses) == expected
    with torch.no_grad():
        direct = [model(**data[i]).losses for i in range(2)]
    for name in expected:
        assert losses[name] == pytest.approx(sum(d[name].item() for d in direct) / 2, rel=1e-5)


def test_evaluate_losses_caps_the_batches_and_keeps_the_mode(sop, documents):
    model = sop.model
    data = PretrainingData(
        documents[:20], model.tokenizer, max_len=64, batch_size=8, pair_task=None, denoise=False, seed=5
    )
    n = len(data)
    assert 1 <= n < 100
    model.train()
    try:
        everything = evaluate_losses(model, data, 100)
        assert model.training  # the caller's mode is restored
    finally:
        model.eval()
    with torch.no_grad():
        expected = sum(model(**data[i]).losses["mlm"].item() for i in range(n)) / n  # eval mode: no dropout
    assert everything["mlm"] == pytest.approx(expected, rel=1e-5)
    assert not model.training

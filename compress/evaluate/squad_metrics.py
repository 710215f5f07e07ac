"""The official SQuAD 2.0 scoring (v1.1 data too): answer normalization, exact match, token F1 and their totals."""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence
from typing import Any

import numpy as np

Example = dict[str, Any]


_PUNCTUATION = frozenset(string.punctuation)


def normalize(text: str) -> str:
    """The official SQuAD answer normalization: lowercase, no punctuation, no a/an/the, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _gold(example: Example) -> list[str]:
    """The official script's gold answers: those that survive normalization, else [""] (no answer)."""
    return [a["text"] for a in example["answers"] if normalize(a["text"])] or [""]


def exact(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals a normalized gold answer (golds: non-empty), else 0.0."""
    return float(max(normalize(prediction) == normalize(g) for g in golds))


def f1(prediction: str, golds: Sequence[str]) -> float:
    """The best token-overlap F1 of the prediction against the gold answers (official SQuAD 2.0 rules).

    When a side normalizes to no tokens (a no-answer), F1 is 1.0 if both do, else 0.0.
    """
    predicted = normalize(prediction).split()
    best = 0.0
    for gold in golds:
        expected = normalize(gold).split()
        if not expected or not predicted:
            best = max(best, float(expected == predicted))
            continue
        same = sum((collections.Counter(expected) & collections.Counter(predicted)).values())
        if same:
            precision, recall = same / len(predicted), same / len(expected)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def scores(examples: Sequence[Example], predictions: dict[str, str]) -> dict[str, float]:
    """The official SQuAD 2.0 evaluation (v1.1 data too): percentages, like the official script.

    Returns:
        "exact", "f1", "total"; and "HasAns_exact", "HasAns_f1", "HasAns_total" over answerable
        questions and "NoAns_exact", "NoAns_f1", "NoAns_total" over unanswerable ones, each group
        only when it has questions.

    Raises:
        ValueError: no examples, or a question without a prediction.
    """
    if not examples:
        raise ValueError("examples is empty: nothing to score")
    missing = [e["id"] for e in examples if e["id"] not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} question(s), e.g. {missing[:3]}")
    em = {e["id"]: exact(predictions[e["id"]], _gold(e)) for e in examples}
    f = {e["id"]: f1(predictions[e["id"]], _gold(e)) for e in examples}
    result = {"exact": 100 * np.mean(list(em.values())), "f1": 100 * np.mean(list(f.values())), "total": len(examples)}
    groups = {
        "HasAns": [e["id"] for e in examples if _gold(e) != [""]],
        "NoAns": [e["id"] for e in examples if _gold(e) == [""]],
    }
    for name, ids in groups.items():
        if ids:
            result[f"{name}_exact"] = 100 * np.mean([em[i] for i in ids])
            result[f"{name}_f1"] = 100 * np.mean([f[i] for i in ids])
            result[f"{name}_total"] = len(ids)
    return {k: float(v) if isinstance(v, np.floating) else v for k, v in result.items()}

"""GLUE's official metrics (accuracy, F1, Matthews, Pearson, Spearman) and each task's set of them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from compress.evaluate.glue_data import Task, get_task


def _as_predictions(info: Task, predictions: Any) -> np.ndarray:
    """Class ids (or scores) from ids, scores or a (N, C) logit array."""
    values = np.asarray(predictions)
    if values.ndim == 2:
        values = values[:, 0] if info.labels is None else values.argmax(axis=1)
    if values.ndim != 1:
        raise ValueError(f"predictions must be (N,) ids/scores or (N, C) logits, got shape {values.shape}")
    return values


def accuracy(predictions: Sequence, labels: Sequence) -> float:
    """The fraction of predictions equal to their label."""
    p, y = np.asarray(predictions), np.asarray(labels)
    return float((p == y).mean())


def f1(predictions: Sequence, labels: Sequence) -> float:
    """Binary F1 of the positive class (1); 0.0 when there is no positive prediction or label."""
    p, y = np.asarray(predictions) == 1, np.asarray(labels) == 1
    tp, fp, fn = int((p & y).sum()), int((p & ~y).sum()), int((~p & y).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews(predictions: Sequence, labels: Sequence) -> float:
    """Matthews correlation coefficient (multi-class form); 0.0 when it is undefined (a constant side)."""
    p, y = np.asarray(predictions), np.asarray(labels)
    classes, index = np.unique(np.concatenate([p, y]), return_inverse=True)
    k = len(classes)
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (index[len(p) :], index[: len(p)]), 1)  # rows: true class, columns: predicted
    t_sum, p_sum, n = confusion.sum(1), confusion.sum(0), confusion.sum()
    cov_tp = np.trace(confusion) * n - t_sum @ p_sum
    denominator = math.sqrt((n * n - p_sum @ p_sum) * (n * n - t_sum @ t_sum))
    return float(cov_tp / denominator) if denominator else 0.0


def pearson(predictions: Sequence, labels: Sequence) -> float:
    """Pearson correlation; 0.0 when either side is constant (undefined)."""
    x, y = np.asarray(predictions, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y / denominator) if denominator else 0.0


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the average of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts
    return (starts + (counts + 1) / 2)[inverse]


def spearman(predictions: Sequence, labels: Sequence) -> float:
    """Spearman rank correlation (Pearson of tie-averaged ranks)."""
    return pearson(_ranks(np.asarray(predictions, dtype=np.float64)), _ranks(np.asarray(labels, dtype=np.float64)))


_METRICS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}


def metric(task: str, predictions: Any, labels: Sequence) -> dict[str, float]:
    """The task's GLUE metrics, as fractions (accuracy 0.9, not 90).

    Args:
        task: a GLUE task name.
        predictions: (N,) class ids (STS-B: scores), or (N, C) logits (argmax is taken).
        labels: (N,) gold class ids (STS-B: scores).

    Returns:
        accuracy (sst2, mnli, qnli, rte, wnli); accuracy and f1 (mrpc, qqp); matthews (cola);
        pearson and spearman (stsb).
    """
    info = get_task(task)
    values = _as_predictions(info, predictions)
    gold = np.asarray(labels)
    if len(values) != len(gold) or len(gold) == 0:
        raise ValueError(f"predictions ({len(values)}) and labels ({len(gold)}) must be equally long and non-empty")
    return {name: _METRICS[name](values, gold) for name in info.metrics}


def score(task: str, metrics: dict[str, float]) -> float:
    """The single GLUE number of a task: the mean of its metrics (the leaderboard's convention)."""
    info = get_task(task)
    return float(np.mean([metrics[name] for name in info.metrics]))

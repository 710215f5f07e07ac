"""GLUE: batching, fine-tuning, prediction and evaluation.

The tasks' loaders (glue_data.py) and metrics (glue_metrics.py) are re-exported here, so
`glue.load(...)` and `glue.metric(...)` stay the one way to call them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from compress.evaluate.glue_data import TASKS, Row, Task, get_task, load, load_hf
from compress.evaluate.glue_metrics import accuracy, f1, matthews, metric, pearson, score, spearman
from model.config import check_int
from model.data.batching import length_grouped
from model.data.tokenizer import encode, token_lengths
from model.training.loop import TrainConfig, train

__all__ = [
    "TASKS",
    "Batch",
    "Row",
    "Task",
    "accuracy",
    "batches",
    "epoch_order",
    "evaluate",
    "f1",
    "finetune",
    "get_task",
    "load",
    "load_hf",
    "matthews",
    "metric",
    "pearson",
    "predict",
    "score",
    "spearman",
    "tokenizer_of",
]

Batch = dict[str, torch.Tensor]


def batches(
    rows: Sequence[Row],
    tokenizer: Tokenizer,
    task: str,
    *,
    max_len: int,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    group_by_length: bool = False,
) -> list[Batch]:
    """Tokenize rows into model batches.

    Args:
        rows: rows from `load`/`load_hf`. tokenizer: the model's tokenizer. task: the task name.
        max_len: tokens per example, special tokens included (pairs are truncated longest first).
        batch_size: examples per batch (the last batch may be smaller).
        shuffle, seed: shuffle the rows first, reproducibly.
        group_by_length: batch rows of similar token length together (shuffled within windows,
            `model.data.batching.length_grouped`): far less padding for training.

    Returns:
        Batches with input_ids, attention_mask, token_type_ids and, when the rows are labelled,
        "labels" (int64 class ids, or float32 scores for STS-B).
    """
    info = get_task(task)
    check_int("batch_size", batch_size, 1)
    if not rows:
        raise ValueError("rows is empty: nothing to batch")
    labelled = {row["label"] is not None for row in rows}
    if len(labelled) > 1:
        raise ValueError("rows mix labelled and unlabelled examples; batch them separately")
    if group_by_length:
        pairs = [row[info.fields[1]] for row in rows] if len(info.fields) > 1 else None
        lengths = token_lengths(tokenizer, [row[info.fields[0]] for row in rows], pairs, max_len=max_len)
        groups = length_grouped(lengths, batch_size, seed=seed)
    else:
        order = np.random.default_rng(seed).permutation(len(rows)) if shuffle else np.arange(len(rows))
        groups = [order[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    out = []
    for group in groups:
        chunk = [rows[i] for i in group]
        texts = [row[info.fields[0]] for row in chunk]
        pairs = [row[info.fields[1]] for row in chunk] if len(info.fields) > 1 else None
        batch = encode(tokenizer, texts, pairs, max_len=max_len)
        if labelled == {True}:
            dtype = torch.float32 if info.labels is None else torch.int64
            batch["labels"] = torch.tensor([row["label"] for row in chunk], dtype=dtype)
        out.append(batch)
    return out


def _check_head(model: torch.nn.Module, info: Task) -> None:
    heads = getattr(model.config, "heads", ())
    if "classify" not in heads or model.config.n_labels != info.n_labels:
        raise ValueError(
            f"task {info.name} needs a 'classify' head with n_labels={info.n_labels}; the model has heads "
            f"{list(heads)} with n_labels={model.config.n_labels} (e.g. from_hf(path, heads=('classify',), n_labels={info.n_labels}))"
        )


def tokenizer_of(model: torch.nn.Module, tokenizer: Tokenizer | None) -> Tokenizer:
    """`tokenizer`, or the one the model carries (`model.tokenizer`) when it is None."""
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("tokenizer is None and the model carries none (model.tokenizer); pass the model's tokenizer")
    return tokenizer


def epoch_order(n: int, count: int, *, seed: int) -> np.ndarray:
    """`count` indices into n items: a fresh permutation per epoch, so only what training uses gets tokenized."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(n) for _ in range(math.ceil(count / n))])[:count]


def finetune(
    model: torch.nn.Module,
    task: str,
    rows: Sequence[Row],
    tokenizer: Tokenizer | None = None,
    *,
    steps: int,
    lr: float = 5e-5,
    batch_size: int = 32,
    max_len: int = 128,
    seed: int = 0,
    device: str = "cpu",
    parallel: str = "ddp",
    progress: bool = True,
) -> torch.nn.Module:
    """Fine-tune the model's classification (or STS-B regression) head and encoder with model.training.loop.train.

    Args:
        model: a Transformer with a "classify" head of the task's width (1 for stsb).
        task: the GLUE task. rows: labelled training rows. tokenizer: None = model.tokenizer.
        steps: optimizer steps; the rows are reshuffled every epoch. lr, seed, device, parallel: as in TrainConfig.
        batch_size, max_len: as in `batches` (in shuffled order: teachers fine-tuned on batches grouped by
            length scored lower, benchmarks/RESULTS.md). progress: show a progress bar.

    Returns:
        The same model, trained in place, in eval mode.
    """
    info = get_task(task)
    _check_head(model, info)
    tokenizer = tokenizer_of(model, tokenizer)
    check_int("steps", steps, 1)
    check_int("batch_size", batch_size, 1)
    if not rows or any(row["label"] is None for row in rows):
        raise ValueError("rows must be non-empty and labelled (a test split has no labels); fine-tuning needs labels")
    ordered = [rows[i] for i in epoch_order(len(rows), steps * batch_size, seed=seed)]
    data = batches(ordered, tokenizer, task, max_len=max_len, batch_size=batch_size)
    train(model, data, TrainConfig(steps=steps, lr=lr, seed=seed, device=device, parallel=parallel, progress=progress))
    return model.eval()


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    task: str,
    rows: Sequence[Row],
    tokenizer: Tokenizer | None = None,
    *,
    max_len: int = 128,
    batch_size: int = 64,
    progress: bool = True,
) -> np.ndarray:
    """The model's predictions on rows: (N,) class ids, or float scores for STS-B (in row order)."""
    info = get_task(task)
    _check_head(model, info)
    tokenizer = tokenizer_of(model, tokenizer)
    unlabelled = [{**row, "label": None} for row in rows]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for batch in tqdm(
            batches(unlabelled, tokenizer, task, max_len=max_len, batch_size=batch_size),
            desc=f"{info.name} predict",
            disable=not progress,
        ):
            logits = model(**{k: v.to(device) for k, v in batch.items()}).head_logits["classify"].float().cpu()
            outputs.append(logits[:, 0] if info.labels is None else logits.argmax(dim=1))
    finally:
        model.train(was_training)
    return torch.cat(outputs).numpy()


def evaluate(
    model: torch.nn.Module,
    task: str,
    split: str,
    data_dir: str | os.PathLike,
    tokenizer: Tokenizer | None = None,
    *,
    max_len: int = 128,
    batch_size: int = 64,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Score a fine-tuned model on one labelled split of a local GLUE folder.

    Args:
        model: a Transformer with the task's "classify" head. task, split, data_dir: as for `load`.
        tokenizer: None = model.tokenizer. max_len, batch_size: as for `batches`.
        limit: score only the first `limit` rows (quick checks). progress: show a progress bar.

    Returns:
        `metric(task, ...)` on the split, e.g. {"accuracy": 0.91}.
    """
    rows = load(task, split, data_dir)
    if limit is not None:
        check_int("limit", limit, 1)
        rows = rows[:limit]
    if rows and rows[0]["label"] is None:
        raise ValueError(f"split {split!r} of {task} has no labels (GLUE test files are unlabelled); evaluate on dev")
    predictions = predict(model, task, rows, tokenizer, max_len=max_len, batch_size=batch_size, progress=progress)
    return metric(task, predictions, [row["label"] for row in rows])

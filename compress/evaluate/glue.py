"""GLUE: loaders for the nine tasks' original TSV files (or the `datasets` hub), the official metrics, fine-tuning and evaluation."""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from model.config import check_int
from model.data.tokenizer import encode
from model.training.loop import TrainConfig, train

Row = dict[str, Any]
Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Task:
    """How one GLUE task is stored and scored.

    folder: the task's folder in a GLUE download. fields: the text fields of a row (the
    `datasets` names). columns / test_columns: their column indices in train/dev and in test
    files. label_column: the label's index in train/dev files, -1 = the header's last column
    (MNLI's 12-column train and 16-column dev files both end with gold_label). header: whether
    train/dev files start with a header row (test files always do). labels: the label strings
    in id order (None: a regression score). metrics: what `metric` returns, in order.
    """

    name: str
    folder: str
    fields: tuple[str, ...]
    columns: tuple[int, ...]
    test_columns: tuple[int, ...]
    label_column: int
    header: bool
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]

    @property
    def n_labels(self) -> int:
        """The width of the classification head this task needs (1 = regression)."""
        return 1 if self.labels is None else len(self.labels)

    def splits(self) -> dict[str, str]:
        """Split name -> file name in the task folder."""
        if self.name == "mnli":
            names = ("train", "dev_matched", "dev_mismatched", "test_matched", "test_mismatched")
            return {name: f"{name}.tsv" for name in names}
        return {name: f"{name}.tsv" for name in ("train", "dev", "test")}

    def layout(self) -> str:
        """A one-line description of the expected file layout, for error messages."""
        head = "a header row" if self.header else "NO header row"
        label = "the last column" if self.label_column == -1 else f"column {self.label_column}"
        texts = ", ".join(f"{f} in column {c}" for f, c in zip(self.fields, self.columns))
        return f"tab-separated, {head}, {texts}, label in {label}; test files: a header row, no label"


_BINARY = ("0", "1")
_NLI = ("entailment", "not_entailment")
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("cola", "CoLA", ("sentence",), (3,), (1,), 1, False, _BINARY, ("matthews",)),
        Task("sst2", "SST-2", ("sentence",), (0,), (1,), -1, True, _BINARY, ("accuracy",)),
        Task("mrpc", "MRPC", ("sentence1", "sentence2"), (3, 4), (3, 4), 0, True, _BINARY, ("accuracy", "f1")),
        Task("stsb", "STS-B", ("sentence1", "sentence2"), (7, 8), (7, 8), -1, True, None, ("pearson", "spearman")),
        Task("qqp", "QQP", ("question1", "question2"), (3, 4), (1, 2), -1, True, _BINARY, ("accuracy", "f1")),
        Task(
            "mnli",
            "MNLI",
            ("premise", "hypothesis"),
            (8, 9),
            (8, 9),
            -1,
            True,
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
        ),
        Task("qnli", "QNLI", ("question", "sentence"), (1, 2), (1, 2), -1, True, _NLI, ("accuracy",)),
        Task("rte", "RTE", ("sentence1", "sentence2"), (1, 2), (1, 2), -1, True, _NLI, ("accuracy",)),
        # WNLI's files hold 0/1 with 1 = entailment, the `datasets` label ids as they are.
        Task("wnli", "WNLI", ("sentence1", "sentence2"), (1, 2), (1, 2), -1, True, _BINARY, ("accuracy",)),
    )
}
# "mnli-mm" is MNLI scored on its mismatched genres: its "dev"/"test" are the mismatched files.
_SPLIT_ALIASES = {
    "mnli": {"dev": "dev_matched", "test": "test_matched"},
    "mnli-mm": {"dev": "dev_mismatched", "test": "test_mismatched"},
}


def get_task(task: str) -> Task:
    """The Task named `task` (a `datasets` GLUE name, or "mnli-mm"); ValueError listing the names otherwise."""
    name = "mnli" if task == "mnli-mm" else task
    if name not in TASKS:
        raise ValueError(f"task={task!r}: unknown GLUE task; expected one of {', '.join([*TASKS, 'mnli-mm'])}")
    return TASKS[name]


def _resolve_split(task: str, split: str) -> str:
    """The file-level split name (e.g. "dev" of "mnli-mm" -> "dev_mismatched"); ValueError when unknown."""
    info = get_task(task)
    split = _SPLIT_ALIASES.get(task, {}).get(split, split)
    if split not in info.splits():
        allowed = sorted({*info.splits(), *_SPLIT_ALIASES.get(task, {})})
        raise ValueError(f"split={split!r}: task {task} has the splits {', '.join(allowed)}")
    return split


def load(task: str, split: str, data_dir: str | os.PathLike) -> list[Row]:
    """Read one split of a GLUE task from its original TSV file.

    Files are read with csv.QUOTE_NONE (GLUE texts hold unbalanced quote characters) and a
    leading UTF-8 BOM (MRPC) is dropped. Rows with fewer columns than the layout needs (a few
    in QQP's train file) are skipped with a warning, as the `datasets` loader skips them.

    Args:
        task: a GLUE task name (see TASKS) or "mnli-mm".
        split: "train", "dev" or "test"; MNLI also "dev_matched", "dev_mismatched",
            "test_matched", "test_mismatched" ("dev" of "mnli" is matched, of "mnli-mm" mismatched).
        data_dir: the folder holding GLUE's task folders (CoLA/, SST-2/, MNLI/, ...).

    Returns:
        One dict per example: "idx" (its order in the file), the task's text fields and
        "label": a class id (the `datasets` ids), a float score (STS-B), or None (test files).

    Raises:
        ValueError: unknown task or split, or a label outside the task's label set.
        FileNotFoundError: the file is missing (the message names it and its expected layout).
    """
    info = get_task(task)
    split = _resolve_split(task, split)
    path = Path(data_dir) / info.folder / info.splits()[split]
    if not path.is_file():
        raise FileNotFoundError(
            f"GLUE file {path} not found; expected {info.folder}/{path.name} under {data_dir}: {info.layout()}"
        )
    test = split.startswith("test")
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = lines[0] if (test or info.header) and lines else None
    body = lines[1:] if header is not None else lines
    columns = info.test_columns if test else info.columns
    label_column = None if test else info.label_column
    if label_column == -1:
        if header is None or len(header) <= max(columns) + 1:
            raise ValueError(f"{path}: the header row has {len(header or [])} columns; expected {info.layout()}")
        label_column = len(header) - 1
    needed = max(*columns, label_column if label_column is not None else 0) + 1
    rows, skipped = [], []
    for number, cells in enumerate(body, start=2 if header is not None else 1):
        if not any(cells):
            continue
        if len(cells) < needed:
            skipped.append(number)
            continue
        row: Row = {"idx": len(rows) + len(skipped)}
        row.update({field: cells[c] for field, c in zip(info.fields, columns)})
        row["label"] = None if label_column is None else _parse_label(info, cells[label_column], path, number)
        rows.append(row)
    if skipped:
        warnings.warn(
            f"{path}: skipped {len(skipped)} rows with fewer than {needed} columns (lines {skipped[:5]}...)",
            stacklevel=2,
        )
    return rows


def _parse_label(info: Task, text: str, path: Path, line: int) -> int | float:
    if info.labels is None:
        try:
            return float(text)
        except ValueError:
            raise ValueError(
                f"{path} line {line}: label {text!r} is not a number ({info.name} is scored 0 to 5)"
            ) from None
    if text not in info.labels:
        raise ValueError(
            f"{path} line {line}: label {text!r} is not one of {', '.join(info.labels)}; expected {info.layout()}"
        )
    return info.labels.index(text)


def load_hf(task: str, split: str) -> list[Row]:
    """Load one split from the Hugging Face hub with `datasets` (installed and online).

    Args:
        task, split: as for `load` ("dev" is the hub's "validation").

    Returns:
        Rows as `load` returns them (test labels, -1 on the hub, become None).

    Raises:
        ImportError: `datasets` is not installed. ConnectionError: the hub cannot be reached.
    """
    info = get_task(task)
    split = _resolve_split(task, split)
    try:
        import datasets  # optional: only this function needs it
    except ImportError:
        raise ImportError(
            "load_hf needs the `datasets` library (pip install datasets) and network access; "
            "or use glue.load(task, split, data_dir) on a local GLUE folder"
        ) from None
    hub_split = split.replace("dev", "validation")
    try:
        data = datasets.load_dataset("nyu-mll/glue", info.name, split=hub_split)
    except OSError as err:  # ConnectionError and the hub's HTTP errors are OSErrors
        raise ConnectionError(
            f"could not load GLUE {info.name}/{hub_split} from the Hugging Face hub ({err}); "
            "offline, use glue.load(task, split, data_dir) on a local GLUE folder"
        ) from err
    rows = []
    for item in data:
        row = {"idx": int(item["idx"]), **{field: item[field] for field in info.fields}}
        label = item["label"]
        row["label"] = None if label == -1 else (float(label) if info.labels is None else int(label))
        rows.append(row)
    return rows


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


def batches(
    rows: Sequence[Row],
    tokenizer: Tokenizer,
    task: str,
    *,
    max_len: int,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
) -> list[Batch]:
    """Tokenize rows into model batches.

    Args:
        rows: rows from `load`/`load_hf`. tokenizer: the model's tokenizer. task: the task name.
        max_len: tokens per example, special tokens included (pairs are truncated longest first).
        batch_size: examples per batch (the last batch may be smaller).
        shuffle, seed: shuffle the rows first, reproducibly.

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
    order = np.random.default_rng(seed).permutation(len(rows)) if shuffle else np.arange(len(rows))
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = [rows[i] for i in order[start : start + batch_size]]
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
    """Fine-tune the model's classification (or STS-B regression) head and encoder with model.train.train.

    Args:
        model: a Transformer with a "classify" head of the task's width (1 for stsb).
        task: the GLUE task. rows: labelled training rows. tokenizer: None = model.tokenizer.
        steps: optimizer steps; the rows are reshuffled every epoch. lr, seed, device, parallel: as in TrainConfig.
        batch_size, max_len: as in `batches`. progress: show a progress bar.

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

"""GLUE's nine tasks: how each is stored and labelled, and loaders for its original TSV files or the `datasets` hub."""

from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Row = dict[str, Any]


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

"""SQuAD v1.1/v2.0: loading, doc-stride features, span-head fine-tuning and n-best answer extraction.

The official EM/F1 lives in squad_metrics.py and is re-exported here (`squad.scores`,
`squad.exact`, `squad.f1`, `squad.normalize`).
"""

from __future__ import annotations

import collections
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from compress.evaluate.glue import epoch_order, tokenizer_of
from compress.evaluate.squad_metrics import Example, exact, f1, normalize, scores
from model.config import check_int
from model.data.tokenizer import special_tokens
from model.training.loop import TrainConfig, train

__all__ = [
    "Batch",
    "Example",
    "Feature",
    "batches",
    "evaluate",
    "exact",
    "extract",
    "f1",
    "features",
    "finetune",
    "load",
    "normalize",
    "predict",
    "scores",
    "span_logits",
    "split_articles",
]

Batch = dict[str, torch.Tensor]


def load(path: str | os.PathLike, *, articles: Sequence[int | str] | None = None) -> list[Example]:
    """Read a SQuAD v1.1 or v2.0 JSON file into one dict per question.

    Args:
        path: the JSON file (`{"version", "data": [{"title", "paragraphs": [{"context", "qas"}]}]}`).
        articles: keep only these articles, by position in the file or by title; None = all.

    Returns:
        Examples with "id", "title", "context", "question", "answers" (a list of {"text",
        "answer_start"}; empty for unanswerable questions) and "is_impossible" (always False in v1.1).

    Raises:
        FileNotFoundError: no such file. ValueError: not SQuAD JSON, or an unknown article.
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{path} is not SQuAD JSON: expected an object with a 'data' list of articles")
    found = data["data"]
    if articles is not None:
        titles = [a.get("title") for a in found]
        chosen = []
        for key in articles:
            if isinstance(key, str) and key in titles:
                chosen.append(found[titles.index(key)])
            elif isinstance(key, int) and not isinstance(key, bool) and -len(found) <= key < len(found):
                chosen.append(found[key])
            else:
                raise ValueError(
                    f"articles: {key!r} is neither a title nor a position in {path} ({len(found)} articles: {titles[:10]})"
                )
        found = chosen
    return [
        {
            "id": qa["id"],
            "title": article.get("title", ""),
            "context": paragraph["context"],
            "question": qa["question"],
            "answers": list(qa.get("answers", [])),
            "is_impossible": bool(qa.get("is_impossible", False)),
        }
        for article in found
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    ]


def split_articles(examples: Sequence[Example], n_train: int) -> tuple[list[Example], list[Example]]:
    """Split examples by article: the first `n_train` titles (in file order) train, the rest evaluate.

    One article's questions share its paragraphs, so splitting inside an article would leak them.
    """
    titles = list(dict.fromkeys(e["title"] for e in examples))
    if isinstance(n_train, bool) or not isinstance(n_train, int) or not 0 < n_train < len(titles):
        raise ValueError(
            f"n_train must be an int in [1, {len(titles) - 1}] (the examples hold {len(titles)} articles), got {n_train!r}"
        )
    train_titles = set(titles[:n_train])
    return [e for e in examples if e["title"] in train_titles], [e for e in examples if e["title"] not in train_titles]


@dataclass(frozen=True)
class Feature:
    """One model input window over an example's context.

    example: the index of its example. offsets: per token, its (start, end) characters in the
    context, None for question and special tokens. start_position, end_position: the answer's
    first and last token, 0 ([CLS]) when the window holds no answer (or the question has none).
    """

    example: int
    input_ids: list[int]
    token_type_ids: list[int]
    offsets: list[tuple[int, int] | None]
    start_position: int
    end_position: int


def _answer_tokens(example: Example, offsets: list[tuple[int, int]]) -> tuple[int, int] | None:
    """(first, last) context token of the example's first answer; None when it has none."""
    if example["is_impossible"] or not example["answers"]:
        return None
    answer = example["answers"][0]
    start_char = answer["answer_start"]
    end_char = start_char + len(answer["text"])
    first = next((i for i, (_, end) in enumerate(offsets) if end > start_char), None)
    last = next((i for i in reversed(range(len(offsets))) if offsets[i][0] < end_char), None)
    if first is None or last is None or last < first:
        return None
    return first, last


def features(
    examples: Sequence[Example],
    tokenizer: Tokenizer,
    *,
    max_len: int = 384,
    doc_stride: int = 128,
    max_query_len: int = 64,
) -> list[Feature]:
    """Tokenize examples into windows `[CLS] question [SEP] context window [SEP]` covering each whole context.

    Args:
        examples: from `load`. tokenizer: a BERT-style WordPiece tokenizer.
        max_len: tokens per window, special tokens included.
        doc_stride: tokens between the starts of consecutive context windows (BERT's run_squad
            meaning); windows overlap by the window length minus doc_stride.
        max_query_len: questions are cut to this many tokens.

    Returns:
        Features in example order; one example may have several.
    """
    check_int("max_len", max_len, 8)
    check_int("doc_stride", doc_stride, 1)
    check_int("max_query_len", max_query_len, 1)
    special = special_tokens(tokenizer)
    contexts: dict[str, Any] = {}  # the questions of one paragraph share its context: tokenize it once
    out = []
    for index, example in enumerate(examples):
        question = tokenizer.encode(example["question"], add_special_tokens=False).ids[:max_query_len]
        if example["context"] not in contexts:
            contexts[example["context"]] = tokenizer.encode(example["context"], add_special_tokens=False)
        context = contexts[example["context"]]
        room = max_len - len(question) - 3
        if room < 1:
            raise ValueError(
                f"max_len={max_len} leaves no room for the context after a {len(question)}-token question; raise max_len"
            )
        answer = _answer_tokens(example, context.offsets)
        prefix = [special.cls, *question, special.sep]
        start = 0
        while True:
            end = min(start + room, len(context.ids))
            positions = (0, 0)
            if answer is not None and start <= answer[0] and answer[1] < end:
                positions = (answer[0] - start + len(prefix), answer[1] - start + len(prefix))
            out.append(
                Feature(
                    example=index,
                    input_ids=[*prefix, *context.ids[start:end], special.sep],
                    token_type_ids=[0] * len(prefix) + [1] * (end - start + 1),
                    offsets=[None] * len(prefix) + list(context.offsets[start:end]) + [None],
                    start_position=positions[0],
                    end_position=positions[1],
                )
            )
            if end == len(context.ids):
                break
            start += min(doc_stride, room)
    return out


def _pad(rows: list[list[int]], fill: int) -> torch.Tensor:
    """(B, longest) int64, rows padded on the right with `fill`."""
    return pad_sequence([torch.tensor(r, dtype=torch.int64) for r in rows], batch_first=True, padding_value=fill)


def batches(feats: Sequence[Feature], tokenizer: Tokenizer, *, batch_size: int, labels: bool = False) -> list[Batch]:
    """Pad features into model batches (input_ids, attention_mask, token_type_ids; with labels also start/end_positions)."""
    check_int("batch_size", batch_size, 1)
    pad = special_tokens(tokenizer).pad
    out = []
    for i in range(0, len(feats), batch_size):
        chunk = feats[i : i + batch_size]
        batch = {
            "input_ids": _pad([f.input_ids for f in chunk], pad),
            "attention_mask": _pad([[1] * len(f.input_ids) for f in chunk], 0),
            "token_type_ids": _pad([f.token_type_ids for f in chunk], 0),
        }
        if labels:
            batch["start_positions"] = torch.tensor([f.start_position for f in chunk])
            batch["end_positions"] = torch.tensor([f.end_position for f in chunk])
        out.append(batch)
    return out


def _check_head(model: torch.nn.Module) -> None:
    heads = getattr(model.config, "heads", ())
    if "qa" not in heads:
        raise ValueError(
            f"SQuAD needs a 'qa' (span) head; the model has heads {list(heads)} (e.g. from_hf(path, heads=('qa',)))"
        )


def finetune(
    model: torch.nn.Module,
    examples: Sequence[Example],
    tokenizer: Tokenizer | None = None,
    *,
    steps: int,
    lr: float = 5e-5,
    batch_size: int = 16,
    max_len: int = 384,
    doc_stride: int = 128,
    seed: int = 0,
    device: str = "cpu",
    parallel: str = "ddp",
    progress: bool = True,
) -> torch.nn.Module:
    """Train the model's span ("qa") head and encoder on examples with model.training.loop.train.

    Unanswerable questions, and windows that do not hold the answer, are trained to point at
    [CLS], which is what the v2.0 no-answer score reads.

    Args:
        model: a Transformer with a "qa" head. examples: from `load`. tokenizer: None = model.tokenizer.
        steps: optimizer steps; features are reshuffled every epoch. lr, seed, device, parallel: as in TrainConfig.
        batch_size, max_len, doc_stride: as for `features` and `batches`. progress: show a progress bar.

    Returns:
        The same model, trained in place, in eval mode.
    """
    _check_head(model)
    check_int("steps", steps, 1)
    check_int("batch_size", batch_size, 1)
    tokenizer = tokenizer_of(model, tokenizer)
    feats = features(examples, tokenizer, max_len=max_len, doc_stride=doc_stride)
    if not feats:
        raise ValueError("examples is empty: nothing to fine-tune on")
    ordered = [feats[i] for i in epoch_order(len(feats), steps * batch_size, seed=seed)]
    data = batches(ordered, tokenizer, batch_size=batch_size, labels=True)
    train(model, data, TrainConfig(steps=steps, lr=lr, seed=seed, device=device, parallel=parallel, progress=progress))
    return model.eval()


@torch.no_grad()
def span_logits(
    model: torch.nn.Module,
    feats: Sequence[Feature],
    tokenizer: Tokenizer,
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> list[np.ndarray]:
    """Run the model: per feature a (T, 2) array of start and end logits over its own tokens."""
    _check_head(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for batch in tqdm(batches(feats, tokenizer, batch_size=batch_size), desc="squad predict", disable=not progress):
            logits = model(**{k: v.to(device) for k, v in batch.items()}).head_logits["qa"].float().cpu().numpy()
            lengths = batch["attention_mask"].sum(dim=1).tolist()
            out.extend(row[:n] for row, n in zip(logits, lengths))
    finally:
        model.train(was_training)
    return out


def extract(
    examples: Sequence[Example],
    feats: Sequence[Feature],
    logits: Sequence[np.ndarray],
    *,
    n_best: int = 20,
    max_answer_len: int = 30,
    version_2: bool = False,
    null_threshold: float = 0.0,
) -> dict[str, str]:
    """Pick each example's answer text from its features' start/end logits.

    Among the n_best start and n_best end context tokens of every window, the valid span
    (end >= start, at most max_answer_len tokens) with the highest start + end logit wins. With
    version_2, the answer is "" when the null score (the [CLS] start + end logit, the lowest
    over the windows) beats the best span's score by more than null_threshold.

    Returns:
        Example id -> answer text (a slice of the context, or "").
    """
    check_int("n_best", n_best, 1)
    check_int("max_answer_len", max_answer_len, 1)
    if len(feats) != len(logits):
        raise ValueError(f"logits ({len(logits)}) must hold one array per feature ({len(feats)})")
    by_example: dict[int, list[int]] = collections.defaultdict(list)
    for i, f in enumerate(feats):
        by_example[f.example].append(i)
    predictions = {}
    for index, example in enumerate(examples):
        best_score, best_text, null_score = -math.inf, "", math.inf
        for i in by_example.get(index, []):
            f, scores = feats[i], logits[i]
            null_score = min(null_score, float(scores[0, 0] + scores[0, 1]))
            context = np.array([j for j, o in enumerate(f.offsets) if o is not None], dtype=np.int64)
            if len(context) == 0:
                continue
            starts = context[np.argsort(-scores[context, 0], kind="stable")[:n_best]]
            ends = context[np.argsort(-scores[context, 1], kind="stable")[:n_best]]
            grid = scores[starts, 0][:, None] + scores[ends, 1][None, :]  # (starts, ends)
            valid = (ends[None, :] >= starts[:, None]) & (ends[None, :] < starts[:, None] + max_answer_len)
            grid = np.where(valid, grid, -np.inf)
            s, e = np.unravel_index(np.argmax(grid), grid.shape)
            if grid[s, e] > best_score:
                best_score = float(grid[s, e])
                best_text = example["context"][f.offsets[starts[s]][0] : f.offsets[ends[e]][1]]
        if version_2 and null_score - best_score > null_threshold:
            best_text = ""
        predictions[example["id"]] = best_text
    return predictions


def predict(
    model: torch.nn.Module,
    examples: Sequence[Example],
    tokenizer: Tokenizer | None = None,
    *,
    max_len: int = 384,
    doc_stride: int = 128,
    batch_size: int = 32,
    n_best: int = 20,
    max_answer_len: int = 30,
    version_2: bool | None = None,
    null_threshold: float = 0.0,
    progress: bool = True,
) -> dict[str, str]:
    """The model's answer to every example.

    Args:
        model: a Transformer with a "qa" head. examples: from `load`. tokenizer: None = model.tokenizer.
        max_len, doc_stride: windows as in `features`. batch_size: windows per forward pass.
        n_best, max_answer_len, null_threshold: as in `extract`.
        version_2: allow "no answer"; None = when any example is unanswerable.
        progress: show a progress bar.

    Returns:
        Example id -> answer text ("" = no answer).
    """
    tokenizer = tokenizer_of(model, tokenizer)
    if version_2 is None:
        version_2 = any(e["is_impossible"] for e in examples)
    feats = features(examples, tokenizer, max_len=max_len, doc_stride=doc_stride)
    logits = span_logits(model, feats, tokenizer, batch_size=batch_size, progress=progress)
    return extract(
        examples,
        feats,
        logits,
        n_best=n_best,
        max_answer_len=max_answer_len,
        version_2=version_2,
        null_threshold=null_threshold,
    )


def evaluate(
    model: torch.nn.Module, examples: Sequence[Example], tokenizer: Tokenizer | None = None, **options: Any
) -> dict[str, float]:
    """Answer the examples with a span model and score them with the official EM/F1.

    Args:
        model, examples, tokenizer: as for `predict`.
        options: `predict`'s keyword arguments (max_len, doc_stride, batch_size, n_best,
            max_answer_len, version_2, null_threshold, progress).

    Returns:
        `scores(examples, predictions)`: exact, f1 (percent), HasAns_*/NoAns_* breakdowns.
    """
    return scores(examples, predict(model, examples, tokenizer, **options))

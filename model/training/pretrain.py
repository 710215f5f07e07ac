"""Pretraining from text: corpus -> WordPiece tokenizer -> MLM + NSP/SOP + denoising batches -> training loop -> model."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.config import Config
from model.data.corpus import load_corpus
from model.data.tokenizer import load_tokenizer, special_tokens, train_tokenizer
from model.io import atomic_write_text
from model.training.distributed import is_main
from model.training.loop import TrainConfig, TrainResult, train
from model.training.objectives import PretrainingData
from model.transformer import Transformer

Tokenizer = Any  # a tokenizers.Tokenizer
HOLDOUT = 0.05  # the documents' fraction pretraining holds out; `split_documents` says which


@dataclass
class PretrainResult:
    """A pretraining run: the model (tokenizer attached), the loop's result, held-out losses before and after."""

    model: Transformer
    train: TrainResult
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    head_losses: list[dict[str, float]]


@torch.no_grad()
def evaluate_losses(model: Transformer, data: PretrainingData, n_batches: int) -> dict[str, float]:
    """Mean loss of every supervised head (mlm, pair, lm) over the first `n_batches` batches of `data`."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    count = min(n_batches, len(data))
    for i in range(count):
        for name, loss in model(**data[i]).losses.items():
            totals[name] = totals.get(name, 0.0) + loss.item() / count
    model.train(was_training)
    return totals


@dataclass
class Prepared:
    """Everything a pretraining run needs before its first step."""

    config: Config
    tokenizer: Tokenizer
    train_data: PretrainingData
    eval_data: PretrainingData


def split_documents(documents: list[str], *, seed: int = 0, holdout: float = HOLDOUT) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents): the split pretraining makes, which later evaluations reuse.

    Args:
        documents: the corpus's documents. seed: shuffles them; the first shuffled ones are held out.
        holdout: the fraction held out (at least 2 documents), in (0, 1).
    """
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be a fraction in (0, 1), got {holdout!r}")
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    n_held = max(2, round(holdout * len(documents)))
    return [documents[i] for i in order[n_held:]], [documents[i] for i in order[:n_held]]


def prepare(
    config: Config | str,
    corpus: Any = None,
    *,
    batch_size: int = 32,
    max_len: int = 128,
    pair_task: str | None = "sop",
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
    holdout: float = HOLDOUT,
) -> Prepared:
    """Split the corpus, train (or take) the tokenizer, fit the config to it and build the batches.

    The config's vocab_size and pad_id follow the tokenizer; the "pair" head is dropped when
    pair_task is None. A `holdout` fraction of the documents (at least 2) is kept for evaluation
    (`split_documents`).
    """
    if isinstance(config, str):
        config = Config.preset(config)
    if max_len > config.max_positions:
        raise ValueError(f"max_len={max_len} is longer than the model's max_positions={config.max_positions}")
    if pair_task is not None and "pair" not in config.heads:
        raise ValueError(
            f"pair_task={pair_task!r} needs a 'pair' head, but the config's heads are {list(config.heads)}"
        )
    train_docs, eval_docs = split_documents(load_corpus(corpus), seed=seed, holdout=holdout)
    if tokenizer is None:
        tokenizer = train_tokenizer(train_docs, vocab_size=config.vocab_size)
    heads = config.heads if pair_task else tuple(h for h in config.heads if h != "pair")
    config = config.replace(vocab_size=tokenizer.get_vocab_size(), pad_id=special_tokens(tokenizer).pad, heads=heads)
    options = dict(max_len=max_len, pair_task=pair_task, denoise="lm" in config.heads)
    train_data = PretrainingData(train_docs, tokenizer, batch_size=batch_size, seed=seed, **options)
    try:
        eval_data = PretrainingData(eval_docs, tokenizer, batch_size=batch_size, seed=seed + 1, **options)
    except ValueError as err:
        raise ValueError(
            f"holdout={holdout} keeps {len(eval_docs)} of {len(train_docs) + len(eval_docs)} documents for "
            f"evaluation, too few for one batch of {batch_size} ({err}); raise holdout, lower batch_size or give more text"
        ) from None
    return Prepared(config, tokenizer, train_data, eval_data)


def pretrain(
    config: Config | str = "full",
    corpus: Any = None,
    *,
    steps: int = 300,
    batch_size: int = 32,
    max_len: int = 128,
    pair_task: str | None = "sop",
    lr: float = 5e-4,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
    holdout: float = HOLDOUT,
    eval_batches: int = 8,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 0,
    device: str = "cpu",
    parallel: str = "ddp",
    progress: bool = True,
) -> PretrainResult:
    """Pretrain a fresh model on `corpus` (None = the built-in corpus, a path, or a list of texts).

    config: a Config or a preset name. The decoder (if any) learns denoising seq2seq; the encoder
    MLM and `pair_task` ("nsp", "sop" or None). See `prepare` for the tokenizer and holdout.
    With checkpoint_dir, an interrupted run resumes there with the tokenizer it started with.
    parallel: "ddp" or "fsdp", how the ranks of a torchrun launch share the model (see TrainConfig).
    Returns a PretrainResult whose model has its tokenizer attached.
    """
    saved_tokenizer = Path(checkpoint_dir) / "tokenizer.json" if checkpoint_dir else None
    if tokenizer is None and saved_tokenizer is not None and saved_tokenizer.is_file():
        tokenizer = load_tokenizer(saved_tokenizer)
    run = prepare(
        config,
        corpus,
        batch_size=batch_size,
        max_len=max_len,
        pair_task=pair_task,
        seed=seed,
        tokenizer=tokenizer,
        holdout=holdout,
    )
    if saved_tokenizer is not None and not saved_tokenizer.is_file() and is_main():
        saved_tokenizer.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved_tokenizer, run.tokenizer.to_str())

    torch.manual_seed(seed)
    model = Transformer(run.config)
    model.tokenizer = run.tokenizer
    eval_before = evaluate_losses(model, run.eval_data, eval_batches)
    head_losses: list[dict[str, float]] = []

    def loss_fn(m: Transformer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = m(**batch)
        head_losses.append({name: loss.item() for name, loss in out.losses.items()})
        return out.loss

    settings = TrainConfig(
        steps=steps,
        lr=lr,
        seed=seed,
        device=device,
        parallel=parallel,
        progress=progress,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
    )
    result = train(model, run.train_data, settings, loss_fn=loss_fn)
    model.cpu()
    eval_after = evaluate_losses(model, run.eval_data, eval_batches)
    return PretrainResult(model.eval(), result, eval_before, eval_after, head_losses)

"""Pretraining from text: corpus -> WordPiece tokenizer -> MLM + NSP/SOP + denoising batches -> training loop -> model."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from model.config import Config
from model.corpus import load_corpus
from model.objectives import PretrainingData
from model.tokenizer import special_tokens, train_tokenizer
from model.train import TrainConfig, TrainResult, train
from model.transformer import Transformer

Tokenizer = Any  # a tokenizers.Tokenizer


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
    holdout: float = 0.05,
    eval_batches: int = 8,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> PretrainResult:
    """Pretrain a fresh model on `corpus` (None = the built-in corpus, a path, or a list of texts).

    config: a Config or a preset name. The tokenizer is trained on the corpus unless given; the
    config's vocab_size and pad_id follow the tokenizer. The decoder (if any) learns denoising
    seq2seq; the encoder MLM and `pair_task` ("nsp", "sop" or None). A `holdout` fraction of the
    documents measures held-out losses before and after training.
    Returns a PretrainResult whose model has its tokenizer attached.
    """
    if isinstance(config, str):
        config = Config.preset(config)
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be a fraction in (0, 1), got {holdout!r}")
    documents = load_corpus(corpus)
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(holdout * len(documents)))
    eval_docs = [documents[i] for i in order[:n_eval]]
    train_docs = [documents[i] for i in order[n_eval:]]
    if tokenizer is None:
        tokenizer = train_tokenizer(train_docs, vocab_size=config.vocab_size)
    config = config.replace(vocab_size=tokenizer.get_vocab_size(), pad_id=special_tokens(tokenizer).pad)
    heads = config.heads if pair_task else tuple(h for h in config.heads if h != "pair")
    config = config.replace(heads=heads)
    options = dict(max_len=max_len, batch_size=batch_size, pair_task=pair_task, denoise="lm" in config.heads)
    train_data = PretrainingData(train_docs, tokenizer, seed=seed, **options)
    eval_data = PretrainingData(eval_docs, tokenizer, seed=seed + 1, **options)

    torch.manual_seed(seed)
    model = Transformer(config)
    model.tokenizer = tokenizer
    eval_before = evaluate_losses(model, eval_data, eval_batches)
    head_losses: list[dict[str, float]] = []

    def loss_fn(m: Transformer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = m(**batch)
        head_losses.append({name: loss.item() for name, loss in out.losses.items()})
        return out.loss

    run = TrainConfig(
        steps=steps, lr=lr, seed=seed, device=device, progress=progress,
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
    )
    result = train(model, train_data, run, loss_fn=loss_fn)
    model.cpu()
    eval_after = evaluate_losses(model, eval_data, eval_batches)
    return PretrainResult(model.eval(), result, eval_before, eval_after, head_losses)

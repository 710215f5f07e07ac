"""Generation metrics: ROUGE (`rouge-score`) and corpus BLEU (`sacrebleu`) of a seq2seq model's decoded outputs.

`evaluate(model, sources, references, tokenizer, ...)` generates from the sources (a PyTorch
`Transformer` with an 'lm' head, or an ONNX export on ONNX Runtime), decodes and scores against
the references. `denoising` builds the task flashlite's own presets train their decoder on
(`model.training.objectives`: rebuild a sentence from a copy with a sixth of it masked).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from tokenizers import Tokenizer

from model.config import check_int
from model.data.corpus import load_corpus, split_sentences
from model.data.tokenizer import encode, token_lengths
from model.training.pretrain import HOLDOUT, split_documents

ROUGE = ("rouge1", "rouge2", "rougeL")
METRICS = (*ROUGE, "bleu")
MASK_TOKENS = ("[MASK]", "<mask>")  # flashlite's WordPiece tokenizers, BART/RoBERTa's BPE


def _import(name: str) -> Any:
    """A metric package of the `eval` extra, or an ImportError saying how to install it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise ImportError(f"generation metrics need {name} (the `eval` extra: pip install 'flashlite[eval]')") from None


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    for name, texts in (("predictions", predictions), ("references", references)):
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"{name} must be a sequence of str, got {type(texts).__name__}")
    if not predictions or len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must be non-empty and of one length, got {len(predictions)} and "
            f"{len(references)}"
        )


def rouge(predictions: Sequence[str], references: Sequence[str], *, stemmer: bool = False) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures (0..1) of each prediction against its reference.

    Args:
        predictions, references: one reference text per prediction.
        stemmer: Porter-stem the words first (rouge-score's `use_stemmer`).
    """
    rouge_scorer = _import("rouge_score.rouge_scorer")
    _check_pairs(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE), use_stemmer=stemmer)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]  # (target, prediction)
    return {name: sum(s[name].fmeasure for s in scores) / len(scores) for name in ROUGE}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0..100) of the predictions against one reference each, with sacrebleu's defaults (13a tokens).

    Args:
        predictions, references: one reference text per prediction.
    """
    sacrebleu = _import("sacrebleu")
    _check_pairs(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def score(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """{"rouge1", "rouge2", "rougeL" (F-measures, 0..1), "bleu" (0..100)} of the predictions.

    Args:
        predictions, references: one reference text per prediction.
    """
    return {**rouge(predictions, references), "bleu": bleu(predictions, references)}


def _runner(model: Any) -> Any:
    """What decodes: a Transformer as it is, an OrtModel, or the OrtModel inside an OrtModule."""
    from model.transformer import Transformer

    if isinstance(model, Transformer):
        if model.decoder is None or "lm" not in model.config.heads:
            raise ValueError(
                f"generation needs an encoder-decoder model with an 'lm' head; this one has "
                f"{model.config.decoder_layers} decoder layers and heads {list(model.config.heads)}"
            )
        return model
    runner = getattr(model, "runner", model)  # an OrtModule wraps its OrtModel
    if not callable(getattr(runner, "generate", None)):
        raise TypeError(
            f"model must be a model.Transformer or an OrtModel (or OrtModule) with generate(), got {type(model).__name__}"
        )
    return runner


def generate_texts(
    model: Any,
    sources: Sequence[str],
    tokenizer: Tokenizer,
    *,
    max_new_tokens: int = 32,
    num_beams: int = 1,
    max_len: int = 64,
    batch_size: int = 16,
    **options: Any,
) -> list[str]:
    """The model's decoded output for each source text (special tokens dropped).

    Args:
        model: a Transformer with an 'lm' head, or an OrtModel / OrtModule over an encoder-decoder export.
        sources: the input texts. tokenizer: encodes them and decodes the outputs.
        max_new_tokens, num_beams: `generate`'s (1 beam = greedy).
        max_len: sources are truncated to this many tokens. batch_size: sources per generate call.
        options: more `generate` options (eos_token_id, decoder_start_token_id, ...).
    """
    if isinstance(sources, str) or not sources:
        raise ValueError(f"sources must be a non-empty sequence of str, got {sources!r:.80}")
    check_int("batch_size", batch_size, 1)
    runner = _runner(model)
    module = runner if isinstance(runner, torch.nn.Module) else None  # ONNX Runtime takes CPU tensors
    device = next(module.parameters()).device if module is not None else torch.device("cpu")
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    texts: list[str] = []
    try:
        for start in range(0, len(sources), batch_size):
            batch = encode(tokenizer, list(sources[start : start + batch_size]), max_len=max_len)
            ids = runner.generate(
                batch["input_ids"].to(device),
                batch["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                **options,
            )
            texts += tokenizer.decode_batch(torch.as_tensor(ids).cpu().tolist(), skip_special_tokens=True)
    finally:
        if module is not None:
            module.train(was_training)
    return texts


def evaluate(
    model: Any,
    sources: Sequence[str],
    references: Sequence[str],
    tokenizer: Tokenizer,
    *,
    max_new_tokens: int = 32,
    num_beams: int = 1,
    max_len: int = 64,
    batch_size: int = 16,
    **options: Any,
) -> dict[str, float]:
    """Generate from `sources`, decode, and score against `references`: {"rouge1", "rouge2", "rougeL", "bleu"}.

    Args:
        model, sources, tokenizer, max_new_tokens, num_beams, max_len, batch_size, options: see `generate_texts`.
        references: one reference text per source.
    """
    if isinstance(references, str) or len(references) != len(sources):
        raise ValueError(f"references must hold one text per source ({len(sources)}), got {len(references)}")
    predictions = generate_texts(
        model,
        sources,
        tokenizer,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        max_len=max_len,
        batch_size=batch_size,
        **options,
    )
    return score(predictions, references)


def held_out_documents(corpus: Any = None, *, seed: int = 0, holdout: float = HOLDOUT) -> list[str]:
    """The documents `model.training.pretrain.prepare` kept out of pretraining (its `split_documents`).

    Args:
        corpus: what pretraining read (None = the built-in corpus, a path, or a list of texts).
        seed, holdout: pretraining's seed and held-out fraction.
    """
    return split_documents(load_corpus(corpus), seed=seed, holdout=holdout)[1]


def denoising(
    texts: Sequence[str], tokenizer: Tokenizer, *, n: int = 32, max_len: int = 32, ratio: float = 0.15, seed: int = 0
) -> tuple[list[str], list[str], dict[str, int]]:
    """The denoising task on held-out text: (sources, references, generate options).

    The first `n` sentences of `texts` that encode to 8..max_len tokens are the references (as the
    tokenizer decodes them, so case and spacing are what the decoder learnt to write); each source
    is its sentence with a `ratio` of its words replaced by the tokenizer's mask token ([MASK] or
    <mask>; none: the sentence unchanged, a copy task). With [CLS] and [SEP] in the vocabulary (a
    flashlite tokenizer) the options start decoding at [CLS] and end it at [SEP], as the decoder was
    trained (`objectives.PretrainingData`: decoder input = [CLS] ... [SEP], shifted).

    Args:
        texts: held-out documents. tokenizer: the model's. n: sentences at most (>= 1).
        max_len: tokens per sentence at most (special tokens included; >= 8). ratio: words masked, in [0, 1).
        seed: which words are masked.
    """
    check_int("n", n, 1)
    check_int("max_len", max_len, 8)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
    sentences = [s for text in texts for s in split_sentences(text) if len(s.split()) >= 4]
    lengths = token_lengths(tokenizer, sentences, max_len=max_len + 1) if sentences else []
    chosen = [s for s, length in zip(sentences, lengths) if 8 <= length <= max_len][:n]
    if not chosen:
        raise ValueError(f"texts hold no sentence of 8..{max_len} tokens to build the denoising task from")
    references = tokenizer.decode_batch([e.ids for e in tokenizer.encode_batch(chosen)], skip_special_tokens=True)
    mask = next((t for t in MASK_TOKENS if tokenizer.token_to_id(t) is not None), None)
    rng = random.Random(seed)
    sources = [
        " ".join(mask if mask and rng.random() < ratio else word for word in sentence.split()) for sentence in chosen
    ]
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    options = {} if cls is None or sep is None else {"decoder_start_token_id": cls, "eos_token_id": sep}
    return sources, references, options

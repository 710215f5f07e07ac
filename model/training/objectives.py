"""Pretraining objectives: BERT masking and NSP/SOP/denoising batch building."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from tokenizers import Tokenizer

from model.data.corpus import split_sentences
from model.data.tokenizer import SpecialTokens, special_tokens
from model.losses import IGNORE

PAIR_TASKS = ("nsp", "sop", None)


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    special: SpecialTokens,
    vocab_size: int,
    generator: torch.Generator,
    prob: float = 0.15,
    special_ids_extra: Iterable[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt token ids the BERT way for masked language modelling.

    Each non-special token is chosen with probability ``prob``; a chosen token becomes [MASK]
    80% of the time, a uniformly random non-special id 10%, and stays as it is 10%.

    Args:
        input_ids: (B, T) integer token ids; not modified.
        special: the vocabulary's special tokens, never chosen nor drawn as replacements.
        vocab_size: ids run from 0 to vocab_size - 1.
        generator: the source of randomness (results are a function of its state).
        prob: the probability of choosing a token, in (0, 1).
        special_ids_extra: more ids to treat as special.

    Returns:
        ``(masked_ids, labels)``: the corrupted ids (same dtype as the input) and int64 labels
        holding the original id at chosen positions and -100 elsewhere.
    """
    if not 0.0 < prob < 1.0:
        raise ValueError(f"prob={prob!r}: expected a probability strictly between 0 and 1")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids: expected an integer tensor, got {input_ids.dtype}")
    excluded = torch.tensor(sorted(special.ids() | set(special_ids_extra)), dtype=torch.int64)
    allowed = torch.arange(vocab_size)[~torch.isin(torch.arange(vocab_size), excluded)]
    if len(allowed) == 0:
        raise ValueError(f"vocab_size={vocab_size!r}: no id outside the special ids {excluded.tolist()}")
    if input_ids.numel() and int(input_ids.max()) >= vocab_size:
        raise ValueError(f"input_ids holds id {int(input_ids.max())}, outside vocab_size={vocab_size}")
    ids = input_ids.to(torch.int64)
    candidates = ~torch.isin(ids, excluded)
    # Fixed-shape draws consume the generator identically whatever the content of the batch.
    chosen = (torch.rand(ids.shape, generator=generator) < prob) & candidates
    action = torch.rand(ids.shape, generator=generator)
    replacement = allowed[torch.randint(len(allowed), ids.shape, generator=generator)]
    masked = torch.where(chosen & (action < 0.8), special.mask, ids)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), replacement, masked)
    labels = torch.where(chosen, ids, IGNORE)
    return masked.to(input_ids.dtype), labels


def _stream_seed(seed: int, stream: int, index: int) -> int:
    """A well-mixed 64-bit seed for one (seed, stream, index) triple, independent of the others."""
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(1, np.uint64)[0])


class PretrainingData:
    """A step-indexed source of pretraining batches: ``data[step]`` is always the same batch.

    Examples are built once: segment A is a run of consecutive sentences of a document filling
    about half of the token budget; segment B is the sentences that follow (label 0) or, for
    NSP half of the time, a run from another document (label 1); for SOP, A and B are swapped
    half of the time (label 1). ``data[i]`` for any i >= 0 is batch ``i % len(data)`` of epoch
    ``i // len(data)``, whose order is a permutation seeded by (seed, epoch); the masking is
    seeded by (seed, i), so resuming training at step i is exact. Iterating yields one epoch.

    Batches hold int64 ``input_ids`` (MLM-corrupted), ``attention_mask``, ``token_type_ids``,
    ``mlm_labels``, ``pair_labels`` (with a pair_task) and, with denoise, ``decoder_input_ids``,
    ``decoder_attention_mask``, ``decoder_labels`` (the uncorrupted sequence, shifted),
    padded to the batch's longest example.

    Args:
        documents: the corpus, one string per document.
        tokenizer: a WordPiece tokenizer with the five BERT special tokens.
        max_len: the longest example, special tokens included (>= 8).
        batch_size: examples per batch (>= 1); an epoch's last incomplete batch is dropped.
        pair_task: "nsp", "sop" or None (single segments [CLS] A [SEP], no pair_labels).
        mlm_prob: the probability of choosing a token for MLM, in (0, 1).
        denoise: add the decoder keys for denoising seq2seq.
        seed: the seed of the examples, the epoch orders and the masking (>= 0).
    """

    step_indexed = True  # the training loop passes the global step; epochs are handled here

    def __init__(
        self,
        documents: list[str],
        tokenizer: Tokenizer,
        *,
        max_len: int = 128,
        batch_size: int = 32,
        pair_task: str | None = "nsp",
        mlm_prob: float = 0.15,
        denoise: bool = True,
        seed: int = 0,
    ) -> None:
        """Tokenize the documents once and build the examples (see the class for the arguments)."""
        if pair_task not in PAIR_TASKS:
            raise ValueError(f"pair_task={pair_task!r}: expected one of {PAIR_TASKS}")
        for name, value, low in (("max_len", max_len, 8), ("batch_size", batch_size, 1), ("seed", seed, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}={value!r}: expected an int >= {low}")
        if not 0.0 < mlm_prob < 1.0:
            raise ValueError(f"mlm_prob={mlm_prob!r}: expected a probability strictly between 0 and 1")
        self.special = special_tokens(tokenizer)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.max_len, self.batch_size, self.pair_task = max_len, batch_size, pair_task
        self.mlm_prob, self.denoise, self.seed = mlm_prob, denoise, seed
        self._tokens, self._sentences = _tokenize(documents, tokenizer)
        if pair_task == "nsp" and len(self._sentences) < 2:
            raise ValueError(
                f"documents: pair_task='nsp' needs at least two non-empty documents, got {len(self._sentences)}"
            )
        self._examples = self._build_examples(random.Random(seed))
        self.n_examples = len(self._examples)
        if self.n_examples < batch_size:
            raise ValueError(
                f"documents: the corpus makes {self.n_examples} examples, fewer than "
                f"batch_size={batch_size}; give more text or a smaller batch_size"
            )
        self._order: tuple[int, torch.Tensor] | None = None

    def _build_examples(self, rng: random.Random) -> np.ndarray:
        """Build every example as (a_start, a_end, b_start, b_end, label) ranges into the flat tokens."""
        single = self.pair_task is None
        budget = self.max_len - (2 if single else 3)
        sizes = [np.diff(bounds) for bounds in self._sentences]
        examples = []
        for d, (size, bounds) in enumerate(zip(sizes, self._sentences, strict=True)):
            i = 0
            while i < len(size) - (not single):  # in a pair, A leaves a following sentence for B
                j = _fill(size, i, budget if single else budget // 2, len(size) - (not single))
                a_len = int(bounds[j] - bounds[i])
                if single:
                    b, label, next_i = (0, 0), 0, j
                elif self.pair_task == "nsp" and rng.random() < 0.5:
                    other = rng.randrange(len(sizes) - 1)
                    other += other >= d
                    k = rng.randrange(len(sizes[other]))
                    end = _fill(sizes[other], k, budget - a_len, len(sizes[other]))
                    b = (self._sentences[other][k], self._sentences[other][end])
                    label, next_i = 1, j  # the unused following sentences start the next example
                else:
                    end = _fill(size, j, budget - a_len, len(size))
                    b, label, next_i = (bounds[j], bounds[end]), 0, end
                (a0, a1), (b0, b1) = _truncate((bounds[i], bounds[j]), b, budget)
                if self.pair_task == "sop" and rng.random() < 0.5:
                    (a0, a1), (b0, b1), label = (b0, b1), (a0, a1), 1
                examples.append((a0, a1, b0, b1, label))
                i = next_i
        return np.array(examples, dtype=np.int64).reshape(-1, 5)

    def __len__(self) -> int:
        """Return the number of batches per epoch."""
        return self.n_examples // self.batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yield the batches of epoch 0 (the steps 0 to len - 1)."""
        return (self[step] for step in range(len(self)))

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(_stream_seed(self.seed, 0, epoch))
            self._order = (epoch, torch.randperm(self.n_examples, generator=generator))
        return self._order[1]

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        """Return the batch of a training step (any int >= 0); the same step gives the same batch."""
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool):
            raise TypeError(f"step: expected an int, got {type(step).__name__}")
        if step < 0:
            raise IndexError(f"step={step}: expected an int >= 0")
        epoch, position = divmod(int(step), len(self))
        rows = self._epoch_order(epoch)[position * self.batch_size : (position + 1) * self.batch_size]
        batch = self._collate(self._examples[rows.numpy()])
        generator = torch.Generator().manual_seed(_stream_seed(self.seed, 1, int(step)))
        original = batch["input_ids"]
        batch["input_ids"], batch["mlm_labels"] = mask_tokens(
            original, special=self.special, vocab_size=self.vocab_size, generator=generator, prob=self.mlm_prob
        )
        if self.denoise:
            batch["decoder_input_ids"] = original[:, :-1]
            batch["decoder_attention_mask"] = batch["attention_mask"][:, :-1]
            batch["decoder_labels"] = original[:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, IGNORE)
        return batch

    def _collate(self, examples: np.ndarray) -> dict[str, torch.Tensor]:
        """Lay out [CLS] A [SEP] (B [SEP]) per example, padded on the right to the longest."""
        a_len, b_len = examples[:, 1] - examples[:, 0], examples[:, 3] - examples[:, 2]
        lengths = a_len + 2 + (0 if self.pair_task is None else b_len + 1)
        ids = np.full((len(examples), lengths.max()), self.special.pad, dtype=np.int64)
        types = np.zeros_like(ids)
        s = self.special
        for row, (a0, a1, b0, b1, _) in enumerate(examples):
            sep, last = a1 - a0 + 1, lengths[row] - 1  # where the first and the last [SEP] go
            ids[row, 0], ids[row, 1:sep], ids[row, sep] = s.cls, self._tokens[a0:a1], s.sep
            if self.pair_task is not None:
                ids[row, sep + 1 : last], ids[row, last] = self._tokens[b0:b1], s.sep
                types[row, sep + 1 : last + 1] = 1
        batch = {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": (torch.arange(ids.shape[1]) < torch.from_numpy(lengths)[:, None]).long(),
            "token_type_ids": torch.from_numpy(types),
        }
        if self.pair_task is not None:
            batch["pair_labels"] = torch.from_numpy(examples[:, 4].copy())
        return batch


def _tokenize(documents: list[str], tokenizer: Tokenizer) -> tuple[np.ndarray, list[np.ndarray]]:
    """Tokenize every sentence once into one flat token array.

    Returns:
        ``(tokens, sentences)``: all token ids back to back, and per non-empty document the
        token offsets of its sentences (n_sentences + 1 bounds; consecutive sentences are
        contiguous, so a run of them is one slice).
    """
    if isinstance(documents, str) or not all(isinstance(doc, str) for doc in documents):
        raise TypeError("documents: expected a list of str")
    sentences = [split_sentences(doc) for doc in documents]
    flat = [sentence for doc in sentences for sentence in doc]
    if tokenizer.truncation is not None or tokenizer.padding is not None:
        # A tokenizer loaded with fixed padding would pad every sentence; use a plain copy.
        tokenizer = Tokenizer.from_str(tokenizer.to_str())
        tokenizer.no_truncation()
        tokenizer.no_padding()
    chunks = [np.zeros(0, dtype=np.int32)]
    for start in range(0, len(flat), 4096):  # bounded memory for the Encoding objects
        encodings = tokenizer.encode_batch(flat[start : start + 4096], add_special_tokens=False)
        chunks += [np.asarray(encoding.ids, dtype=np.int32) for encoding in encodings]
    offsets = np.cumsum([0, *map(len, chunks[1:])])
    bounds, first = [], 0
    for doc in sentences:
        doc_offsets = np.unique(offsets[first : first + len(doc) + 1])  # token-less sentences collapse
        if len(doc_offsets) > 1:
            bounds.append(doc_offsets)
        first += len(doc)
    return np.concatenate(chunks), bounds


def _fill(size: np.ndarray, start: int, budget: int, stop: int) -> int:
    """Return the end of the run of sentences from ``start`` whose tokens first reach ``budget``.

    The run holds at least one sentence and ends at or before the sentence index ``stop``.
    """
    end, total = start + 1, int(size[start])
    while end < stop and total < budget:
        total += int(size[end])
        end += 1
    return end


def _truncate(a: tuple[int, int], b: tuple[int, int], budget: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shorten the longer segment until both fit the budget; A loses its start, B its end.

    Trimming away from the A|B boundary keeps the junction that NSP and SOP judge intact.
    """
    (a0, a1), (b0, b1) = a, b
    if (a1 - a0) + (b1 - b0) <= budget:
        return (int(a0), int(a1)), (int(b0), int(b1))
    # Cutting one token at a time from the longer (B on ties) ends with B at budget // 2
    # unless either segment was short enough to keep whole.
    b_len = min(b1 - b0, max(budget - (a1 - a0), budget // 2))
    return (int(a1 - (budget - b_len)), int(a1)), (int(b0), int(b0 + b_len))

"""Teacher-labelled augmentation for task distillation: copies of the training text with words swapped for their neighbours.

TinyBERT's recipe, without its masked-language model: each word that is one token of the
vocabulary is, with probability `replace_prob`, replaced by one of its `neighbours` nearest
whole-word tokens by cosine in the teacher's input embedding table. The copies carry no labels:
the student learns the teacher's outputs on them (distillation's logit and hidden-state terms),
which is what makes them useful when a task has few labelled rows.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor

from model.config import check_int

_PIECES = re.compile(r"[^\W\d_]+|[\W\d_]+")  # runs of letters, and everything between them


class WordReplacer:
    """Replace words of a text by their nearest whole-word tokens in an embedding table.

    Args:
        tokenizer: the model's tokenizer (a `tokenizers.Tokenizer`).
        table: the (vocab, dim) input word embeddings (`Embeddings.word_matrix()`).
        neighbours: how many nearest tokens a word may become.
    """

    def __init__(self, tokenizer: Tokenizer, table: Tensor, *, neighbours: int = 15):
        check_int("neighbours", neighbours, 1)
        if table.dim() != 2 or table.shape[0] < tokenizer.get_vocab_size():
            raise ValueError(
                f"table must be (vocab, dim) with at least the tokenizer's {tokenizer.get_vocab_size()} rows, "
                f"got shape {tuple(table.shape)}"
            )
        self.tokenizer, self.neighbours = tokenizer, neighbours
        words = {token_id: tokenizer.decode([token_id]).strip() for token_id in range(tokenizer.get_vocab_size())}
        words = {i: w for i, w in words.items() if len(w) > 1 and w.isalpha()}
        encoded = tokenizer.encode_batch(list(words.values()), add_special_tokens=False)
        # Whole-word tokens: a word that the tokenizer turns back into this very token.
        self.words = {i: w for (i, w), enc in zip(words.items(), encoded) if enc.ids == [i]}
        self.candidates = torch.tensor(sorted(self.words))
        self.unit = torch.nn.functional.normalize(table.detach().float(), dim=-1)
        self.candidate_unit = self.unit[self.candidates]
        self._cache: dict[int, list[str]] = {}

    def options(self, word: str) -> list[str]:
        """The words `word` may become: [] unless it is one whole-word token of the vocabulary."""
        ids = self.tokenizer.encode(word, add_special_tokens=False).ids
        if len(ids) != 1 or ids[0] not in self.words:
            return []
        token = ids[0]
        if token not in self._cache:
            scores = self.candidate_unit @ self.unit[token]
            best = scores.topk(min(self.neighbours + 1, len(self.candidates))).indices
            nearest = [int(self.candidates[i]) for i in best if int(self.candidates[i]) != token]
            self._cache[token] = [self.words[i] for i in nearest[: self.neighbours]]
        return self._cache[token]

    def __call__(self, text: str, rng: random.Random, replace_prob: float) -> str:
        """A copy of `text` with each replaceable word swapped with probability `replace_prob` (its case kept)."""
        out = []
        for piece in _PIECES.findall(text):
            options = self.options(piece) if piece.isalpha() and rng.random() < replace_prob else []
            if options:
                new = rng.choice(options)
                piece = (
                    new.upper()
                    if piece.isupper() and len(piece) > 1
                    else new.capitalize()
                    if piece[0].isupper()
                    else new
                )
            out.append(piece)
        return "".join(out)


def replacer_for(model: Any, *, neighbours: int = 15) -> WordReplacer:
    """A `WordReplacer` by the model's own input embeddings and tokenizer (the teacher's, before any pass)."""
    with torch.no_grad():
        return WordReplacer(model.tokenizer, model.embeddings.word_matrix(), neighbours=neighbours)


def _check(copies: int, replace_prob: float) -> None:
    check_int("copies", copies, 1)
    if isinstance(replace_prob, bool) or not isinstance(replace_prob, (int, float)) or not 0 < replace_prob <= 1:
        raise ValueError(f"replace_prob must be a number in (0, 1], got {replace_prob!r}")


def augment_texts(
    texts: Sequence[str], replacer: WordReplacer, *, copies: int, replace_prob: float = 0.4, seed: int = 0
) -> list[str]:
    """`copies` altered copies of every text, in text order (copies that came out unchanged are left out).

    Args:
        texts: the training texts. replacer: a `WordReplacer` for the teacher.
        copies: altered copies per text. replace_prob: chance that each replaceable word is swapped.
        seed: makes the copies reproducible.
    """
    _check(copies, replace_prob)
    rng = random.Random(seed)
    out = []
    for text in texts:
        for _ in range(copies):
            new = replacer(text, rng, replace_prob)
            if new != text:
                out.append(new)
    return out


def augment_rows(
    rows: Sequence[dict[str, Any]],
    fields: Sequence[str],
    replacer: WordReplacer,
    *,
    copies: int,
    replace_prob: float = 0.4,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """`copies` altered, unlabelled copies of every row (each text field altered; unchanged copies left out).

    Args:
        rows: labelled task rows (dicts holding `fields` and "label"). fields: the text fields.
        replacer, copies, replace_prob, seed: as for `augment_texts`.

    Returns:
        New rows with the same fields and label None: the teacher labels them during distillation.
    """
    _check(copies, replace_prob)
    rng = random.Random(seed)
    out = []
    for row in rows:
        for _ in range(copies):
            new = {field: replacer(row[field], rng, replace_prob) for field in fields}
            if any(new[field] != row[field] for field in fields):
                out.append({**new, "label": None})
    return out

"""WordPiece tokenizers (trained here or loaded from a BERT-family model) and batch encoding to tensors."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# The order fixes the ids of a newly trained tokenizer: [PAD] = 0 ... [MASK] = 4.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_PREFIX = "##"


@dataclass(frozen=True)
class SpecialTokens:
    """The ids of the five BERT special tokens in one vocabulary."""

    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    def ids(self) -> frozenset[int]:
        """Return the five ids as a set."""
        return frozenset((self.pad, self.unk, self.cls, self.sep, self.mask))


def special_tokens(tok: Tokenizer) -> SpecialTokens:
    """Look up the special-token ids of a tokenizer.

    Args:
        tok: the tokenizer.

    Returns:
        Its SpecialTokens.

    Raises:
        ValueError: the vocabulary lacks one of [PAD], [UNK], [CLS], [SEP], [MASK].
    """
    ids = {token: tok.token_to_id(token) for token in SPECIAL_TOKENS}
    missing = [token for token, id_ in ids.items() if id_ is None]
    if missing:
        raise ValueError(f"the tokenizer's vocabulary lacks the special token(s) {', '.join(missing)}")
    return SpecialTokens(*(ids[token] for token in SPECIAL_TOKENS))


def _set_bert_text_handling(tok: Tokenizer, lowercase: bool) -> None:
    """Give a tokenizer BERT's normalizer and pre-tokenizer (needed before training)."""
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()


def _set_bert_markers(tok: Tokenizer) -> Tokenizer:
    """Give a WordPiece tokenizer BERT's decoder, special tokens and [CLS]/[SEP] template."""
    tok.decoder = decoders.WordPiece(prefix=_PREFIX)
    # Registering the specials keeps "[MASK]" in raw text from being split into "[", "mask", "]".
    tok.add_special_tokens([token for token in SPECIAL_TOKENS if tok.token_to_id(token) is not None])
    markers = {token: tok.token_to_id(token) for token in ("[CLS]", "[SEP]")}
    missing = [token for token, id_ in markers.items() if id_ is None]
    if missing:
        raise ValueError(f"the vocabulary lacks {', '.join(missing)}, needed to mark sequences")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=list(markers.items()),
    )
    return tok


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    lowercase: bool = True,
    limit_alphabet: int = 1000,
) -> Tokenizer:
    """Train a BERT-style WordPiece tokenizer.

    Args:
        texts: the training text (any iterable of strings; read once).
        vocab_size: the size of the vocabulary, special tokens included.
        min_frequency: how often a pair must occur to be merged into a new token.
        lowercase: lowercase the text before tokenizing (BERT "uncased").
        limit_alphabet: keep at most this many distinct characters; rarer ones become [UNK].

    Returns:
        The tokenizer; [PAD], [UNK], [CLS], [SEP], [MASK] have ids 0 to 4.

    Raises:
        ValueError: vocab_size cannot hold the special tokens and the alphabet of the text,
            or the text is empty.
    """
    if not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size!r}: expected an int above {len(SPECIAL_TOKENS)}, the number of special tokens"
        )
    texts = list(texts)
    if not any(text.strip() for text in texts):
        raise ValueError("texts is empty: train_tokenizer needs at least one non-blank text")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix=_PREFIX))
    _set_bert_text_handling(tok, lowercase)
    # `tokenizers` numbers the "##c" pieces in hash-map order and breaks merge ties by id
    # (huggingface/tokenizers#1794), so training is not repeatable. Registering every piece up
    # front, sorted, fixes their ids and with them the merges.
    inner = {
        char
        for text in texts
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text))
        for char in word[1:]
    }
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[*SPECIAL_TOKENS, *(_PREFIX + c for c in sorted(inner))],
        limit_alphabet=limit_alphabet,
        continuing_subword_prefix=_PREFIX,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Registered as special only to fix their ids: as added tokens they would match literal "##c".
    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in SPECIAL_TOKENS]
    tok = Tokenizer.from_str(json.dumps(data))
    if tok.get_vocab_size() > vocab_size:
        # The trainer never drops characters of the alphabet, so it overshoots instead of failing.
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the special tokens and the text's alphabet "
            f"alone need {tok.get_vocab_size()} ids"
        )
    return _set_bert_markers(tok)


def _do_lower_case(folder: Path) -> bool:
    """Read ``do_lower_case`` from a Hugging Face tokenizer_config.json; BERT's default is True."""
    config = folder / "tokenizer_config.json"
    if config.is_file():
        return bool(json.loads(config.read_text(encoding="utf-8")).get("do_lower_case", True))
    return True


def load_tokenizer(path: str | os.PathLike, *, lowercase: bool | None = None) -> Tokenizer:
    """Load a tokenizer saved by ``tokenizers`` or a BERT ``vocab.txt``.

    Truncation and padding stored in a tokenizer.json are cleared: ``encode`` applies them
    per call, and a stored fixed padding would silently pad every sequence.

    Args:
        path: a tokenizer.json file, a vocab.txt file, or a directory holding either
            (tokenizer.json preferred).
        lowercase: for a vocab.txt only: lowercase the text; None reads ``do_lower_case``
            from a tokenizer_config.json beside it, else True.

    Returns:
        The tokenizer.

    Raises:
        FileNotFoundError: neither file is found.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    candidates = [path / "tokenizer.json", path / "vocab.txt"] if path.is_dir() else [path]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        looked_for = " or ".join(str(c) for c in candidates)
        raise FileNotFoundError(f"no tokenizer found: looked for {looked_for}")
    if found.suffix == ".json":
        tok = Tokenizer.from_file(str(found))
        tok.no_truncation()
        tok.no_padding()
        return tok
    vocab = models.WordPiece.read_file(str(found))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix=_PREFIX))
    _set_bert_text_handling(tok, _do_lower_case(folder) if lowercase is None else lowercase)
    return _set_bert_markers(tok)


@contextlib.contextmanager
def _truncating(tok: Tokenizer, max_len: int) -> Iterator[None]:
    """Truncate longest-first to max_len without padding, then restore the caller's settings.

    Restoring is cheaper than copying (a copy of a 30k vocabulary takes ~15 ms), at the cost
    of not sharing one tokenizer between threads that encode at the same time.
    """
    truncation, padding = tok.truncation, tok.padding
    tok.enable_truncation(max_length=max_len, strategy="longest_first")
    tok.no_padding()
    try:
        yield
    finally:
        tok.no_truncation()
        if truncation is not None:
            tok.enable_truncation(**truncation)
        if padding is not None:
            tok.enable_padding(**padding)


def token_lengths(
    tok: Tokenizer, texts: Sequence[str], pairs: Sequence[str] | None = None, *, max_len: int
) -> list[int]:
    """Tokens per text (or text pair), special tokens included, after `encode`'s truncation to max_len."""
    inputs = list(texts) if pairs is None else list(zip(texts, pairs, strict=True))
    with _truncating(tok, max_len):
        return [len(e.ids) for e in tok.encode_batch(inputs)]


def encode(
    tok: Tokenizer,
    texts: Sequence[str],
    pairs: Sequence[str] | None = None,
    *,
    max_len: int,
    pad_to: int | None = None,
) -> dict[str, torch.Tensor]:
    """Encode a batch of texts (or text pairs) into padded int64 tensors.

    Args:
        tok: the tokenizer; its own truncation and padding settings are restored afterwards.
        texts: the texts (segment A).
        pairs: optional second texts (segment B), one per text.
        max_len: truncate each encoding, special tokens included, to this many tokens
            (pairs: longest segment first).
        pad_to: pad to this length (at least max_len); None pads to the batch's longest.

    Returns:
        ``input_ids``, ``attention_mask`` (1 = token, 0 = padding) and ``token_type_ids``,
        each an int64 (B, T) tensor, padded on the right with [PAD] (or <pad>).
    """
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError(f"texts must be a non-empty sequence of str, got {texts!r:.80}")
    if pairs is not None and (isinstance(pairs, str) or len(pairs) != len(texts)):
        raise ValueError(f"pairs must hold one str per text ({len(texts)}), got {pairs!r:.80}")
    n_specials = tok.num_special_tokens_to_add(is_pair=pairs is not None)
    if not isinstance(max_len, int) or max_len <= n_specials:
        raise ValueError(f"max_len={max_len!r}: expected an int above {n_specials}, the special tokens added")
    if pad_to is not None and (not isinstance(pad_to, int) or pad_to < max_len):
        raise ValueError(f"pad_to={pad_to!r}: expected None or an int >= max_len ({max_len})")
    pad = next((tok.token_to_id(t) for t in ("[PAD]", "<pad>") if tok.token_to_id(t) is not None), None)
    if pad is None:  # "<pad>": RoBERTa's, XLM-R's
        raise ValueError("the tokenizer's vocabulary lacks [PAD] (or <pad>), needed to pad the batch")
    inputs = list(texts) if pairs is None else list(zip(texts, pairs, strict=True))
    with _truncating(tok, max_len):
        encodings = tok.encode_batch(inputs)
    width = pad_to if pad_to is not None else max(len(e.ids) for e in encodings)
    batch = {
        key: torch.full((len(encodings), width), fill, dtype=torch.int64)
        for key, fill in (("input_ids", pad), ("attention_mask", 0), ("token_type_ids", 0))
    }
    for row, e in enumerate(encodings):
        n = len(e.ids)
        batch["input_ids"][row, :n] = torch.tensor(e.ids)
        batch["attention_mask"][row, :n] = 1
        batch["token_type_ids"][row, :n] = torch.tensor(e.type_ids)
    return batch

"""The Marian family (MarianMT): BART's post-LN layers with fixed sinusoidal positions, no embedding LayerNorm."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from model.config import Config
from model.hf.bart import DEFAULTS as BART_DEFAULTS
from model.hf.bart import STACK_MODULES, seq2seq_config, word_table
from model.hf.common import Family

# MarianConfig's defaults where they differ from BartConfig's.
DEFAULTS = {**BART_DEFAULTS, "vocab_size": 58101, "pad_token_id": 58100}


def config_from_hf(
    hf: dict[str, Any], architecture: str, *, heads: tuple[str, ...] | None = None, n_labels: int = 0
) -> Config:
    """A MarianConfig dict as a flashlite Config (see model.hf.config_from_hf).

    The sinusoid tables (embed_positions) are recomputed by flashlite, not read. A decoder with its
    own vocabulary (decoder_vocab_size) is refused: flashlite's decoder reads the encoder's words.
    """
    vocab = hf.get("vocab_size", DEFAULTS["vocab_size"])
    if hf.get("decoder_vocab_size") not in (None, vocab):
        raise ValueError(
            f"decoder_vocab_size ({hf['decoder_vocab_size']}) differs from vocab_size ({vocab}); "
            "flashlite's decoder shares the encoder's word table"
        )
    if hf.get("d_model", DEFAULTS["d_model"]) % 2:
        raise ValueError(f"d_model must be even for Marian's sin/cos position halves, got {hf['d_model']}")
    return seq2seq_config(
        hf,
        architecture,
        heads,
        n_labels,
        family=FAMILY,
        defaults=DEFAULTS,
        norm="post",
        positions="sinusoidal",
        embed_norm=False,
    )


def _prepare(state: dict[str, Tensor], hf: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Marian's tensors as flashlite reads them: one word table, the fixed sinusoid tables dropped."""
    state = word_table(state, hf.get("tie_word_embeddings", True) is not False)
    for stack in ("encoder", "decoder"):
        state.pop(f"{stack}.embed_positions.weight", None)
    return state, hf


FAMILY = Family(
    model_types=("marian",),
    architectures={"MarianModel": (), "MarianMTModel": ("lm",)},
    prefix="model.",
    modules=STACK_MODULES,
    tensors={"final_logits_bias": "heads.lm.bias"},
    ignored=frozenset(),
    tied=None,
    config=config_from_hf,
    prepare=_prepare,
)

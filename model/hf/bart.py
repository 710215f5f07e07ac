"""The BART family (BART, mBART): post- or pre-LN encoder-decoders with learned positions offset by 2 and an LM head."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from model.config import Config, LayerShape
from model.hf.common import Family, activation, check_positive, task_heads, with_defaults

# BartConfig's defaults (MBartConfig's differ only in vocab_size): config.json may omit a key at its default.
DEFAULTS = dict(
    vocab_size=50265,
    d_model=1024,
    encoder_layers=12,
    decoder_layers=12,
    encoder_attention_heads=16,
    decoder_attention_heads=16,
    encoder_ffn_dim=4096,
    decoder_ffn_dim=4096,
    activation_function="gelu",
    dropout=0.1,
    attention_dropout=0.0,
    max_position_embeddings=1024,
    pad_token_id=1,
    scale_embedding=False,
    tie_word_embeddings=True,
)
_TYPES = {
    "vocab_size": int,
    "d_model": int,
    "encoder_layers": int,
    "decoder_layers": int,
    "encoder_attention_heads": int,
    "decoder_attention_heads": int,
    "encoder_ffn_dim": int,
    "decoder_ffn_dim": int,
    "max_position_embeddings": int,
    "pad_token_id": int,
    "activation_function": str,
    "dropout": float,
    "attention_dropout": float,
    "scale_embedding": bool,
    "tie_word_embeddings": bool,
}
_SIZES = tuple(k for k, kind in _TYPES.items() if kind is int and k != "pad_token_id")
_OFFSET = 2  # BartLearnedPositionalEmbedding reads row position + 2; rows 0 and 1 are never used
_LAYER = {
    "self_attn.q_proj": "self_attn.q_proj",
    "self_attn.k_proj": "self_attn.k_proj",
    "self_attn.v_proj": "self_attn.v_proj",
    "self_attn.out_proj": "self_attn.out_proj",
    "self_attn_layer_norm": "attn_norm",
    "fc1": "ffn.up",
    "fc2": "ffn.down",
    "final_layer_norm": "ffn_norm",
}
_CROSS = {
    "encoder_attn.q_proj": "cross_attn.q_proj",
    "encoder_attn.k_proj": "cross_attn.k_proj",
    "encoder_attn.v_proj": "cross_attn.v_proj",
    "encoder_attn.out_proj": "cross_attn.out_proj",
    "encoder_attn_layer_norm": "cross_norm",
}
# The stacks, named alike in BART, mBART and Marian: HF module -> flashlite module.
STACK_MODULES = {
    **{f"encoder.layers.{{i}}.{hf}": f"encoder.blocks.{{i}}.{ours}" for hf, ours in _LAYER.items()},
    **{f"decoder.layers.{{i}}.{hf}": f"decoder.blocks.{{i}}.{ours}" for hf, ours in {**_LAYER, **_CROSS}.items()},
    "shared": "embeddings.word",
    "lm_head": "heads.lm.out",
}


def seq2seq_config(
    hf: dict[str, Any],
    architecture: str,
    heads: tuple[str, ...] | None,
    n_labels: int,
    *,
    family: Family,
    defaults: dict[str, Any],
    **facts: Any,
) -> Config:
    """A BartConfig-style dict (BART, mBART, Marian) as a flashlite Config.

    Args:
        hf, architecture, heads, n_labels: as `config_from_hf`.
        family, defaults: the family whose heads the architecture names, and its config class defaults.
        facts: the Config fields the family fixes (norm, positions, embed_norm, decoder_embeddings).
    """
    hf = with_defaults(hf, defaults, _TYPES)
    check_positive(hf, _SIZES)
    dim = hf["d_model"]
    stacks = {}
    for stack in ("encoder", "decoder"):
        n_heads = hf[f"{stack}_attention_heads"]
        if dim % n_heads:
            raise ValueError(f"d_model ({dim}) must be divisible by {stack}_attention_heads ({n_heads})")
        shape = LayerShape(n_heads=n_heads, head_dim=dim // n_heads, ffn_dim=hf[f"{stack}_ffn_dim"])
        stacks[stack] = (shape,) * hf[f"{stack}_layers"]
    heads, n_labels = task_heads(hf, family, architecture, heads, n_labels)
    return Config(
        vocab_size=hf["vocab_size"],
        dim=dim,
        **stacks,
        activation=activation(hf, "activation_function"),
        max_positions=hf["max_position_embeddings"],
        type_vocab_size=0,
        pad_id=hf["pad_token_id"],
        dropout=hf["dropout"],
        attention_dropout=hf["attention_dropout"],
        heads=heads,
        n_labels=n_labels,
        embed_scale=math.sqrt(dim) if hf["scale_embedding"] else 1.0,
        lm_head_tied=hf["tie_word_embeddings"] or "lm" not in heads,
        **generation_ids(hf),
        **facts,
    )


def generation_ids(hf: dict[str, Any]) -> dict[str, int | None]:
    """Config.eos_id and decoder_start_id from config.json, as transformers' generate reads them.

    The start token falls back to bos_token_id (mBART); a list of end tokens is left to the caller.
    """
    start = hf.get("decoder_start_token_id")
    start = hf.get("bos_token_id") if start is None else start
    eos = hf.get("eos_token_id")
    return dict(
        eos_id=eos if isinstance(eos, int) and not isinstance(eos, bool) else None,
        decoder_start_id=start if isinstance(start, int) and not isinstance(start, bool) else None,
    )


def config_from_hf(
    hf: dict[str, Any], architecture: str, *, heads: tuple[str, ...] | None = None, n_labels: int = 0
) -> Config:
    """A BartConfig / MBartConfig dict as a flashlite Config (see model.hf.config_from_hf).

    mBART is BART with pre-LN and a final LayerNorm per stack. The sequence classifier (dense +
    tanh + out_proj) is the pooler + classify head on the decoder at the last eos token
    (Config.classify_pooling "eos"). Old config.json keys that
    transformers no longer reads (normalize_before, add_final_layer_norm, ...) are ignored as it does.
    """
    norm = "pre" if hf.get("model_type") == "mbart" else "post"
    config = seq2seq_config(
        hf,
        architecture,
        heads,
        n_labels,
        family=FAMILY,
        defaults=DEFAULTS,
        norm=norm,
        decoder_embeddings="own_positions",
    )
    return config.replace(classify_pooling="eos") if "classify" in config.heads else config


def check_copy(state: dict[str, Tensor], name: str, words: Tensor, why: str) -> None:
    """Drop `name` from state when it holds the word table again; refuse it when it differs."""
    copy = state.pop(name, None)
    if copy is not None and not torch.equal(copy.to(words), words):
        raise ValueError(f"{name} differs from the word table (model.shared.weight); {why}")


def word_table(state: dict[str, Tensor], tied: bool) -> dict[str, Tensor]:
    """The tensors without the "model." prefix, the word table once as shared.weight, its checked copies dropped.

    The encoder's embed_tokens is the table the encoder reads (transformers 5 unties it from
    `shared` when tie_word_embeddings is false); the decoder must read the same one, and a `tied`
    lm_head too.
    """
    state = {name.removeprefix("model."): t for name, t in state.items()}
    shared = state.pop("shared.weight", None)
    words = state.pop("encoder.embed_tokens.weight", shared)
    if words is None:
        raise ValueError("the checkpoint has no word table (model.shared.weight or model.encoder.embed_tokens.weight)")
    state["shared.weight"] = words
    check_copy(state, "decoder.embed_tokens.weight", words, "flashlite's decoder reads the encoder's word table")
    if tied:
        check_copy(state, "lm_head.weight", words, "config.json ties it (tie_word_embeddings is true)")
    if "final_logits_bias" in state:
        state["final_logits_bias"] = state["final_logits_bias"].reshape(-1)  # (1, vocab) buffer -> the head's bias
    return state


def _prepare(state: dict[str, Tensor], hf: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """BART's tensors as flashlite reads them: one word table, position tables without their 2 unused rows."""
    state = word_table(state, hf.get("tie_word_embeddings", True) is not False)
    for stack in ("encoder", "decoder"):
        name = f"{stack}.embed_positions.weight"
        if name in state:
            state[name] = state[name][_OFFSET:]
    return state, hf


FAMILY = Family(
    model_types=("bart", "mbart"),
    architectures={
        "BartModel": (),
        "BartForConditionalGeneration": ("lm",),
        "BartForSequenceClassification": ("classify",),
        "MBartModel": (),
        "MBartForConditionalGeneration": ("lm",),
    },
    prefix="model.",
    modules={
        **STACK_MODULES,
        "encoder.embed_positions": "embeddings.position",
        "encoder.layernorm_embedding": "embeddings.norm",
        "decoder.embed_positions": "decoder_embeddings.position",
        "decoder.layernorm_embedding": "decoder_embeddings.norm",
        "encoder.layer_norm": "encoder.final_norm",
        "decoder.layer_norm": "decoder.final_norm",
        "classification_head.dense": "pooler.dense",
        "classification_head.out_proj": "heads.classify",
    },
    tensors={"final_logits_bias": "heads.lm.bias"},
    ignored=frozenset(),
    tied=None,
    config=config_from_hf,
    prepare=_prepare,
)

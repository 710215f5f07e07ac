"""The BERT family: BertConfig translated into a Config, and BERT's tensor names mapped onto flashlite's."""

from __future__ import annotations

from typing import Any

from model.config import Config, LayerShape
from model.hf.common import Family, activation, check_positive, task_heads, with_defaults

# BertConfig's defaults: config.json files may omit a key whose value is the default.
DEFAULTS = dict(
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    max_position_embeddings=512,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    pad_token_id=0,
    position_embedding_type="absolute",
)
# The type of every key we read; a config.json that disagrees is refused naming the key.
_TYPES = {
    "vocab_size": int,
    "hidden_size": int,
    "num_hidden_layers": int,
    "num_attention_heads": int,
    "intermediate_size": int,
    "max_position_embeddings": int,
    "type_vocab_size": int,
    "pad_token_id": int,
    "hidden_act": str,
    "position_embedding_type": str,
    "hidden_dropout_prob": float,
    "attention_probs_dropout_prob": float,
    "layer_norm_eps": float,
}
_SIZES = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
)
# The embeddings, encoder layers and pooler, named alike in BERT and RoBERTa: HF module -> flashlite module.
ENCODER_MODULES = {
    "embeddings.word_embeddings": "embeddings.word",
    "embeddings.position_embeddings": "embeddings.position",
    "embeddings.token_type_embeddings": "embeddings.token_type",
    "embeddings.LayerNorm": "embeddings.norm",
    "encoder.layer.{i}.attention.self.query": "encoder.blocks.{i}.self_attn.q_proj",
    "encoder.layer.{i}.attention.self.key": "encoder.blocks.{i}.self_attn.k_proj",
    "encoder.layer.{i}.attention.self.value": "encoder.blocks.{i}.self_attn.v_proj",
    "encoder.layer.{i}.attention.output.dense": "encoder.blocks.{i}.self_attn.out_proj",
    "encoder.layer.{i}.attention.output.LayerNorm": "encoder.blocks.{i}.attn_norm",
    "encoder.layer.{i}.intermediate.dense": "encoder.blocks.{i}.ffn.up",
    "encoder.layer.{i}.output.dense": "encoder.blocks.{i}.ffn.down",
    "encoder.layer.{i}.output.LayerNorm": "encoder.blocks.{i}.ffn_norm",
    "pooler.dense": "pooler.dense",
}


def encoder_config(
    hf: dict[str, Any],
    architecture: str,
    heads: tuple[str, ...] | None,
    n_labels: int,
    *,
    family: Family,
    defaults: dict[str, Any],
    positions: str = "absolute",
) -> Config:
    """A BertConfig-style dict (BERT, RoBERTa, XLM-R) as a flashlite Config.

    Args:
        hf, architecture, heads, n_labels: as `config_from_hf`.
        family, defaults: the family whose heads the architecture names, and its config class defaults.
        positions: Config.positions; with "padding_offset" the table's first pad_id + 1 rows are not
            sequence positions, so max_positions is max_position_embeddings - pad_token_id - 1.
    """
    hf = with_defaults(hf, defaults, _TYPES)
    check_positive(hf, _SIZES)
    if hf["position_embedding_type"] != "absolute":
        raise ValueError(f"position_embedding_type is {hf['position_embedding_type']!r}; only 'absolute' is supported")
    for flag in ("is_decoder", "add_cross_attention"):
        if hf.get(flag):
            raise ValueError(f"{flag} is true; from_hf imports encoders only, not causal or cross-attention models")
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    if dim % n_heads:
        raise ValueError(f"hidden_size ({dim}) must be divisible by num_attention_heads ({n_heads})")
    max_positions = hf["max_position_embeddings"]
    if positions == "padding_offset":
        max_positions -= hf["pad_token_id"] + 1
        if max_positions < 1:
            raise ValueError(
                f"max_position_embeddings ({hf['max_position_embeddings']}) must exceed pad_token_id + 1 "
                f"({hf['pad_token_id'] + 1}): positions start after the padding index"
            )
    heads, n_labels = task_heads(hf, family, architecture, heads, n_labels)
    shape = LayerShape(n_heads=n_heads, head_dim=dim // n_heads, ffn_dim=hf["intermediate_size"])
    return Config(
        vocab_size=hf["vocab_size"],
        dim=dim,
        encoder=(shape,) * hf["num_hidden_layers"],
        norm="post",
        activation=activation(hf, "hidden_act"),
        max_positions=max_positions,
        type_vocab_size=hf["type_vocab_size"],
        pad_id=hf["pad_token_id"],
        dropout=hf["hidden_dropout_prob"],
        attention_dropout=hf["attention_probs_dropout_prob"],
        norm_eps=hf["layer_norm_eps"],
        heads=heads,
        n_labels=n_labels,
        positions=positions,
    )


def config_from_hf(
    hf: dict[str, Any], architecture: str, *, heads: tuple[str, ...] | None = None, n_labels: int = 0
) -> Config:
    """A BertConfig dict as a flashlite Config (see model.hf.config_from_hf)."""
    return encoder_config(hf, architecture, heads, n_labels, family=FAMILY, defaults=DEFAULTS)


FAMILY = Family(
    model_types=("bert",),
    architectures={
        "BertModel": (),
        "BertForSequenceClassification": ("classify",),
        "BertForMaskedLM": ("mlm",),
        "BertForPreTraining": ("mlm", "pair"),
        "BertForQuestionAnswering": ("qa",),
    },
    prefix="bert.",
    modules={
        **ENCODER_MODULES,
        "classifier": "heads.classify",
        "cls.predictions.transform.dense": "heads.mlm.transform",
        "cls.predictions.transform.LayerNorm": "heads.mlm.norm",
        "cls.seq_relationship": "heads.pair",
        "qa_outputs": "heads.qa",
    },
    # The MLM output bias is stored under either name.
    tensors={"cls.predictions.bias": "heads.mlm.bias", "cls.predictions.decoder.bias": "heads.mlm.bias"},
    ignored=frozenset({"embeddings.position_ids", "embeddings.token_type_ids", "cls.predictions.decoder.weight"}),
    tied="cls.predictions.decoder.weight",
    config=config_from_hf,
)

"""The DistilBERT family: DistilBertConfig translated into a Config, and DistilBERT's own tensor names mapped onto flashlite's."""

from __future__ import annotations

from typing import Any

from model.config import Config, LayerShape
from model.hf.common import Family, activation, check_positive, task_heads, with_defaults

# DistilBertConfig's defaults: config.json files may omit a key whose value is the default.
DEFAULTS = dict(
    vocab_size=30522,
    max_position_embeddings=512,
    sinusoidal_pos_embds=False,
    n_layers=6,
    n_heads=12,
    dim=768,
    hidden_dim=3072,
    dropout=0.1,
    attention_dropout=0.1,
    activation="gelu",
    pad_token_id=0,
)
_TYPES = {
    "vocab_size": int,
    "max_position_embeddings": int,
    "sinusoidal_pos_embds": bool,
    "n_layers": int,
    "n_heads": int,
    "dim": int,
    "hidden_dim": int,
    "dropout": float,
    "attention_dropout": float,
    "activation": str,
    "pad_token_id": int,
}
_NORM_EPS = 1e-12  # fixed in DistilBERT's code, not a config key


def config_from_hf(
    hf: dict[str, Any], architecture: str, *, heads: tuple[str, ...] | None = None, n_labels: int = 0
) -> Config:
    """A DistilBertConfig dict as a flashlite Config (see model.hf.config_from_hf).

    DistilBERT has no token types; its classifier is a pre-classifier with ReLU on [CLS], which is
    flashlite's pooler with pooler_activation "relu". Sinusoidal position tables are stored in the
    checkpoint, so they import as learned ones.
    """
    hf = with_defaults(hf, DEFAULTS, _TYPES)
    check_positive(hf, ("vocab_size", "max_position_embeddings", "n_layers", "n_heads", "dim", "hidden_dim"))
    dim, n_heads = hf["dim"], hf["n_heads"]
    if dim % n_heads:
        raise ValueError(f"dim ({dim}) must be divisible by n_heads ({n_heads})")
    heads, n_labels = task_heads(hf, FAMILY, architecture, heads, n_labels)
    shape = LayerShape(n_heads=n_heads, head_dim=dim // n_heads, ffn_dim=hf["hidden_dim"])
    return Config(
        vocab_size=hf["vocab_size"],
        dim=dim,
        encoder=(shape,) * hf["n_layers"],
        norm="post",
        activation=activation(hf, "activation"),
        max_positions=hf["max_position_embeddings"],
        type_vocab_size=0,
        pad_id=hf["pad_token_id"],
        dropout=hf["dropout"],
        attention_dropout=hf["attention_dropout"],
        norm_eps=_NORM_EPS,
        heads=heads,
        n_labels=n_labels,
        pooler_activation="relu",
    )


_LAYER = "transformer.layer.{i}"
_BLOCK = "encoder.blocks.{i}"
FAMILY = Family(
    model_types=("distilbert",),
    architectures={
        "DistilBertModel": (),
        "DistilBertForSequenceClassification": ("classify",),
        "DistilBertForMaskedLM": ("mlm",),
        "DistilBertForQuestionAnswering": ("qa",),
    },
    prefix="distilbert.",
    modules={
        "embeddings.word_embeddings": "embeddings.word",
        "embeddings.position_embeddings": "embeddings.position",
        "embeddings.LayerNorm": "embeddings.norm",
        f"{_LAYER}.attention.q_lin": f"{_BLOCK}.self_attn.q_proj",
        f"{_LAYER}.attention.k_lin": f"{_BLOCK}.self_attn.k_proj",
        f"{_LAYER}.attention.v_lin": f"{_BLOCK}.self_attn.v_proj",
        f"{_LAYER}.attention.out_lin": f"{_BLOCK}.self_attn.out_proj",
        f"{_LAYER}.sa_layer_norm": f"{_BLOCK}.attn_norm",
        f"{_LAYER}.ffn.lin1": f"{_BLOCK}.ffn.up",
        f"{_LAYER}.ffn.lin2": f"{_BLOCK}.ffn.down",
        f"{_LAYER}.output_layer_norm": f"{_BLOCK}.ffn_norm",
        "pre_classifier": "pooler.dense",
        "classifier": "heads.classify",
        "vocab_transform": "heads.mlm.transform",
        "vocab_layer_norm": "heads.mlm.norm",
        "qa_outputs": "heads.qa",
    },
    tensors={"vocab_projector.bias": "heads.mlm.bias"},
    ignored=frozenset({"embeddings.position_ids", "vocab_projector.weight"}),
    tied="vocab_projector.weight",
    config=config_from_hf,
)

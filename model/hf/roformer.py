"""The RoFormer family: BERT's layers with rotary positions instead of a position table."""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from model.config import Config
from model.hf.bert import DEFAULTS as BERT_DEFAULTS
from model.hf.bert import ENCODER_MODULES, encoder_config
from model.hf.common import Family

# RoFormerConfig's defaults where they differ from BertConfig's.
DEFAULTS = {**BERT_DEFAULTS, "vocab_size": 50000, "max_position_embeddings": 1536}
_QK = re.compile(r"encoder\.blocks\.(\d+)\.self_attn\.[qk]_proj\.(weight|bias)")


def config_from_hf(
    hf: dict[str, Any], architecture: str, *, heads: tuple[str, ...] | None = None, n_labels: int = 0
) -> Config:
    """A RoFormerConfig dict as a flashlite Config (see model.hf.config_from_hf).

    The classifier's dense layer + hidden_act on [CLS] is the pooler with that activation. The
    sinusoid table (encoder.embed_positions) is recomputed by flashlite, not read.
    """
    embedding_size = hf.get("embedding_size")
    if embedding_size is not None and embedding_size != hf.get("hidden_size", BERT_DEFAULTS["hidden_size"]):
        raise ValueError(
            f"embedding_size ({embedding_size}) differs from hidden_size; RoFormer's embeddings_project "
            "(a Linear with bias after the embedding LayerNorm) has no flashlite counterpart"
        )
    if hf.get("rotary_value"):
        raise ValueError("rotary_value is true; flashlite rotates queries and keys only")
    config = encoder_config(hf, architecture, heads, n_labels, family=FAMILY, defaults=DEFAULTS, positions="rotary")
    return config.replace(pooler_activation=config.activation)


def _half_split(name: str, tensor: Tensor, config: Config) -> Tensor:
    """Query/key rows reordered per head from RoFormer's interleaved pairs (2i, 2i+1) to flashlite's (i, i + D/2).

    Queries and keys move alike, so every attention score, and hence the output, is unchanged.
    """
    match = _QK.fullmatch(name)
    if match is None:
        return tensor
    d = config.encoder[int(match.group(1))].head_dim
    return tensor.reshape(-1, d // 2, 2, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)


FAMILY = Family(
    model_types=("roformer",),
    architectures={
        "RoFormerModel": (),
        "RoFormerForSequenceClassification": ("classify",),
        "RoFormerForMaskedLM": ("mlm",),
        "RoFormerForQuestionAnswering": ("qa",),
    },
    prefix="roformer.",
    modules={
        **{hf: ours for hf, ours in ENCODER_MODULES.items() if hf != "embeddings.position_embeddings"},
        "classifier.dense": "pooler.dense",
        "classifier.out_proj": "heads.classify",
        "cls.predictions.transform.dense": "heads.mlm.transform",
        "cls.predictions.transform.LayerNorm": "heads.mlm.norm",
        "qa_outputs": "heads.qa",
    },
    tensors={"cls.predictions.bias": "heads.mlm.bias", "cls.predictions.decoder.bias": "heads.mlm.bias"},
    ignored=frozenset({"encoder.embed_positions.weight", "cls.predictions.decoder.weight"}),
    tied="cls.predictions.decoder.weight",
    config=config_from_hf,
    convert=_half_split,
)

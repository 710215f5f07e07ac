"""The RoBERTa family (RoBERTa, XLM-RoBERTa): BERT's layers with positions offset by the padding index and own heads."""

from __future__ import annotations

from typing import Any

from model.config import Config
from model.hf.bert import DEFAULTS as BERT_DEFAULTS
from model.hf.bert import ENCODER_MODULES, encoder_config
from model.hf.common import Family

# RobertaConfig's (and XLMRobertaConfig's) defaults: BERT's, but for the vocabulary and the padding index.
DEFAULTS = {**BERT_DEFAULTS, "vocab_size": 50265, "pad_token_id": 1}
# Class name suffixes (after "Roberta" or "XLMRoberta") -> flashlite heads.
_HEADS = {
    "Model": (),
    "ForSequenceClassification": ("classify",),
    "ForMaskedLM": ("mlm",),
    "ForQuestionAnswering": ("qa",),
}


def config_from_hf(
    hf: dict[str, Any], architecture: str, *, heads: tuple[str, ...] | None = None, n_labels: int = 0
) -> Config:
    """A RobertaConfig / XLMRobertaConfig dict as a flashlite Config (see model.hf.config_from_hf)."""
    config = encoder_config(
        hf, architecture, heads, n_labels, family=FAMILY, defaults=DEFAULTS, positions="padding_offset"
    )
    if "mlm" in config.heads and config.activation != "gelu":
        raise ValueError(
            f"hidden_act is {hf.get('hidden_act')!r}; RoBERTa's MLM head always applies exact gelu, "
            "which flashlite's MLM head reproduces only for hidden_act 'gelu'"
        )
    return config


FAMILY = Family(
    model_types=("roberta", "xlm-roberta"),
    architectures={f"{base}{kind}": heads for base in ("Roberta", "XLMRoberta") for kind, heads in _HEADS.items()},
    prefix="roberta.",
    modules={
        **ENCODER_MODULES,
        # The classification head (dense + tanh + out_proj on <s>) is BERT's pooler + classifier in eval mode.
        "classifier.dense": "pooler.dense",
        "classifier.out_proj": "heads.classify",
        "lm_head.dense": "heads.mlm.transform",
        "lm_head.layer_norm": "heads.mlm.norm",
        "qa_outputs": "heads.qa",
    },
    tensors={"lm_head.bias": "heads.mlm.bias", "lm_head.decoder.bias": "heads.mlm.bias"},
    ignored=frozenset({"embeddings.position_ids", "embeddings.token_type_ids", "lm_head.decoder.weight"}),
    tied="lm_head.decoder.weight",
    config=config_from_hf,
)

"""The files transformers, Optimum and sentence-transformers read beside the graphs: config.json, tokenizer and pooling files.

Torch-free. `hf_config` maps flashlite's Config to the source family's config.json through
`FAMILIES`, one small function per Hugging Face model_type: add a family there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from model.config import Config
from model.onnx.card import model_card
from model.onnx.layout import FLASHLITE_CONFIG

# Token roles transformers' tokenizer_config.json names, and the spellings the supported vocabularies use.
_ROLES = {
    "unk_token": ("[UNK]", "<unk>"),
    "sep_token": ("[SEP]", "</s>"),
    "pad_token": ("[PAD]", "<pad>"),
    "cls_token": ("[CLS]", "<s>"),
    "mask_token": ("[MASK]", "<mask>"),
}
_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}


def _bert(config: Config) -> dict[str, Any]:
    """BertConfig keys. Per-layer shapes (pruned heads/FFN) are in flashlite_config.json; these are layer 0's."""
    first = config.encoder[0]
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "num_hidden_layers": len(config.encoder),
        "num_attention_heads": first.n_heads,
        "intermediate_size": first.ffn_dim,
        "hidden_act": _ACTIVATIONS[config.activation],
        "max_position_embeddings": config.max_positions,
        "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": config.norm_eps,
        "pad_token_id": config.pad_id,
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.attention_dropout,
        "position_embedding_type": "absolute",
    }


def _roberta(config: Config) -> dict[str, Any]:
    """RobertaConfig: BERT's keys; its position table has pad_id + 1 rows before the first position."""
    return {**_bert(config), "max_position_embeddings": config.max_positions + config.pad_id + 1}


def _roformer(config: Config) -> dict[str, Any]:
    """RoFormerConfig: BERT's keys without a position table type; rotary queries and keys only (rotary_value off)."""
    data = {k: v for k, v in _bert(config).items() if k != "position_embedding_type"}
    return {**data, "embedding_size": config.dim, "rotary_value": False}


def _distilbert(config: Config) -> dict[str, Any]:
    """DistilBertConfig's own key names (no token types)."""
    first = config.encoder[0]
    return {
        "vocab_size": config.vocab_size,
        "dim": config.dim,
        "n_layers": len(config.encoder),
        "n_heads": first.n_heads,
        "hidden_dim": first.ffn_dim,
        "activation": _ACTIVATIONS[config.activation],
        "max_position_embeddings": config.max_positions,
        "pad_token_id": config.pad_id,
        "dropout": config.dropout,
        "attention_dropout": config.attention_dropout,
    }


def _bart(config: Config) -> dict[str, Any]:
    """BartConfig keys (MBartConfig and MarianConfig share them); layer 0's shapes, as for BERT."""
    enc, dec = config.encoder[0], config.decoder[0]
    return {
        "vocab_size": config.vocab_size,
        "d_model": config.dim,
        "encoder_layers": len(config.encoder),
        "decoder_layers": len(config.decoder),
        "encoder_attention_heads": enc.n_heads,
        "decoder_attention_heads": dec.n_heads,
        "encoder_ffn_dim": enc.ffn_dim,
        "decoder_ffn_dim": dec.ffn_dim,
        "activation_function": _ACTIVATIONS[config.activation],
        "max_position_embeddings": config.max_positions,
        "scale_embedding": config.embed_scale != 1.0,
        "dropout": config.dropout,
        "attention_dropout": config.attention_dropout,
        "tie_word_embeddings": config.lm_head_tied,
        "is_encoder_decoder": True,
        **_generation_ids(config),
    }


def _marian(config: Config) -> dict[str, Any]:
    """MarianConfig: BART's keys, one vocabulary for both sides."""
    return {**_bart(config), "decoder_vocab_size": config.vocab_size, "share_encoder_decoder_embeddings": True}


def _t5(config: Config) -> dict[str, Any]:
    """T5Config keys: sizes, relative buckets, the FFN kind (`feed_forward_proj`: relu, gated-gelu, ...)."""
    enc = config.encoder[0]
    act = "gelu" if config.ffn_gated and config.activation == "gelu_tanh" else _ACTIVATIONS[config.activation]
    return {
        "vocab_size": config.vocab_size,
        "d_model": config.dim,
        "d_kv": enc.head_dim,
        "d_ff": enc.ffn_dim,
        "num_layers": len(config.encoder),
        "num_decoder_layers": len(config.decoder),
        "num_heads": enc.n_heads,
        "relative_attention_num_buckets": config.relative_buckets,
        "relative_attention_max_distance": config.relative_max_distance,
        "feed_forward_proj": ("gated-" if config.ffn_gated else "") + act,
        "layer_norm_epsilon": config.norm_eps,
        "dropout_rate": config.dropout,
        "tie_word_embeddings": config.lm_head_tied,
        "is_encoder_decoder": True,
        **_generation_ids(config),
    }


def _generation_ids(config: Config) -> dict[str, int]:
    """pad, eos and decoder start ids, where the Config knows them."""
    ids = {
        "pad_token_id": config.pad_id,
        "eos_token_id": config.eos_id,
        "decoder_start_token_id": config.decoder_start_id,
    }
    return {k: v for k, v in ids.items() if v is not None}


FAMILIES: dict[str, Callable[[Config], dict[str, Any]]] = {
    "bert": _bert,
    "roberta": _roberta,
    "distilbert": _distilbert,
    "roformer": _roformer,
    "bart": _bart,
    "mbart": _bart,
    "marian": _marian,
    "t5": _t5,
}
_CLASS_PREFIX = {
    "bert": "Bert",
    "roberta": "Roberta",
    "distilbert": "DistilBert",
    "roformer": "RoFormer",
    "bart": "Bart",
    "mbart": "MBart",
    "marian": "Marian",
    "t5": "T5",
}
# The transformers class of each flashlite head, for config.json's `architectures` (None: the base model).
_ARCHITECTURES = {"classify": "ForSequenceClassification", "qa": "ForQuestionAnswering", "mlm": "ForMaskedLM"}


def family_of(config: Config) -> str:
    """The Hugging Face model_type a Config comes from, by the traits each family imports with.

    Encoder-decoders: relative positions say t5 (mt5 too: give model_type to say so), sinusoidal
    ones marian, a decoder position table of its own bart (mbart when pre-LN), anything else
    (flashlite's own encoder-decoders) bart. Encoders: rotary positions say roformer, positions
    offset by the padding index roberta (xlm-roberta too), DistilBERT's ReLU pre-classifier or no
    token types distilbert, anything else (flashlite's own models too) bert.

    Args:
        config: the model's Config.
    """
    if config.decoder:
        if config.positions == "relative":
            return "t5"
        if config.positions == "sinusoidal":
            return "marian"
        return "mbart" if config.decoder_embeddings == "own_positions" and config.norm == "pre" else "bart"
    if config.positions == "rotary":
        return "roformer"
    if config.positions == "padding_offset":
        return "roberta"
    if config.pooler_activation == "relu" or config.type_vocab_size == 0:
        return "distilbert"
    return "bert"


def hf_config(config: Config, model_type: str | None = None, labels: Sequence[str] | None = None) -> dict[str, Any]:
    """config.json for the export, as transformers' AutoConfig and Optimum's ORTModel classes read it.

    Args:
        config: the model's Config.
        model_type: a key of FAMILIES; None infers it (`family_of`).
        labels: class names for a classify head (default LABEL_0..); give id2label/label2id.
    """
    model_type = model_type or family_of(config)
    if model_type not in FAMILIES:
        raise ValueError(f"model_type must be one of {', '.join(FAMILIES)}, got {model_type!r}")
    head = next((h for h in config.heads if h in _ARCHITECTURES), None)
    suffix = _ARCHITECTURES[head] if head else "Model"
    if config.decoder and "lm" in config.heads:  # what an encoder-decoder's decoder graphs serve
        suffix = "MTModel" if model_type == "marian" else "ForConditionalGeneration"
    data = {"architectures": [_CLASS_PREFIX[model_type] + suffix], "model_type": model_type}
    data |= FAMILIES[model_type](config)
    if "classify" in config.heads:
        names = list(labels) if labels is not None else [f"LABEL_{i}" for i in range(config.n_labels)]
        if len(names) != config.n_labels:
            raise ValueError(f"labels names {len(names)} classes but the classify head has {config.n_labels}")
        data["num_labels"] = config.n_labels
        data["id2label"] = {str(i): name for i, name in enumerate(names)}
        data["label2id"] = {name: i for i, name in enumerate(names)}
        if config.n_labels == 1:
            data["problem_type"] = "regression"
    return data


def tokenizer_files(tokenizer: Tokenizer, max_length: int, token_types: bool) -> dict[str, str]:
    """tokenizer.json (truncating to `max_length`, padding to the batch's longest), tokenizer_config.json, special_tokens_map.json.

    Args:
        tokenizer: the model's tokenizers.Tokenizer (not modified).
        max_length: the longest input the graph takes (its max_positions).
        token_types: whether the graph reads token_type_ids (transformers then returns them).
    """
    specials = {}
    for role, spellings in _ROLES.items():
        token = next((t for t in spellings if tokenizer.token_to_id(t) is not None), None)
        if token is not None:
            specials[role] = token
    deployed = Tokenizer.from_str(tokenizer.to_str())
    deployed.enable_truncation(max_length)
    if "pad_token" in specials:
        pad = specials["pad_token"]
        deployed.enable_padding(pad_id=tokenizer.token_to_id(pad), pad_token=pad)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "padding_side": "right",
        "truncation_side": "right",
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", *(["token_type_ids"] if token_types else []), "attention_mask"],
        **specials,
    }
    return {
        "tokenizer.json": deployed.to_str(),
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(specials, indent=2),
    }


def sentence_files(config: Config, max_seq_length: int) -> dict[str, str]:
    """The sentence-transformers layout: modules.json (Transformer, mean Pooling, Normalize) and their configs.

    Args:
        config: the model's Config (its width is the embedding's).
        max_seq_length: sentence-transformers' truncation length.
    """
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    pooling = {
        "word_embedding_dimension": config.dim,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    return {
        "modules.json": json.dumps(modules, indent=2),
        "1_Pooling/config.json": json.dumps(pooling, indent=2),
        "sentence_bert_config.json": json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2),
    }


def write_side_files(
    staging: Path,
    model: Any,
    *,
    graph: str,
    outputs: Sequence[str],
    variants: Mapping[str, str],
    stages: Sequence[Mapping[str, Any]] | None,
    parity: Mapping[str, float],
    sentence: bool,
    labels: Sequence[str] | None,
    model_type: str | None,
) -> dict[str, Any]:
    """Write config.json, flashlite_config.json, the tokenizer files, the sentence-transformers files and README.md into `staging`.

    Args:
        staging: the export's staging folder (the graphs are in it already).
        model: the exported Transformer (its config and `tokenizer`, which may be None: no tokenizer files).
        graph, outputs, variants, stages, parity, sentence: what the model card states (`card.model_card`).
        labels, model_type: config.json's class names and family (`hf_config`).

    Returns:
        The config.json dict.
    """
    config = model.config
    hf = hf_config(config, model_type, labels)
    files = {"config.json": json.dumps(hf, indent=2), FLASHLITE_CONFIG: config.to_json()}
    if model.tokenizer is not None:
        files |= tokenizer_files(model.tokenizer, config.max_positions, config.type_vocab_size > 0)
    if sentence:
        files |= sentence_files(config, config.max_positions)
    files["README.md"] = model_card(
        config, hf, graph=graph, outputs=outputs, variants=variants, stages=stages, parity=parity, sentence=sentence
    )
    for name, text in files.items():
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    return hf

"""The T5 family (T5, mT5, Flan-T5): pre-RMSNorm layers without biases, relative position buckets, ReLU or gated FFN."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from model.config import Config, LayerShape
from model.hf.bart import generation_ids, word_table
from model.hf.common import Family, activation, check_positive, task_heads, with_defaults

# T5Config's defaults: config.json may omit a key at its default.
DEFAULTS = dict(
    vocab_size=32128,
    d_model=512,
    d_kv=64,
    d_ff=2048,
    num_layers=6,
    num_decoder_layers=6,
    num_heads=8,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.1,
    layer_norm_epsilon=1e-6,
    feed_forward_proj="relu",
    pad_token_id=0,
    n_positions=512,
)
_TYPES = {
    "vocab_size": int,
    "d_model": int,
    "d_kv": int,
    "d_ff": int,
    "num_layers": int,
    "num_decoder_layers": int,
    "num_heads": int,
    "relative_attention_num_buckets": int,
    "relative_attention_max_distance": int,
    "pad_token_id": int,
    "n_positions": int,
    "feed_forward_proj": str,
    "dropout_rate": float,
    "layer_norm_epsilon": float,
}
_SIZES = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "n_positions")
_ATTENTION = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
_FFN = {"wi": "up", "wi_0": "gate", "wi_1": "up", "wo": "down"}


def _modules() -> dict[str, str]:
    """T5's module names -> flashlite's: layer.0 self-attention, (decoder) layer.1 cross-attention, then the FFN."""
    modules = {"shared": "embeddings.word", "lm_head": "heads.lm.out"}
    for stack, ffn in (("encoder", 1), ("decoder", 2)):
        hf, ours = f"{stack}.block.{{i}}.layer", f"{stack}.blocks.{{i}}"
        modules[f"{stack}.final_layer_norm"] = f"{stack}.final_norm"
        modules[f"{hf}.0.layer_norm"] = f"{ours}.attn_norm"
        modules[f"{hf}.0.SelfAttention.relative_attention_bias"] = f"{ours}.self_attn.relative"
        modules[f"{hf}.{ffn}.layer_norm"] = f"{ours}.ffn_norm"
        modules.update({f"{hf}.0.SelfAttention.{a}": f"{ours}.self_attn.{b}" for a, b in _ATTENTION.items()})
        modules.update({f"{hf}.{ffn}.DenseReluDense.{a}": f"{ours}.ffn.{b}" for a, b in _FFN.items()})
    modules.update(
        {
            f"decoder.block.{{i}}.layer.1.EncDecAttention.{a}": f"decoder.blocks.{{i}}.cross_attn.{b}"
            for a, b in _ATTENTION.items()
        }
    )
    modules["decoder.block.{i}.layer.1.layer_norm"] = "decoder.blocks.{i}.cross_norm"
    return modules


def _ffn(proj: str) -> tuple[bool, str]:
    """(gated, transformers' activation name) of feed_forward_proj ("relu", "gated-gelu", ...), as T5Config reads it."""
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(f"feed_forward_proj is {proj!r}; supported: ACT or gated-ACT (relu, gelu, gated-gelu, ...)")
    return len(parts) == 2, "gelu_new" if proj == "gated-gelu" else parts[-1]


def _lm_scale(hf: dict[str, Any]) -> float:
    """T5 scales the decoder output by d_model**-0.5 before the LM head unless config.json says otherwise.

    transformers 5 writes `scale_decoder_outputs`; older files mean it by tie_word_embeddings (false: no
    scale). mT5 never scales.
    """
    if hf.get("model_type") == "mt5":
        return 1.0
    scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
    return hf["d_model"] ** -0.5 if scale else 1.0


def config_from_hf(
    hf: dict[str, Any], architecture: str, *, heads: tuple[str, ...] | None = None, n_labels: int = 0
) -> Config:
    """A T5Config / MT5Config dict as a flashlite Config (see model.hf.config_from_hf).

    T5's attention has no 1/sqrt(d_kv) scaling: the import folds sqrt(d_kv) into the query weights.
    Every self-attention layer holds its own copy of its stack's relative-bias table (equal at
    import), so that pruning one layer's heads prunes that layer's columns only.
    """
    layers = hf.get("num_decoder_layers") or hf.get("num_layers", DEFAULTS["num_layers"])  # None: the encoder's
    hf = with_defaults({**hf, "num_decoder_layers": layers}, DEFAULTS, _TYPES)
    check_positive(hf, _SIZES)
    gated, act = _ffn(hf["feed_forward_proj"])
    shape = LayerShape(n_heads=hf["num_heads"], head_dim=hf["d_kv"], ffn_dim=hf["d_ff"])
    heads, n_labels = task_heads(hf, FAMILY, architecture, heads, n_labels)
    encoder_only = architecture.endswith("EncoderModel")
    tied = hf.get("tie_word_embeddings", True) is not False
    return Config(
        vocab_size=hf["vocab_size"],
        dim=hf["d_model"],
        encoder=(shape,) * hf["num_layers"],
        decoder=() if encoder_only else (shape,) * hf["num_decoder_layers"],
        norm="pre",
        norm_type="rms",
        norm_eps=hf["layer_norm_epsilon"],
        activation=activation({"feed_forward_proj": act}, "feed_forward_proj"),
        ffn_gated=gated,
        linear_bias=False,
        max_positions=hf["n_positions"],
        type_vocab_size=0,
        pad_id=hf["pad_token_id"],
        dropout=hf["dropout_rate"],
        attention_dropout=hf["dropout_rate"],
        heads=heads,
        n_labels=n_labels,
        positions="relative",
        relative_buckets=hf["relative_attention_num_buckets"],
        relative_max_distance=hf["relative_attention_max_distance"],
        embed_norm=False,
        lm_head_tied=tied or "lm" not in heads,
        lm_head_scale=_lm_scale(hf) if "lm" in heads else 1.0,
        **generation_ids(hf),
    )


def _prepare(state: dict[str, Tensor], hf: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """T5's tensors as flashlite reads them: one word table, queries scaled, layer 0's relative table in every layer.

    Whether the LM head is tied shows in the weights: transformers 5 writes tie_word_embeddings
    true for every T5 but keeps a checkpoint's own lm_head when it differs from the word table.
    """
    hf = {**hf, "scale_decoder_outputs": hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings") is not False)}
    words = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
    head = state.get("lm_head.weight")
    hf["tie_word_embeddings"] = head is None or words is None or torch.equal(head.to(words), words)
    state = word_table(state, hf["tie_word_embeddings"])
    d_kv = hf.get("d_kv", DEFAULTS["d_kv"])
    for name in [n for n in state if n.endswith(("SelfAttention.q.weight", "EncDecAttention.q.weight"))]:
        state[name] = state[name] * math.sqrt(d_kv)
    layers = {"encoder": hf.get("num_layers", DEFAULTS["num_layers"])}
    layers["decoder"] = hf.get("num_decoder_layers") or layers["encoder"]
    for stack, n in layers.items():
        table = state.pop(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", None)
        for i in range(n if table is not None else 0):
            state[f"{stack}.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight"] = table
    state.setdefault("final_logits_bias", torch.zeros(hf.get("vocab_size", DEFAULTS["vocab_size"])))  # T5 has none
    return state, hf


FAMILY = Family(
    model_types=("t5", "mt5"),
    architectures={
        f"{base}{kind}": heads
        for base in ("T5", "MT5")
        for kind, heads in (("Model", ()), ("ForConditionalGeneration", ("lm",)), ("EncoderModel", ()))
    },
    prefix="",
    modules=_modules(),
    tensors={"final_logits_bias": "heads.lm.bias"},
    ignored=frozenset(),
    tied=None,
    config=config_from_hf,
    prepare=_prepare,
)

"""from_hf(): import Hugging Face BERT-family checkpoints into a flashlite Transformer with exact parity."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.config import Config, LayerShape
from model.data.tokenizer import load_tokenizer
from model.io import load_tensors
from model.transformer import Transformer

# The Hugging Face classes we import, and the flashlite heads each one carries.
ARCHITECTURES = {
    "BertModel": (),
    "BertForSequenceClassification": ("classify",),
    "BertForMaskedLM": ("mlm",),
    "BertForPreTraining": ("mlm", "pair"),
}
_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
# BertConfig's defaults: config.json files may omit a key whose value is the default.
_BERT_DEFAULTS = dict(
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
# Hugging Face module name -> flashlite module name; "{i}" is the layer index.
# The type of every BertConfig key we read; a config.json that disagrees is refused naming the key.
_BERT_TYPES = {
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
_MODULES = {
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
    "classifier": "heads.classify",
    "cls.predictions.transform.dense": "heads.mlm.transform",
    "cls.predictions.transform.LayerNorm": "heads.mlm.norm",
    "cls.seq_relationship": "heads.pair",
}
# Whole tensors named outside the module pattern: the MLM output bias is stored under either name.
_TENSORS = {"cls.predictions.bias": "heads.mlm.bias", "cls.predictions.decoder.bias": "heads.mlm.bias"}
# Buffers HF rebuilds itself, and the MLM decoder weight, tied to the word embeddings (checked below).
_IGNORED = {"embeddings.position_ids", "embeddings.token_type_ids", "cls.predictions.decoder.weight"}
_PARAMS = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}  # old LayerNorms: gamma/beta


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(\d+)"))


_FORWARD = [(_pattern(hf), ours) for hf, ours in _MODULES.items()]
_BACKWARD = [(_pattern(ours), hf) for hf, ours in _MODULES.items()]


def _rename(name: str, rules: list[tuple[re.Pattern, str]], params: dict[str, str]) -> str | None:
    """Map one tensor name through module rules; None when no rule matches."""
    module, _, param = name.rpartition(".")
    for pattern, template in rules:
        match = pattern.fullmatch(module)
        if match and param in params:
            return template.replace("{i}", match.group(1)) if match.groups() else template
    return None


def _flashlite_name(hf_name: str) -> str | None:
    name = hf_name.removeprefix("bert.")
    if name in _TENSORS:
        return _TENSORS[name]
    renamed = _rename(name, _FORWARD, _PARAMS)
    return None if renamed is None else f"{renamed}.{_PARAMS[name.rpartition('.')[2]]}"


def _hf_name(name: str) -> str:
    """The Hugging Face name of a flashlite tensor, for error messages."""
    if name == "heads.mlm.bias":
        return "cls.predictions.bias"
    renamed = _rename(name, _BACKWARD, {"weight": "weight", "bias": "bias"})
    return name if renamed is None else f"{renamed}.{name.rpartition('.')[2]}"


def config_from_hf(
    hf: dict[str, Any], architecture: str, *, heads: tuple[str, ...] | None = None, n_labels: int = 0
) -> Config:
    """Translate a Hugging Face BERT config (a config.json dict) into a flashlite Config.

    architecture: the HF class name (one of ARCHITECTURES), which sets the heads unless
    `heads` (and `n_labels` for "classify") replace them. Raises ValueError for anything
    flashlite cannot reproduce exactly (another model type, relative positions, decoders,
    an activation it lacks).
    """
    model_type = hf.get("model_type")
    if model_type != "bert":
        raise ValueError(
            f"model_type is {model_type!r} (architectures {hf.get('architectures')}); from_hf supports "
            f"model_type 'bert' with architectures {', '.join(ARCHITECTURES)}"
        )
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    hf = {**_BERT_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    for key, kind in _BERT_TYPES.items():
        value = hf[key]
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
            raise TypeError(
                f"{key} must be {'a number' if kind is float else 'an int' if kind is int else 'a string'}, got {value!r}"
            )
        if kind is float and not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
    for key in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
    ):
        if hf[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {hf[key]}")
    if hf["position_embedding_type"] != "absolute":
        raise ValueError(f"position_embedding_type is {hf['position_embedding_type']!r}; only 'absolute' is supported")
    for flag in ("is_decoder", "add_cross_attention"):
        if hf.get(flag):
            raise ValueError(f"{flag} is true; from_hf imports BERT encoders only, not causal or cross-attention BERT")
    if hf["hidden_act"] not in _ACTIVATIONS:
        raise ValueError(f"hidden_act is {hf['hidden_act']!r}; supported: {', '.join(_ACTIVATIONS)}")
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    if dim % n_heads:
        raise ValueError(f"hidden_size ({dim}) must be divisible by num_attention_heads ({n_heads})")
    if heads is None:
        if n_labels:
            raise ValueError(f"n_labels={n_labels} only applies together with heads=(..., 'classify', ...)")
        heads = ARCHITECTURES[architecture]
        # num_labels is not written to config.json; its id2label map is.
        n_labels = (hf.get("num_labels") or len(hf.get("id2label") or {}) or 2) if "classify" in heads else 0
    shape = LayerShape(n_heads=n_heads, head_dim=dim // n_heads, ffn_dim=hf["intermediate_size"])
    return Config(
        vocab_size=hf["vocab_size"],
        dim=dim,
        encoder=(shape,) * hf["num_hidden_layers"],
        decoder=(),
        norm="post",
        activation=_ACTIVATIONS[hf["hidden_act"]],
        max_positions=hf["max_position_embeddings"],
        type_vocab_size=hf["type_vocab_size"],
        pad_id=hf["pad_token_id"],
        dropout=hf["hidden_dropout_prob"],
        attention_dropout=hf["attention_probs_dropout_prob"],
        norm_eps=hf["layer_norm_eps"],
        heads=heads,
        n_labels=n_labels,
    )


def _read_weights(folder: Path) -> dict[str, Tensor]:
    """Tensors from model.safetensors (single or sharded), else pytorch_model.bin without running pickled code."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(
                f"{index} is not a safetensors shard index (needs a 'weight_map' object): {err!r}"
            ) from None
        if any(Path(shard).name != shard for shard in shards):
            raise ValueError(f"{index} names shards outside {folder}: {[s for s in shards if Path(s).name != s]}")
        return {name: t for shard in shards for name, t in load_tensors(folder / shard).items()}
    if (folder / "model.safetensors").is_file():
        return load_tensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        try:
            state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(f"{folder / 'pytorch_model.bin'} holds more than tensors and was refused: {err}") from None
        except (RuntimeError, EOFError, OSError) as err:  # truncated or corrupt archives
            raise ValueError(f"{folder / 'pytorch_model.bin'} is not a readable torch checkpoint: {err}") from None
        if not isinstance(state, dict) or not all(isinstance(t, Tensor) for t in state.values()):
            raise ValueError(f"{folder / 'pytorch_model.bin'} is not a state dict (a mapping of names to tensors)")
        return state
    found = sorted(p.name for p in folder.iterdir() if p.is_file())
    raise ValueError(
        f"no weights in {folder}: expected model.safetensors (or pytorch_model.bin, loaded as tensors only); "
        f"found {found}. Other pickle files are refused because loading them can run arbitrary code."
    )


def _read_folder(folder: Path) -> tuple[dict[str, Any], str, dict[str, Tensor]]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no Hugging Face config.json at {config_file}")
    try:
        hf = json.loads(config_file.read_bytes().decode("utf-8"))
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError
        raise ValueError(f"{config_file} is not valid UTF-8 JSON: {err}") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{config_file} must hold a JSON object, got {type(hf).__name__}")
    # A config.json without `architectures` is what AutoModel loads as the bare BertModel.
    architectures = hf.get("architectures") or ["BertModel"]
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ValueError(f"{config_file}: architectures must be a list of class names, got {architectures!r}")
    return hf, architectures[0], _read_weights(folder)


def _read_object(obj: Any) -> tuple[dict[str, Any], str, dict[str, Tensor]]:
    import transformers  # only an in-memory model needs transformers; folders are read directly

    if not isinstance(obj, transformers.PreTrainedModel):
        raise TypeError(
            f"from_hf takes a folder path or a transformers model, got {type(obj).__name__}; "
            f"supported models: {', '.join(ARCHITECTURES)}"
        )
    architecture = next((name for name in ARCHITECTURES if isinstance(obj, getattr(transformers, name))), None)
    if architecture is None:
        raise ValueError(f"{type(obj).__name__} is not supported; supported: {', '.join(ARCHITECTURES)}")
    return obj.config.to_dict(), architecture, obj.state_dict()


def _load(model: Transformer, hf_state: dict[str, Tensor], fresh: tuple[str, ...]) -> None:
    """Copy HF tensors into `model`, strictly: every parameter not under a `fresh` prefix must be filled."""
    target = model.state_dict()
    filled: dict[str, str] = {}  # flashlite name -> HF name it came from
    unexpected = []
    for hf_name, tensor in hf_state.items():
        if hf_name.removeprefix("bert.") in _IGNORED:
            continue
        name = _flashlite_name(hf_name)
        if name is None:
            unexpected.append(hf_name)
        elif name not in target or name.startswith(fresh):
            # The HF pooler of a BertModel and heads the caller did not ask for are dropped on purpose:
            # flashlite builds a pooler only for sentence-level heads, and the contract is hidden_states.
            if not name.startswith(("heads.", "pooler.")):
                unexpected.append(hf_name)
        elif tensor.shape != target[name].shape:
            raise ValueError(
                f"{hf_name} has shape {tuple(tensor.shape)} but flashlite's {name} needs {tuple(target[name].shape)}"
            )
        elif name in filled:
            # cls.predictions.bias and cls.predictions.decoder.bias are one tied tensor.
            if not torch.equal(tensor.to(target[name]), target[name]):
                raise ValueError(f"{hf_name} and {filled[name]} both give {name} but differ")
        else:
            with torch.no_grad():
                target[name].copy_(tensor)
            filled[name] = hf_name
    missing = sorted(n for n in target if n not in filled and not n.startswith(fresh))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the architecture: missing {[_hf_name(n) for n in missing]} "
            f"(flashlite {missing}); unexpected {sorted(unexpected)}"
        )
    decoder = next((t for n, t in hf_state.items() if n.endswith("cls.predictions.decoder.weight")), None)
    word = model.embeddings.word.weight
    if decoder is not None and "mlm" in model.heads and not torch.equal(decoder.to(word), word):
        raise ValueError(
            "cls.predictions.decoder.weight differs from the word embeddings; flashlite's MLM head is tied to them"
        )


def from_hf(
    model_or_dir: str | os.PathLike | Any,
    *,
    heads: tuple[str, ...] | None = None,
    n_labels: int = 0,
) -> Transformer:
    """Import a Hugging Face BERT checkpoint as a flashlite Transformer with the same outputs.

    model_or_dir: a folder with config.json and model.safetensors (or pytorch_model.bin), or a
    transformers BertModel / BertForSequenceClassification / BertForMaskedLM / BertForPreTraining.
    heads, n_labels: replace the checkpoint's heads (e.g. heads=("classify",), n_labels=2 to
    fine-tune a new classifier); heads the checkpoint lacks are freshly initialised.
    Returns the model in eval mode, with `model.tokenizer` set when the folder (or the object's
    `name_or_path` folder) holds tokenizer.json or vocab.txt, else None.
    """
    if isinstance(model_or_dir, (str, os.PathLike)):
        folder = Path(model_or_dir)
        hf, architecture, state = _read_folder(folder)
    else:
        hf, architecture, state = _read_object(model_or_dir)
        name_or_path = getattr(model_or_dir, "name_or_path", "")
        folder = Path(name_or_path) if name_or_path else None
    config = config_from_hf(hf, architecture, heads=heads, n_labels=n_labels)
    with torch.device("meta"):  # shapes only: a config.json that lies about sizes allocates nothing before the check
        expected = {name: t.shape for name, t in Transformer(config).state_dict().items()}
    for hf_name, tensor in state.items():
        name = _flashlite_name(hf_name)
        if name in expected and tensor.shape != expected[name]:
            raise ValueError(
                f"{hf_name} has shape {tuple(tensor.shape)} but config.json makes {name} {tuple(expected[name])}"
            )
    model = Transformer(config)
    # Heads the checkpoint lacks (or holds with another label count) start fresh, as does a pooler it lacks.
    checkpoint = config_from_hf(hf, architecture)
    fresh = [
        f"heads.{h}."
        for h in config.heads
        if h not in checkpoint.heads or (h == "classify" and config.n_labels != checkpoint.n_labels)
    ]
    has_pooler = any(n.removeprefix("bert.").startswith("pooler.") for n in state)
    if heads is not None and not has_pooler:
        fresh.append("pooler.")
    _load(model, state, tuple(fresh))
    if folder is not None and any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt")):
        model.tokenizer = load_tokenizer(folder)
    return model.eval()

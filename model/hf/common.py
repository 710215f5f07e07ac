"""What every Hugging Face importer shares: a Family (names, heads, config translation), folder reading, strict loading."""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.data.tokenizer import load_tokenizer
from model.io import load_tensors
from model.transformer import Transformer

# Hugging Face activation names -> flashlite's (Config.activation).
ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
_PARAMS = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}  # old LayerNorms: gamma/beta


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(\d+)"))


def _rename(name: str, rules: list[tuple[re.Pattern, str]], params: dict[str, str]) -> str | None:
    """Map one tensor name through module rules; None when no rule matches."""
    module, _, param = name.rpartition(".")
    for pattern, template in rules:
        match = pattern.fullmatch(module)
        if match and param in params:
            return template.replace("{i}", match.group(1)) if match.groups() else template
    return None


@dataclass(frozen=True)
class Family:
    """How one Hugging Face model family maps onto flashlite.

    Args:
        model_types: the config.json `model_type` values it reads.
        architectures: HF class name -> the flashlite heads it carries (the first is the bare encoder).
        prefix: the base model's attribute in the head classes ("bert." in "bert.embeddings...").
        modules: HF module name -> flashlite module name; "{i}" is the layer index.
        tensors: whole HF tensor names (without prefix) -> flashlite names, outside the module rules.
        ignored: HF tensors (without prefix) rebuilt by flashlite or tied to the word embeddings.
        tied: the HF output weight tied to the word embeddings (checked equal to them), if any.
        config: (hf config dict, architecture, heads, n_labels) -> Config; heads None = the architecture's.
        convert: (flashlite name, tensor, Config) -> the tensor as flashlite lays it out (same shape),
            for families whose layout differs (RoFormer's interleaved rotary dims); None = as stored.
        prepare: (HF tensors, config dict) -> (the tensors to read, the config dict), for families
            that store one table under several names or in another shape (BART's offset positions),
            or whose config facts show in the weights only (T5's tie); None = as stored.
    """

    model_types: tuple[str, ...]
    architectures: dict[str, tuple[str, ...]]
    prefix: str
    modules: dict[str, str]
    tensors: dict[str, str]
    ignored: frozenset[str]
    tied: str | None
    config: Callable[..., Any]
    convert: Callable[[str, Tensor, Any], Tensor] | None = None
    prepare: Callable[[dict[str, Tensor], dict[str, Any]], tuple[dict[str, Tensor], dict[str, Any]]] | None = None

    @cached_property
    def _forward(self) -> list[tuple[re.Pattern, str]]:
        return [(_pattern(hf), ours) for hf, ours in self.modules.items()]

    @cached_property
    def _backward(self) -> list[tuple[re.Pattern, str]]:
        return [(_pattern(ours), hf) for hf, ours in self.modules.items()]

    def flashlite_name(self, hf_name: str) -> str | None:
        """The flashlite name of an HF tensor; None when it has none (ignored or unknown)."""
        name = hf_name.removeprefix(self.prefix)
        if name in self.tensors:
            return self.tensors[name]
        renamed = _rename(name, self._forward, _PARAMS)
        return None if renamed is None else f"{renamed}.{_PARAMS[name.rpartition('.')[2]]}"

    def hf_name(self, name: str) -> str:
        """The Hugging Face name of a flashlite tensor, for error messages."""
        whole = next((hf for hf, ours in self.tensors.items() if ours == name), None)
        if whole is not None:
            return whole
        renamed = _rename(name, self._backward, {"weight": "weight", "bias": "bias"})
        return name if renamed is None else f"{renamed}.{name.rpartition('.')[2]}"

    def is_ignored(self, hf_name: str) -> bool:
        return hf_name.removeprefix(self.prefix) in self.ignored


_KIND_NAMES = {float: "a number", int: "an int", str: "a string", bool: "true or false"}


def _is(value: Any, kind: type) -> bool:
    """isinstance for JSON config values: a bool is no number (nor a number a bool), an int counts as a float."""
    if isinstance(value, bool) or kind is bool:
        return isinstance(value, bool) and kind is bool
    return isinstance(value, (int, float) if kind is float else kind)


def with_defaults(hf: dict[str, Any], defaults: dict[str, Any], types: dict[str, type]) -> dict[str, Any]:
    """The config dict with omitted (or null) keys set to the family's defaults, each key's type checked.

    Args:
        hf: the config.json dict.
        defaults: the family's config class defaults (config.json may omit a key at its default).
        types: the type of every key read; int keys must also be >= 0 (sizes are checked further by Config).
    """
    hf = {**defaults, **{k: v for k, v in hf.items() if v is not None}}
    for key, kind in types.items():
        value = hf[key]
        if not _is(value, kind):
            raise TypeError(f"{key} must be {_KIND_NAMES[kind]}, got {value!r}")
        if kind is float and not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
        if kind is int and value < 0:
            raise ValueError(f"{key} must be >= 0, got {value}")
    return hf


def check_positive(hf: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        if hf[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {hf[key]}")


def activation(hf: dict[str, Any], key: str) -> str:
    """flashlite's name for the activation the config's `key` names; refused when flashlite lacks it."""
    if hf[key] not in ACTIVATIONS:
        raise ValueError(f"{key} is {hf[key]!r}; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[hf[key]]


def task_heads(
    hf: dict[str, Any], family: Family, architecture: str, heads: tuple[str, ...] | None, n_labels: int
) -> tuple[tuple[str, ...], int]:
    """The heads and classify width: the architecture's (n_labels from id2label) unless `heads` replaces them."""
    if heads is not None:
        return heads, n_labels
    if n_labels:
        raise ValueError(f"n_labels={n_labels} only applies together with heads=(..., 'classify', ...)")
    heads = family.architectures[architecture]
    # num_labels is not written to config.json; its id2label map is.
    labels = hf.get("num_labels") or len(hf.get("id2label") or {}) or 2
    if "qa" in heads and labels != 2:
        raise ValueError(f"{architecture} has {labels} labels; a question-answering head has 2 (start, end)")
    return heads, labels if "classify" in heads else 0


def read_weights(folder: Path) -> dict[str, Tensor]:
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
        return _read_torch_bin(folder / "pytorch_model.bin")
    found = sorted(p.name for p in folder.iterdir() if p.is_file())
    raise ValueError(
        f"no weights in {folder}: expected model.safetensors (or pytorch_model.bin, loaded as tensors only); "
        f"found {found}. Other pickle files are refused because loading them can run arbitrary code."
    )


def _read_torch_bin(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path} holds more than tensors and was refused: {err}") from None
    except (RuntimeError, EOFError, OSError) as err:  # truncated or corrupt archives
        raise ValueError(f"{path} is not a readable torch checkpoint: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(t, Tensor) for t in state.values()):
        raise ValueError(f"{path} is not a state dict (a mapping of names to tensors)")
    return state


def read_config(folder: Path) -> dict[str, Any]:
    """config.json as a dict, its `architectures` checked to be a list of class names."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no Hugging Face config.json at {config_file}")
    try:
        hf = json.loads(config_file.read_bytes().decode("utf-8"))
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError
        raise ValueError(f"{config_file} is not valid UTF-8 JSON: {err}") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{config_file} must hold a JSON object, got {type(hf).__name__}")
    architectures = hf.get("architectures")
    if architectures is not None and (
        not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures)
    ):
        raise ValueError(f"{config_file}: architectures must be a list of class names, got {architectures!r}")
    return hf


def _load(model: Transformer, family: Family, hf_state: dict[str, Tensor], fresh: tuple[str, ...]) -> None:
    """Copy HF tensors into `model`, strictly: every parameter not under a `fresh` prefix must be filled."""
    target = model.state_dict()
    filled: dict[str, str] = {}  # flashlite name -> HF name it came from
    unexpected = []
    for hf_name, tensor in hf_state.items():
        if family.is_ignored(hf_name):
            continue
        name = family.flashlite_name(hf_name)
        if name is not None and name in target and family.convert is not None:
            tensor = family.convert(name, tensor, model.config)
        if name is None:
            unexpected.append(hf_name)
        elif name not in target or name.startswith(fresh):
            # The HF pooler of a bare encoder and heads the caller did not ask for are dropped on purpose:
            # flashlite builds a pooler only for sentence-level heads, and the contract is hidden_states.
            if not name.startswith(("heads.", "pooler.")):
                unexpected.append(hf_name)
        elif tensor.shape != target[name].shape:
            raise ValueError(
                f"{hf_name} has shape {tuple(tensor.shape)} but flashlite's {name} needs {tuple(target[name].shape)}"
            )
        elif name in filled:
            # An MLM output bias stored under two names (e.g. cls.predictions.bias and its decoder.bias) is one tensor.
            if not torch.equal(tensor.to(target[name]), target[name]):
                raise ValueError(f"{hf_name} and {filled[name]} both give {name} but differ")
        else:
            with torch.no_grad():
                target[name].copy_(tensor)
            filled[name] = hf_name
    missing = sorted(n for n in target if n not in filled and not n.startswith(fresh))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the architecture: missing {[family.hf_name(n) for n in missing]} "
            f"(flashlite {missing}); unexpected {sorted(unexpected)}"
        )
    _check_tied(model, family, hf_state)


def _check_tied(model: Transformer, family: Family, hf_state: dict[str, Tensor]) -> None:
    decoder = next((t for n, t in hf_state.items() if n.removeprefix(family.prefix) == family.tied), None)
    word = model.embeddings.word.weight
    if decoder is not None and "mlm" in model.heads and not torch.equal(decoder.to(word), word):
        raise ValueError(f"{family.tied} differs from the word embeddings; flashlite's MLM head is tied to them")


def build(
    family: Family,
    hf: dict[str, Any],
    architecture: str,
    state: dict[str, Tensor],
    folder: Path | None,
    heads: tuple[str, ...] | None,
    n_labels: int,
) -> Transformer:
    """The flashlite model of one checkpoint: config translated, shapes checked, weights copied, tokenizer attached.

    Args:
        family: the checkpoint's family.
        hf, architecture, state: its config dict, HF class name and tensors.
        folder: where a tokenizer may be (None for none).
        heads, n_labels: replace the checkpoint's heads (see from_hf).
    """
    if family.prepare is not None:
        state, hf = family.prepare(state, hf)
    config = family.config(hf, architecture, heads=heads, n_labels=n_labels)
    with torch.device("meta"):  # shapes only: a config.json that lies about sizes allocates nothing before the check
        expected = {name: t.shape for name, t in Transformer(config).state_dict().items()}
    for hf_name, tensor in state.items():
        name = family.flashlite_name(hf_name)
        if name in expected and tensor.shape != expected[name]:
            raise ValueError(
                f"{hf_name} has shape {tuple(tensor.shape)} but config.json makes {name} {tuple(expected[name])}"
            )
    model = Transformer(config)
    # Heads the checkpoint lacks (or holds with another label count) start fresh, as does a pooler it lacks.
    checkpoint = family.config(hf, architecture)
    fresh = [
        f"heads.{h}."
        for h in config.heads
        if h not in checkpoint.heads or (h == "classify" and config.n_labels != checkpoint.n_labels)
    ]
    has_pooler = any((family.flashlite_name(n) or "").startswith("pooler.") for n in state)
    if heads is not None and not has_pooler:
        fresh.append("pooler.")
    _load(model, family, state, tuple(fresh))
    if folder is not None and any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt")):
        model.tokenizer = load_tokenizer(folder)
    return model.eval()

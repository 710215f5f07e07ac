"""from_hf(): import a Hugging Face checkpoint (folder or transformers model), routed by its model_type."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from model.config import Config
from model.hf import bart, bert, distilbert, marian, roberta, roformer, t5
from model.hf.common import Family, build, read_config, read_weights
from model.transformer import Transformer

FAMILIES = (bert.FAMILY, roberta.FAMILY, distilbert.FAMILY, roformer.FAMILY, bart.FAMILY, marian.FAMILY, t5.FAMILY)
# Every Hugging Face class we import, and the flashlite heads each one carries.
ARCHITECTURES = {name: heads for family in FAMILIES for name, heads in family.architectures.items()}
MODEL_TYPES = {model_type: family for family in FAMILIES for model_type in family.model_types}


def _supported() -> str:
    return "; ".join(f"{' / '.join(f.model_types)} ({', '.join(f.architectures)})" for f in FAMILIES)


def _family(hf: dict[str, Any], architecture: str | None) -> tuple[Family, str]:
    """The family of a config dict and the architecture it imports (its base model when none is named)."""
    model_type = hf.get("model_type")
    family = MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise ValueError(
            f"model_type is {model_type!r} (architectures {hf.get('architectures')}); "
            f"from_hf supports model_type: {_supported()}"
        )
    architecture = architecture or next(iter(family.architectures))
    if architecture not in family.architectures:
        raise ValueError(
            f"architecture {architecture!r} is not supported for model_type {model_type!r}; "
            f"from_hf supports model_type: {_supported()}"
        )
    return family, architecture


def config_from_hf(
    hf: dict[str, Any], architecture: str, *, heads: tuple[str, ...] | None = None, n_labels: int = 0
) -> Config:
    """Translate a Hugging Face config (a config.json dict) into a flashlite Config.

    Args:
        hf: the config dict; its model_type picks the family.
        architecture: the HF class name (one of ARCHITECTURES), which sets the heads.
        heads, n_labels: replace the architecture's heads (n_labels: the width of "classify").

    Raises ValueError for anything flashlite cannot reproduce exactly (another model type,
    relative positions, an activation it lacks), TypeError for a mistyped key.
    """
    family, architecture = _family(hf, architecture)
    return family.config(hf, architecture, heads=heads, n_labels=n_labels)


def _read_object(obj: Any) -> tuple[dict[str, Any], str, dict]:
    import transformers  # only an in-memory model needs transformers; folders are read directly

    if not isinstance(obj, transformers.PreTrainedModel):
        raise TypeError(
            f"from_hf takes a folder path or a transformers model, got {type(obj).__name__}; "
            f"supported model_type: {_supported()}"
        )
    architecture = next((name for name in ARCHITECTURES if isinstance(obj, getattr(transformers, name))), None)
    if architecture is None:
        raise ValueError(f"{type(obj).__name__} is not supported; supported model_type: {_supported()}")
    return obj.config.to_dict(), architecture, obj.state_dict()


def from_hf(
    model_or_dir: str | os.PathLike | Any,
    *,
    heads: tuple[str, ...] | None = None,
    n_labels: int = 0,
) -> Transformer:
    """Import a Hugging Face model (BERT, RoBERTa, XLM-R, DistilBERT, RoFormer, BART, mBART, Marian, T5, mT5) with the same outputs.

    Args:
        model_or_dir: a folder with config.json and model.safetensors (or pytorch_model.bin), or a
            transformers model of one of ARCHITECTURES.
        heads, n_labels: replace the checkpoint's heads (e.g. heads=("classify",), n_labels=2 to
            fine-tune a new classifier); heads the checkpoint lacks are freshly initialised.

    Returns the model in eval mode, with `model.tokenizer` set when the folder (or the object's
    `name_or_path` folder) holds tokenizer.json or vocab.txt, else None.
    """
    if isinstance(model_or_dir, (str, os.PathLike)):
        folder = Path(model_or_dir)
        hf = read_config(folder)
        family, architecture = _family(hf, (hf.get("architectures") or [None])[0])
        state = read_weights(folder)
    else:
        hf, architecture, state = _read_object(model_or_dir)
        family, architecture = _family(hf, architecture)
        name_or_path = getattr(model_or_dir, "name_or_path", "")
        folder = Path(name_or_path) if name_or_path else None
    return build(family, hf, architecture, state, folder, heads, n_labels)

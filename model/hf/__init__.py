"""Hugging Face import: one module per model family, mapped into flashlite's Config and weights."""

from model.hf.importer import ARCHITECTURES, MODEL_TYPES, config_from_hf, from_hf

__all__ = ["ARCHITECTURES", "MODEL_TYPES", "config_from_hf", "from_hf"]

"""Hugging Face import: one module per model family, mapped into flashlite's Config and weights."""

from model.hf.bert import ARCHITECTURES, config_from_hf, from_hf

__all__ = ["ARCHITECTURES", "config_from_hf", "from_hf"]

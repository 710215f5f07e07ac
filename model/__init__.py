"""flashlite models: the Config, the Transformer, Hugging Face import and safe save/load."""

from model.config import Config, LayerShape
from model.hf import from_hf
from model.io import load, save
from model.transformer import Output, Transformer

__all__ = ["Config", "LayerShape", "Output", "Transformer", "from_hf", "load", "save"]

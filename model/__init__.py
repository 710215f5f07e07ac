"""flashlite models: the Config, the Transformer, Hugging Face import, safe save/load, ONNX export and ONNX Runtime."""

from model.config import Config, LayerShape
from model.hf import from_hf
from model.io import load, save
from model.onnx.export import export_onnx
from model.onnx.runtime import OrtModel
from model.transformer import Output, Transformer

__all__ = ["Config", "LayerShape", "OrtModel", "Output", "Transformer", "export_onnx", "from_hf", "load", "save"]

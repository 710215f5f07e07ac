"""flashlite models: the Config, the Transformer, Hugging Face import, safe save/load, ONNX export and ONNX Runtime.

The names load on first use (PEP 562), so `from model import DeployedModel` or `model.Config`
runs without torch: only the PyTorch side (Transformer, from_hf, save/load, export_onnx,
OrtModel) imports it.
"""

from importlib import import_module

_HOMES = {
    "Config": "model.config",
    "DeployedModel": "model.onnx.deployed",
    "LayerShape": "model.config",
    "OrtModel": "model.onnx.runtime",
    "Output": "model.transformer",
    "Transformer": "model.transformer",
    "export_onnx": "model.onnx.export",
    "from_hf": "model.hf",
    "load": "model.io",
    "save": "model.io",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(import_module(_HOMES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

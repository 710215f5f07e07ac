"""ONNX: the deployable export with parity checks, the export twins of quantized layers, the runners and ONNX Runtime quantization.

Names load on first use, so the torch-free runner (`DeployedModel`) and the folder layout import
without torch.
"""

from importlib import import_module

_HOMES = {
    "DeployedModel": "model.onnx.deployed",
    "OrtModel": "model.onnx.runtime",
    "export_onnx": "model.onnx.export",
    "quantize_onnx": "model.onnx.ort_quantize",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'model.onnx' has no attribute {name!r}")
    value = getattr(import_module(_HOMES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

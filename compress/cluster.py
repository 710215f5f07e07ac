"""cluster_layers(): store weight matrices as k-means codebooks (Share's `cluster_bits`)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from model.config import QuantizedLayer
from model.quantized import ClusteredEmbedding, ClusteredLinear
from model.rebuild import with_quantized
from model.transformer import Transformer


def cluster_layers(model: Transformer, bits: int, *, layers: Iterable[str] | None = None) -> Transformer:
    """Store each chosen weight matrix as a k-means codebook of 2**bits fp32 centroids + packed indices.

    model: the model (left unchanged). bits: 1..8. layers: module names of Linear/Embedding
    layers; None = every Linear and embedding table not yet quantized. One codebook per matrix;
    k-means starts at evenly spaced quantiles and runs a fixed number of Lloyd steps, so the
    result is deterministic. Returns a new model whose Config lists the layers with mode "cluster".
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"cluster bits must be an int in 1..8, got {bits!r}")
    done = {layer.name for layer in model.config.quantized}
    modules = dict(model.named_modules())
    if layers is None:
        names = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Embedding)) and n not in done]
    else:
        names = [layers] if isinstance(layers, str) else list(layers)
    twins = {}
    for name in names:
        module = modules.get(name)
        if name in done or not isinstance(module, (nn.Linear, nn.Embedding)):
            what = "is already quantized" if name in done else "is not a Linear or Embedding of the model"
            raise ValueError(f"cluster_layers: layer {name!r} {what}")
        twin = (
            ClusteredEmbedding.from_float(module, bits)
            if isinstance(module, nn.Embedding)
            else ClusteredLinear.from_float(module, bits)
        )
        twins[name] = (QuantizedLayer(name, "cluster", bits), twin)
    return with_quantized(model, twins)

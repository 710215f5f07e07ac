"""Residual additions before a layer norm written as ONNX `Sum`, so that ONNX Runtime's CPU provider keeps them unfused.

ONNX Runtime fuses `Add -> LayerNormalization` into its contrib `SkipLayerNormalization` when a
session loads a graph. On the CPU that fused kernel is slower than the two nodes it replaces
(measured in benchmarks/RESULTS.md, "Layer norms left unfused"). `Sum` of two inputs computes
exactly what `Add` does (same broadcasting, same float addition) and no ONNX Runtime fusion
matches it, so the deployed file runs the faster pair in every loader (ONNX Runtime, Optimum, sentence-transformers) without session options.
"""

from __future__ import annotations

import onnx_ir as ir

NORMS = frozenset({"LayerNormalization"})


def keep_norms_unfused(model: ir.Model) -> int:
    """Rewrite every `Add` whose result a layer norm reads into `Sum`, in place; returns how many were rewritten.

    Args:
        model: an onnx_ir model (the exporter's graph, before it is saved).
    """
    rewritten = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx"):
            continue
        readers = [user for user, _ in node.outputs[0].uses()]
        if any(reader.op_type in NORMS and reader.domain in ("", "ai.onnx") for reader in readers):
            node.op_type = "Sum"
            rewritten += 1
    return rewritten

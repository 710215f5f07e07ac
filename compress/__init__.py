"""flashlite compression: passes (weight sharing, pruning, distillation, quantization) run by a Pipeline."""

from compress.distill import Distill
from compress.pipeline import Context, Pipeline, Stage
from compress.prune import Prune
from compress.quantize import Quantize
from compress.share import Share

__all__ = ["Context", "Distill", "Pipeline", "Prune", "Quantize", "Share", "Stage"]

"""flashlite compression passes (weight sharing, pruning, distillation, quantization) and their tooling."""

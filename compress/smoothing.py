"""SmoothQuant factors for int8-dynamic Linears: move the activations' outlier channels into the weights.

A BERT-family model's activations hold a few input channels far larger than the rest, so one
int8 scale per token rounds every other channel coarsely. SmoothQuant (Xiao et al., 2022)
divides input channel j by s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha) and multiplies weight
column j by it: the product is unchanged, the activations become flatter and the weights take
part of the range (`alpha` sets how much). `smoothing_factors` measures max|x_j| on calibration
batches (real tokens only); `Int8DynamicLinear` stores W * s and divides its inputs by s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from compress.gptq import input_mask_key, real_tokens, run_with_input_hooks


@torch.no_grad()
def smoothing_factors(
    model: nn.Module, names: Iterable[str], batches: list[dict[str, Tensor]], alpha: float
) -> dict[str, Tensor]:
    """s (in_features,) for each Linear `names` of `model`, from its inputs' per-channel max |x| over `batches`.

    A channel that was always zero, or whose weight column is all zero, keeps s = 1.
    """
    names = list(names)
    absmax = {name: None for name in names}

    def recorder(name: str, mask: Tensor | None) -> Callable[[Tensor], None]:
        def record(x: Tensor) -> None:
            seen = real_tokens(x.detach(), mask).abs().amax(0).float()
            absmax[name] = seen if absmax[name] is None else torch.maximum(absmax[name], seen)

        return record

    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            run_with_input_hooks(
                model, batch, {name: recorder(name, batch.get(input_mask_key(name))) for name in names}
            )
    finally:
        model.train(was_training)
    factors = {}
    for name in names:
        weight_max = model.get_submodule(name).weight.detach().abs().amax(0).float()
        x_max = absmax[name] if absmax[name] is not None else torch.zeros_like(weight_max)
        usable = (x_max > 0) & (weight_max > 0)
        s = x_max.clamp(min=1e-12) ** alpha / weight_max.clamp(min=1e-12) ** (1 - alpha)
        factors[name] = torch.where(usable, s, torch.ones_like(s))
    return factors

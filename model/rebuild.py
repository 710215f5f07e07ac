"""rebuild(): a fresh Transformer for a changed Config, holding given weights and the old model's attachments."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from model.config import Config, QuantizedLayer
from model.transformer import Transformer


def rebuild(
    model: Transformer, config: Config, state: Mapping[str, Tensor], *, optional: tuple[str, ...] = ()
) -> Transformer:
    """A new Transformer built from `config` and loaded with `state`, in the old model's place.

    The new model keeps `model`'s tokenizer, attention backend and train/eval mode, and sits on
    the device and dtype of `state`'s tensors. It is built on the meta device, so no weight is
    initialised twice: every parameter and buffer comes from `state`.

    Args:
        model: the model being replaced.
        config: the new model's Config.
        state: its weights, by state-dict key.
        optional: key prefixes that may be missing from `state` (freshly initialised, seeded by
            the caller's torch RNG); every other key must be present, and no extra key is allowed.

    Returns:
        The new model.
    """
    with torch.device("meta"):
        skeleton = Transformer(config, attention_backend=model.attention_backend)
    wanted = skeleton.state_dict()
    missing = [key for key in wanted if key not in state]
    absent = [key for key in missing if not key.startswith(optional)]
    if absent:
        raise RuntimeError(f"rebuilding the model left weights without values: {absent[:5]}")
    extra = [key for key in state if key not in wanted]
    if extra:
        raise RuntimeError(f"weights the new Config has no place for: {extra[:5]}")
    own = {key: value.detach().clone() for key, value in state.items()}  # never share storage with `model`
    if missing:  # those modules start fresh: build them for real, then load the given weights over them
        reference = next((v for v in own.values() if v.is_floating_point()), torch.zeros(()))
        new = Transformer(config, attention_backend=model.attention_backend).to(reference.device, reference.dtype)
        new.load_state_dict(own, strict=False)
    else:
        new = skeleton
        try:
            new.load_state_dict(own, strict=True, assign=True)
        except RuntimeError as err:
            raise RuntimeError(f"the weights do not fit the new Config: {err}") from None
    new.tokenizer = model.tokenizer
    return new.train(model.training)


def with_quantized(model: Transformer, twins: dict[str, tuple[QuantizedLayer, nn.Module]]) -> Transformer:
    """The model rebuilt with some layers swapped for their quantized twins (model.quantized).

    Args:
        model: the model (left unchanged).
        twins: per module name, the QuantizedLayer the Config will list and the twin module.

    Returns:
        A new model whose `config.quantized` also lists the twins, holding their tensors.
    """
    state = model.state_dict()
    for name, (_, twin) in twins.items():
        state = {k: v for k, v in state.items() if not k.startswith(name + ".")}
        state.update({f"{name}.{k}": v for k, v in twin.state_dict().items()})
    config = model.config.replace(quantized=(*model.config.quantized, *(layer for layer, _ in twins.values())))
    return rebuild(model, config, state)

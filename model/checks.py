"""Input checks for the Transformer and its ONNX runtime: token ids, masks, token types and labels, before any kernel runs."""

from __future__ import annotations

import torch
from torch import Tensor

from model.config import Config
from model.losses import IGNORE


def check_ids(config: Config, ids: Tensor, mask: Tensor | None, name: str, mask_name: str) -> Tensor:
    """Validate token ids and their mask before any kernel runs; returns the mask (all ones if None).

    Args:
        config: the model's Config (vocab_size, max_positions).
        ids: (batch, seq_len) int64/int32 token ids.
        mask: (batch, seq_len) 0/1 attention mask, or None.
        name, mask_name: the argument names the errors quote.
    """
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 (or int32) token ids, got {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must be (batch, seq_len), got shape {tuple(ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(ids.shape)}); need at least one token per row")
    if ids.shape[1] > config.max_positions:
        raise ValueError(f"{name} has {ids.shape[1]} positions but max_positions is {config.max_positions}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= config.vocab_size:
        raise ValueError(f"{name} holds ids in [{low}, {high}] but the vocabulary is [0, {config.vocab_size})")
    if mask is None:
        return torch.ones_like(ids)
    if not isinstance(mask, Tensor):
        raise TypeError(f"{mask_name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != ids.shape:
        raise ValueError(f"{mask_name} has shape {tuple(mask.shape)} but {name} has {tuple(ids.shape)}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{mask_name} must hold integers or bools (1 = token, 0 = padding), got {mask.dtype}")
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError(f"{mask_name} must hold only 0 and 1")
    empty = (mask.sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{mask_name} rows {empty} have no tokens; every sequence needs at least one")
    return mask


def check_labels(config: Config, labels: dict[str, Tensor], ids: Tensor, decoder_ids: Tensor | None) -> None:
    """Labels must fit the batch and their head: cross_entropy would fail inside its kernel, after the forward pass."""
    classes = {
        "mlm_labels": config.vocab_size,
        "decoder_labels": config.vocab_size,
        "pair_labels": 2,
        "labels": config.n_labels if config.n_labels > 1 else None,
    }  # 1 label: regression targets
    for key, value in labels.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{key} must be a torch.Tensor, got {type(value).__name__}")
        like = {"mlm_labels": ids, "decoder_labels": decoder_ids}.get(key)
        shape = tuple(like.shape) if like is not None else (len(ids),)
        if tuple(value.shape) != shape:
            raise ValueError(f"{key} has shape {tuple(value.shape)} but this batch needs {shape}")
        limit = classes.get(key)
        if limit is not None and value.numel():
            bad = (value != IGNORE) & ((value < 0) | (value >= limit))
            if bool(bad.any()):
                raise ValueError(
                    f"{key} holds {value[bad][0].item()}; labels must be in [0, {limit}) or {IGNORE} (ignored)"
                )


def check_token_types(config: Config, types: Tensor, ids: Tensor) -> None:
    """Token type ids must be integers shaped like the input ids and within the model's type vocabulary."""
    if not isinstance(types, Tensor) or types.dtype not in (torch.int64, torch.int32):
        got = types.dtype if isinstance(types, Tensor) else type(types).__name__
        raise TypeError(f"token_type_ids must be an int64 tensor, got {got}")
    if types.shape != ids.shape:
        raise ValueError(f"token_type_ids has shape {tuple(types.shape)} but input_ids has {tuple(ids.shape)}")
    limit = max(config.type_vocab_size, 1)  # with no token-type embedding only zeros are meaningful
    if int(types.min()) < 0 or int(types.max()) >= limit:
        raise ValueError(
            f"token_type_ids must be in [0, {limit}), got values in [{int(types.min())}, {int(types.max())}]"
        )

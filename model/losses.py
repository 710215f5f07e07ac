"""The loss of every task head (MLM, sentence pair, seq2seq LM, classification, span QA) and which labels feed it."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch
import torch.nn.functional as F

IGNORE = -100  # the label of positions that carry no loss (torch's cross_entropy default)

# Which head each label key of a batch supervises.
LABEL_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "mlm_labels": "mlm",
        "pair_labels": "pair",
        "decoder_labels": "lm",
        "labels": "classify",
        "start_positions": "qa",
        "end_positions": "qa",
    }
)


def _check(**tensors: tuple[torch.Tensor, int]) -> None:
    """Raise ValueError for a tensor whose number of dimensions is not the expected one."""
    for name, (tensor, dims) in tensors.items():
        if tensor.dim() != dims:
            raise ValueError(f"{name}: expected {dims} dimensions, got shape {tuple(tensor.shape)}")


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labels that are not -100; zero (not NaN) when all are -100."""
    total = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE, reduction="sum")
    return total / (labels != IGNORE).sum().clamp_min(1)


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Masked-LM loss: logits (B, T, V), labels (B, T) with -100 at unmasked positions; returns the mean."""
    _check(logits=(logits, 3), labels=(labels, 2))
    return _cross_entropy(logits.flatten(0, 1), labels.flatten())


def seq2seq_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Decoder LM loss: logits (B, S, V), labels (B, S) with -100 at padding; returns the mean."""
    return mlm_loss(logits, labels)


def pair_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sentence-pair (NSP/SOP) loss: logits (B, 2), labels (B,) in {0, 1}; returns the mean."""
    _check(logits=(logits, 2), labels=(labels, 1))
    return _cross_entropy(logits, labels)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sequence classification loss: logits (B, C), labels (B,) class ids; returns the mean cross-entropy.

    C == 1 is regression: labels are target values and the loss is the mean squared error
    against logits[:, 0].
    """
    _check(logits=(logits, 2), labels=(labels, 1))
    if logits.shape[1] == 1:
        return F.mse_loss(logits[:, 0], labels.to(logits.dtype))
    return _cross_entropy(logits, labels)


def span_loss(logits: torch.Tensor, start_positions: torch.Tensor, end_positions: torch.Tensor) -> torch.Tensor:
    """Extractive QA loss: the mean of the start and end cross-entropies.

    Args:
        logits: (B, T, 2): start logits in [..., 0], end logits in [..., 1].
        start_positions, end_positions: (B,) token index of each answer's first and last token;
            positions outside [0, T) (answers cut off by truncation) are ignored.

    Returns:
        The loss.
    """
    _check(logits=(logits, 3), start_positions=(start_positions, 1), end_positions=(end_positions, 1))
    length = logits.shape[1]

    def one(position_logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        inside = (positions >= 0) & (positions < length)
        return _cross_entropy(position_logits, positions.long().masked_fill(~inside, IGNORE))

    return (one(logits[..., 0], start_positions) + one(logits[..., 1], end_positions)) / 2


# The labels a head's loss takes are its keys in LABEL_KEYS, in that order.
_HEAD_LOSSES = {
    "mlm": mlm_loss,
    "pair": pair_loss,
    "lm": seq2seq_loss,
    "classify": classification_loss,
    "qa": span_loss,
}


def task_losses(head_logits: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Compute the loss of every head whose labels are present.

    Args:
        head_logits: logits per head name ("mlm", "pair", "lm", "classify", "qa").
        labels: the batch (or its labels); keys outside LABEL_KEYS are ignored.

    Returns:
        The loss per supervised head name. A label key whose head is missing, or only one of
        start_positions and end_positions, raises ValueError.
    """
    for key, head in LABEL_KEYS.items():
        if key in labels and head not in head_logits:
            raise ValueError(
                f"labels has {key!r}, which supervises head {head!r}, but the model's heads are {sorted(head_logits)}"
            )
    if ("start_positions" in labels) != ("end_positions" in labels):
        raise ValueError("labels: start_positions and end_positions must be given together")
    losses = {}
    for head, logits in head_logits.items():
        keys = [key for key, owner in LABEL_KEYS.items() if owner == head and key in labels]
        if keys:
            losses[head] = _HEAD_LOSSES[head](logits, *(labels[key] for key in keys))
    return losses

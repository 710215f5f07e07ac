"""TrainConfig (the settings of one training run, validated), TrainResult and the training errors."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.config import check_int

SCHEDULES = ("linear", "cosine", "constant")
PARALLELS = ("ddp", "fsdp")


class NonFiniteError(RuntimeError):
    """The loss or the gradient became NaN/inf; the run stopped before applying that update."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run.

    steps: optimizer steps in total (a resumed run continues up to this number).
    warmup_steps: linear warmup; None = 6% of steps. schedule: decay after warmup.
    clip: max gradient norm (None = no clipping). checkpoint_every: steps between checkpoints
    (0 = only at the end) when checkpoint_dir is set; keep_checkpoints: how many to keep.
    amp: mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling).
    shard: under torchrun, rank r of W trains on batches r, r+W, r+2W, ... of the data (so the
    global batch of a step is W consecutive batches); False = every rank brings its own data.
    parallel: how several processes train one model: "ddp" (DistributedDataParallel: every rank
    holds all weights, gradients and optimizer state) or "fsdp" (FSDP2 `fully_shard`: the
    training copy's weights, gradients and AdamW moments are split over the ranks, 1/W each, for
    runs whose training state does not fit one device). One process ignores it.
    """

    steps: int
    lr: float = 5e-4
    warmup_steps: int | None = None
    schedule: str = "linear"
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    clip: float | None = 1.0
    seed: int = 0
    device: str = "cpu"
    amp: bool = True
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    progress: bool = True
    shard: bool = True
    parallel: str = "ddp"

    def __post_init__(self) -> None:
        check_int("steps", self.steps, 1)
        check_int("checkpoint_every", self.checkpoint_every, 0)
        check_int("keep_checkpoints", self.keep_checkpoints, 1)
        check_int("seed", self.seed, 0)
        if self.warmup_steps is not None:
            check_int("warmup_steps", self.warmup_steps, 0)
        for name in ("lr", "weight_decay", "clip"):
            value = getattr(self, name)
            if value is None and name == "clip":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"clip must be > 0 or None (no clipping), got {self.clip!r}")
        if self.parallel not in PARALLELS:
            raise ValueError(f"parallel must be one of {', '.join(PARALLELS)}; got {self.parallel!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        if (
            not isinstance(self.betas, (list, tuple))
            or len(self.betas) != 2
            or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas)
        ):
            raise ValueError(f"betas must be two floats in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", tuple(self.betas))
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(
                f"device {self.device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1'): {err}"
            ) from None

    @property
    def warmup(self) -> int:
        return round(0.06 * self.steps) if self.warmup_steps is None else self.warmup_steps

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.schedule == "constant":
            return self.lr
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        if self.schedule == "linear":
            return self.lr * (1.0 - progress)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainResult:
    """What a run did: per-step losses (all steps, resumed ones included), tokens seen, time."""

    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    resumed_from: int = 0
    checkpoint: Path | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

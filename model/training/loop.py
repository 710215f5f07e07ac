"""The one training loop (pretraining, fine-tuning, distillation): AdamW, warmup/decay, clipping, AMP, checkpoints, exact resume."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from model.config import check_int
from model.io import atomic_write_text, fsync_dir, load_tensors, save_tensors
from model.training.distributed import (
    World,
    agree_all_have_data,
    barrier,
    full_tensor,
    gather_rng_states,
    join,
    reduce_step,
    shard_fully,
    shard_like,
)

Batch = dict[str, torch.Tensor]
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


def default_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's own loss on a labelled batch."""
    out = model(**batch)
    if out.loss is None:
        raise ValueError(f"the batch has no label keys, so the model computed no loss; batch keys: {sorted(batch)}")
    return out.loss


class _Batches:
    """Turns `data` into batch(step), the same batch for the same step in a resumed run.

    Step-indexed sources (`step_indexed = True`, like PretrainingData) get the global step and
    handle epochs themselves; other sequences (lists, map-style datasets of batches) cycle;
    iterables are re-iterated each epoch, each epoch started under an RNG seeded by (seed, epoch)
    so that a shuffling DataLoader yields the same order after a resume.
    """

    def __init__(self, data: Any, seed: int, world: World):
        self.data, self.seed, self.world = data, seed, world
        self._iter, self._consumed, self._epoch, self._batch = None, 0, 0, None
        if isinstance(data, dict):
            raise TypeError("data must be a collection of batches, got a single batch dict; wrap it in a list")
        if getattr(data, "step_indexed", False):
            self.kind = "indexed"
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            if len(data) == 0:
                raise ValueError("data is an empty collection of batches")
            self.kind = "sequence"
        elif isinstance(data, Iterable):
            self.kind = "iterable"
        else:
            raise TypeError(
                f"data must be a list of batches, a step-indexed source or an iterable, got {type(data).__name__}"
            )

    def __call__(self, step: int) -> Batch:
        index = step * self.world.size + self.world.rank  # this rank's share of the step's global batch
        if self.kind == "indexed":
            return self.data[index]
        if self.kind == "sequence":
            return self.data[index % len(self.data)]
        while self._consumed <= index:  # an iterable has no random access: skip forward (resume)
            self._batch = self._next()
            self._consumed += 1
        return self._batch

    def _next(self) -> Batch:
        if self._iter is not None:
            try:
                return next(self._iter)
            except StopIteration:
                pass
        if self._epoch > 0 and iter(self.data) is self.data:
            raise ValueError(
                f"data is a one-shot iterator that ran out after {self._consumed} batches; "
                "pass a list or a re-iterable (e.g. a DataLoader) for more steps"
            )
        # Samplers draw their seeds from the global RNG when iteration starts: fork it so the
        # order depends only on (seed, epoch), not on how many dropout draws came before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 100_003 + self._epoch)
            self._iter = iter(self.data)
            first = next(self._iter, None)
        self._epoch += 1
        if first is None:
            raise ValueError("data yielded no batches")
        return first


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and LayerNorm gains are not decayed (BERT's recipe)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def _tokens(batch: Batch) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def _autocast(config: TrainConfig, device: torch.device):
    """(autocast context, GradScaler or None): bf16 where the GPU has it, else fp16 with loss scaling."""
    if not (config.amp and device.type == "cuda"):
        return torch.autocast(device.type, enabled=False), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def train(
    model: nn.Module,
    data: Any,
    config: TrainConfig,
    *,
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor] = default_loss,
    callback: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train `model` in place for `config.steps` optimizer steps and return a TrainResult.

    data: a list of batches (cycled), a step-indexed source (`data[step]` -> batch, e.g.
    PretrainingData, which handles epochs itself) or any iterable of batches (re-iterated each
    epoch). loss_fn(model, batch) -> scalar loss; defaults to the model's own loss.
    callback(step, loss) runs after every step (1-based); an exception in it stops the run.
    With checkpoint_dir set, the newest complete checkpoint there is resumed from: weights,
    optimizer, RNG and data position, so the loss sequence equals an uninterrupted run's.
    With parallel="fsdp" under torchrun, a copy of `model` is sharded over the ranks (gradients
    and AdamW moments then take 1/W of the memory each) and trains; when the run completes, every
    rank's `model` receives the gathered weights, so callers see the same result as with DDP.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    world, device = join(config.device)
    model.to(device).train()
    sharded = world.distributed and config.parallel == "fsdp"
    autocast, scaler = _autocast(config, device)
    if sharded and scaler is not None:
        raise ValueError(
            "parallel='fsdp' with AMP needs bf16, which this GPU lacks (fp16 loss scaling is not sharded); set amp=False"
        )
    result = TrainResult()
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    torch.manual_seed(config.seed + world.rank)  # dropout masks differ by rank, reproducibly
    latest = _latest_checkpoint(ckpt_dir, world) if ckpt_dir is not None else None
    saved = _restore_model(latest, model, config, world) if latest is not None else None
    work = (
        copy.deepcopy(model) if sharded else model
    )  # FSDP: a sharded twin trains; `model` gets its weights at the end
    if sharded:
        shard_fully(work, world, device)
    optimizer = torch.optim.AdamW(_param_groups(work, config.weight_decay), lr=config.lr, betas=config.betas)
    if saved is not None:
        result.resumed_from, result.losses = _restore_optimizer(latest, *saved, optimizer, scaler, world, device)
        result.checkpoint = latest
    problem = None
    try:  # every rank must have data before any collective call, or the others wait forever
        batches = _Batches(data, config.seed, world if config.shard else World())
        if result.resumed_from < config.steps:
            batches(result.resumed_from)
    except (ValueError, TypeError) as err:
        problem = err
    agree_all_have_data(world, problem)
    runner = DistributedDataParallel(model, find_unused_parameters=True) if world.distributed and not sharded else work
    params = [p for group in optimizer.param_groups for p in group["params"]]
    bar = tqdm(
        total=config.steps,
        initial=result.resumed_from,
        disable=not (config.progress and world.main),
        desc="train",
        unit="step",
    )
    start = time.perf_counter()
    try:
        for step in range(result.resumed_from, config.steps):
            batch = batches(step)
            if not isinstance(batch, dict):
                raise TypeError(
                    f"batch {step} is a {type(batch).__name__}; data must yield dicts of tensors (input_ids, ...)"
                )
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step)
            with autocast:
                loss = loss_fn(runner, batch)
            mean_loss, non_finite, tokens = reduce_step(world, loss.detach(), _tokens(batch))
            if non_finite:  # decided together, so no rank is left waiting in backward
                raise NonFiniteError(
                    f"loss is {mean_loss if world.size == 1 else 'non-finite on some rank'} "
                    f"at step {step + 1}; stopped before updating the weights"
                )
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            norm = full_tensor(
                torch.nn.utils.clip_grad_norm_(params, config.clip if config.clip is not None else math.inf)
            )
            if scaler is not None:  # fp16: the scaler skips steps with inf gradients by design
                scaler.step(optimizer)
                scaler.update()
            elif not torch.isfinite(norm):  # gradients are all-reduced: every rank sees the same norm
                raise NonFiniteError(
                    f"gradient norm is {norm.item()} at step {step + 1}; stopped before updating the weights"
                )
            else:
                optimizer.step()
            result.losses.append(mean_loss)
            result.tokens += tokens
            result.seconds = time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{result.tokens_per_second:.0f}")
            done = step + 1
            if ckpt_dir is not None and (
                done == config.steps or (config.checkpoint_every and done % config.checkpoint_every == 0)
            ):
                result.checkpoint = _save_checkpoint(
                    ckpt_dir, done, work, optimizer, scaler, result.losses, config, world
                )
            if callback is not None:  # forked RNG: a callback that samples must not shift the run
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    callback(done, mean_loss)
    finally:
        bar.close()
    if sharded:
        _gather_weights(work, model)
    return result


def _gather_weights(sharded: nn.Module, model: nn.Module) -> None:
    """Load the whole trained weights of an FSDP2 twin into `model` on every rank (a collective)."""
    model.load_state_dict({k: full_tensor(v.detach()) for k, v in sharded.state_dict().items()})


def _latest_checkpoint(ckpt_dir: Path, world: World) -> Path | None:
    """The newest complete checkpoint; rank 0 removes leftovers of an interrupted write."""
    if not ckpt_dir.is_dir():
        return None
    if world.main:
        for leftover in ckpt_dir.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    barrier(world)
    complete = [p for p in _checkpoints(ckpt_dir) if (p / "trainer.json").is_file()]
    return complete[-1] if complete else None


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    """The step-N folders, oldest first; other entries (notes, copies like step-best) are the user's, not ours."""
    found = [
        (int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := re.fullmatch(r"step-(\d+)", p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


# Settings that shape the loss sequence: a resumed run must use the checkpoint's values.
_RESUME_FIELDS = ("steps", "lr", "warmup_steps", "schedule", "weight_decay", "betas", "clip", "seed")


def _save_checkpoint(
    ckpt_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler,
    losses: list[float],
    config: TrainConfig,
    world: World,
) -> Path:
    """Rank 0 writes step-N/ as a whole: files go into a temp folder that is renamed once complete."""
    rng_states = gather_rng_states(world)  # collective: every rank takes part
    weights, state = _full_states(model, optimizer)  # collective under FSDP
    final = ckpt_dir / f"step-{step:08d}"
    if not world.main:
        barrier(world)
        return final
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {
        f"state.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items() if isinstance(v, torch.Tensor)
    }
    tensors.update({f"rng.cpu.{rank}": state for rank, state in enumerate(rng_states)})
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_tensors(tmp / "model.safetensors", weights)
    save_tensors(tmp / "optimizer.safetensors", tensors)
    trainer = {
        "step": step,
        "losses": losses,
        "param_groups": state["param_groups"],
        "settings": {name: getattr(config, name) for name in _RESUME_FIELDS},
        "scaler": scaler.state_dict() if scaler is not None else None,
        "world_size": world.size,
    }
    atomic_write_text(tmp / "trainer.json", json.dumps(trainer))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(ckpt_dir)
    old = _checkpoints(ckpt_dir)[: -config.keep_checkpoints]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    barrier(world)
    return final


def _full_states(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state, optimizer state) as whole tensors: FSDP2 shards are gathered (a collective on every rank)."""
    weights = {k: full_tensor(v.detach()) for k, v in model.state_dict().items()}
    state = optimizer.state_dict()
    # Sorted: every rank must gather the same tensor at the same time, whatever order its state dict holds.
    state["state"] = {
        i: {k: full_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in sorted(state["state"][i].items())}
        for i in sorted(state["state"])
    }
    return weights, state


_TRAINER_KEYS = ("step", "losses", "param_groups", "settings", "scaler", "world_size")


def _read_trainer(file: Path) -> dict[str, Any]:
    """trainer.json of a checkpoint, refused with a ValueError naming it when torn or not ours."""
    try:
        trainer = json.loads(file.read_bytes().decode("utf-8"))
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError
        raise ValueError(f"{file} is not valid UTF-8 JSON (a torn or hand-edited checkpoint): {err}") from None
    if (
        not isinstance(trainer, dict)
        or not set(_TRAINER_KEYS) <= set(trainer)
        or not isinstance(trainer["settings"], dict)
    ):
        raise ValueError(f"{file} is not a flashlite trainer state (needs keys {', '.join(_TRAINER_KEYS)})")
    return trainer


def _optimizer_state(
    tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, file: Path, rank: int
) -> dict[int, dict[str, torch.Tensor]]:
    """The optimizer state in `tensors`, checked against the parameters it will update (AdamW would fail in its kernel)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if f"rng.cpu.{rank}" not in tensors:
        raise ValueError(f"{file} holds no RNG state for rank {rank} (rng.cpu.{rank}); it is not a complete checkpoint")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith("state."):
            continue
        _, index, name = key.split(".", 2)
        if not index.isdigit() or int(index) >= len(params):
            raise ValueError(f"{file}: {key} names a parameter the model does not have ({len(params)} parameters)")
        if value.dim() and value.shape != params[int(index)].shape:
            raise ValueError(
                f"{file}: {key} has shape {list(value.shape)} but the parameter has {list(params[int(index)].shape)}"
            )
        state.setdefault(int(index), {})[name] = value
    return state


def _restore_model(
    path: Path, model: nn.Module, config: TrainConfig, world: World
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Check a checkpoint against this run and load its weights into the (unsharded) model.

    Returns (trainer state, optimizer tensors) for `_restore_optimizer`.
    """
    trainer = _read_trainer(path / "trainer.json")
    if trainer["world_size"] != world.size:
        raise ValueError(
            f"checkpoint {path} was written by {trainer['world_size']} processes but this run has {world.size}; "
            "the data order depends on it, so resume with the same number of processes"
        )
    saved = trainer["settings"]
    for name in _RESUME_FIELDS:
        value = getattr(config, name)
        if (list(value) if isinstance(value, tuple) else value) != saved[name]:
            raise ValueError(
                f"checkpoint {path} was written with {name}={saved[name]!r} but this run has {name}={value!r}; "
                "use the same settings to resume, or another checkpoint_dir to start afresh"
            )
    weights = load_tensors(path / "model.safetensors")
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"checkpoint {path} does not match the model: {err}") from None
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return trainer, load_tensors(path / "optimizer.safetensors")


def _restore_optimizer(
    path: Path,
    trainer: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler,
    world: World,
    device: torch.device,
) -> tuple[int, list[float]]:
    """Load the optimizer, loss scaler and RNG state of a checkpoint; returns (step, losses so far)."""
    if scaler is not None and trainer["scaler"] is not None:
        scaler.load_state_dict(trainer["scaler"])
    state = _optimizer_state(tensors, optimizer, path / "optimizer.safetensors", world.rank)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state.items():
        for name, value in entry.items():  # whole tensors; under FSDP2 each rank keeps its shard
            entry[name] = shard_like(value.to(device), params[index]) if value.dim() else value
    optimizer.load_state_dict({"state": state, "param_groups": trainer["param_groups"]})
    torch.set_rng_state(tensors[f"rng.cpu.{world.rank}"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return trainer["step"], list(trainer["losses"])

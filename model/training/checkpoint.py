"""Training checkpoints: atomic save of weights, optimizer, RNG and data position; exact restore on every rank."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.io import atomic_write_text, fsync_dir, load_tensors, save_tensors
from model.training.config import TrainConfig
from model.training.distributed import World, barrier, full_tensor, gather_rng_states, shard_like


def latest_checkpoint(ckpt_dir: Path, world: World) -> Path | None:
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


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler,
    losses: list[float],
    config: TrainConfig,
    world: World,
    device: torch.device,
) -> Path:
    """Rank 0 writes step-N/ as a whole: files go into a temp folder that is renamed once complete.

    Every rank's RNG streams are kept under its rank: `rng.cpu.R` and, training on a GPU, `rng.cuda.R`.
    """
    rng_states = gather_rng_states(world, device)  # collective: every rank takes part
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
    for rank, states in enumerate(rng_states):
        tensors.update({f"rng.{kind}.{rank}": state for kind, state in states.items()})
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


def restore_model(
    path: Path, model: nn.Module, config: TrainConfig, world: World
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Check a checkpoint against this run and load its weights into the (unsharded) model.

    Returns (trainer state, optimizer tensors) for `restore_optimizer`.
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


def restore_optimizer(
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
    if device.type == "cuda" and f"rng.cuda.{world.rank}" in tensors:  # this rank's own GPU stream
        torch.cuda.set_rng_state(tensors[f"rng.cuda.{world.rank}"], device)
    return trainer["step"], list(trainer["losses"])

"""The one training loop (pretraining, fine-tuning, distillation): AdamW, warmup/decay, clipping, AMP, checkpoints, exact resume."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from model.training.checkpoint import latest_checkpoint, restore_model, restore_optimizer, save_checkpoint
from model.training.config import NonFiniteError, TrainConfig, TrainResult
from model.training.distributed import (
    World,
    agree_all_have_data,
    full_tensor,
    join,
    reduce_step,
    shard_fully,
)

Batch = dict[str, torch.Tensor]


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
    latest = latest_checkpoint(ckpt_dir, world) if ckpt_dir is not None else None
    saved = restore_model(latest, model, config, world) if latest is not None else None
    work = copy.deepcopy(model) if sharded else model  # FSDP: a sharded twin trains; `model` gets its weights
    if sharded:
        shard_fully(work, world, device)
    optimizer = torch.optim.AdamW(_param_groups(work, config.weight_decay), lr=config.lr, betas=config.betas)
    if saved is not None:
        result.resumed_from, result.losses = restore_optimizer(latest, *saved, optimizer, scaler, world, device)
        result.checkpoint = latest
    batches = _batches_on_every_rank(data, config, world, result.resumed_from)
    runner = DistributedDataParallel(model, find_unused_parameters=True) if world.distributed and not sharded else work
    shown = config.progress and world.main
    bar = tqdm(total=config.steps, initial=result.resumed_from, disable=not shown, desc="train", unit="step")
    start = time.perf_counter()
    try:
        for step in range(result.resumed_from, config.steps):
            batch = batches(step)
            if not isinstance(batch, dict):
                raise TypeError(
                    f"batch {step} is a {type(batch).__name__}; data must yield dicts of tensors (input_ids, ...)"
                )
            mean_loss, tokens = _step(runner, batch, step, loss_fn, optimizer, scaler, autocast, config, world, device)
            result.losses.append(mean_loss)
            result.tokens += tokens
            result.seconds = time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{result.tokens_per_second:.0f}")
            done = step + 1
            if ckpt_dir is not None and (
                done == config.steps or (config.checkpoint_every and done % config.checkpoint_every == 0)
            ):
                result.checkpoint = save_checkpoint(
                    ckpt_dir, done, work, optimizer, scaler, result.losses, config, world, device
                )
            if callback is not None:  # forked RNG: a callback that samples must not shift the run
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    callback(done, mean_loss)
    finally:
        bar.close()
    if sharded:
        _gather_weights(work, model)
    return result


def _batches_on_every_rank(data: Any, config: TrainConfig, world: World, resumed_from: int) -> _Batches:
    """The run's batches, checked on every rank before any collective call (or the others would wait forever)."""
    problem = None
    try:
        batches = _Batches(data, config.seed, world if config.shard else World())
        if resumed_from < config.steps:
            batches(resumed_from)
    except (ValueError, TypeError) as err:
        problem = err
    agree_all_have_data(world, problem)  # raises on every rank when one has no data
    return batches


def _step(
    runner: nn.Module,
    batch: Batch,
    step: int,
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    autocast: Any,
    config: TrainConfig,
    world: World,
    device: torch.device,
) -> tuple[float, int]:
    """One optimizer step on one batch; returns (the loss averaged over ranks, tokens over ranks)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
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
    norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, config.clip if config.clip is not None else math.inf))
    if scaler is not None:  # fp16: the scaler skips steps with inf gradients by design
        scaler.step(optimizer)
        scaler.update()
    elif not torch.isfinite(norm):  # gradients are all-reduced: every rank sees the same norm
        raise NonFiniteError(f"gradient norm is {norm.item()} at step {step + 1}; stopped before updating the weights")
    else:
        optimizer.step()
    return mean_loss, tokens


def _gather_weights(sharded: nn.Module, model: nn.Module) -> None:
    """Load the whole trained weights of an FSDP2 twin into `model` on every rank (a collective)."""
    model.load_state_dict({k: full_tensor(v.detach()) for k, v in sharded.state_dict().items()})

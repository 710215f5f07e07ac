"""torch.distributed plumbing for the training loop: join the group torchrun describes, shard weights (FSDP2), agree across ranks."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (rank 0 of 1 when not distributed)."""

    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0 logs, shows progress and writes checkpoints."""
        return self.rank == 0


def is_main() -> bool:
    """True in the process that writes files: rank 0, or the only process when not distributed.

    Before the process group exists (passes that do not train run first), torchrun's RANK
    variable says which process this is: every rank must not think it is the writer.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # a plain process, whatever RANK a job system left set
        return True
    return int(os.environ.get("RANK", "0")) == 0


def join(device: str) -> tuple[World, torch.device]:
    """Join the process group that torchrun's environment describes (gloo on CPU, nccl on CUDA).

    Returns (world, device); under torchrun a "cuda" device becomes this process's local GPU.
    Without torchrun (no WORLD_SIZE, or WORLD_SIZE=1) nothing is initialized.
    """
    target = torch.device(device)
    if not dist.is_available():
        return World(), target
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return World(), target
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    world = World(dist.get_rank(), dist.get_world_size())
    if target.type == "cuda" and target.index is None and world.distributed:
        target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", world.rank % torch.cuda.device_count())))
        torch.cuda.set_device(target)
    return world, target


def shard_fully(model: torch.nn.Module, world: World, device: torch.device) -> None:
    """FSDP2 (`fully_shard`), in place: each rank keeps 1/W of every parameter and its optimizer state.

    Every transformer block of a stack without layer sharing is its own FSDP unit (gathered just
    before it runs, freed after); a block that runs at several depths stays in the root unit, which
    holds the rest (embeddings, heads, distillation projections). Call before creating the optimizer.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from model.transformer import Transformer

    mesh = init_device_mesh(device.type, (world.size,))
    for module in model.modules():
        if not isinstance(module, Transformer):
            continue
        for stack in (module.encoder, module.decoder):
            if stack is not None and len(stack.blocks) == len(stack.share):
                for block in stack.blocks:
                    fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor (a sharded or replicated FSDP2 value) gathered into a plain tensor; a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor (e.g. an AdamW moment from a checkpoint) laid out like `param`: this rank's shard of it
    when `param` is an FSDP2 DTensor, else `value` itself. Every rank holds the whole value, so no
    communication is needed (a gloo scatter of uneven shards would abort)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
    return value


def agree_all_have_data(world: World, error: Exception | None) -> None:
    """Raise on every rank when any rank has no data, instead of leaving the others waiting forever."""
    if not world.distributed:
        if error is not None:
            raise error
        return
    flags = [None] * world.size
    dist.all_gather_object(flags, None if error is None else str(error))
    failed = {rank: message for rank, message in enumerate(flags) if message is not None}
    if failed:
        raise ValueError(f"ranks {sorted(failed)} have no usable data (an empty shard?): {failed}")


def reduce_step(world: World, loss: torch.Tensor, tokens: int) -> tuple[float, bool, int]:
    """(mean loss over ranks, whether any rank's loss is non-finite, tokens on all ranks) for one step."""
    finite = bool(torch.isfinite(loss))
    if not world.distributed:
        return loss.item(), not finite, tokens
    stats = torch.tensor(
        [loss.item() if finite else 0.0, 0.0 if finite else 1.0, float(tokens)], dtype=torch.float64, device=loss.device
    )
    dist.all_reduce(stats)
    return stats[0].item() / world.size, stats[1].item() > 0, int(stats[2].item())


def gather_rng_states(world: World, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Every rank's RNG states, on every rank: {"cpu": ..., and "cuda": its own device's when it trains on one}.

    Dropout masks differ by rank, so each rank's streams are saved and restored as its own.
    """
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if not world.distributed:
        return [state]
    states = [None] * world.size
    dist.all_gather_object(states, state)
    return states


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()

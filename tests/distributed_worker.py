"""A training run launched by torchrun from tests/test_distributed.py (not a test module itself).

Usage: torchrun --nproc-per-node 2 tests/distributed_worker.py OUT_DIR {train|fsdp|fsdp-resume|distill|fsdp-distill|empty-shard}
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from interrupt import Interrupt, stop_at

from compress import Context, Distill, Prune
from model.config import Config
from model.io import save_tensors
from model.training.loop import TrainConfig, train
from model.transformer import Transformer

STEPS = 3


def classification_batches(n: int) -> list[dict[str, torch.Tensor]]:
    """n equal-sized labelled batches: per-rank mean losses then average to the global batch's mean."""
    g = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(n):
        ids = torch.randint(5, 512, (4, 10), generator=g)
        batches.append(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 3, (4,), generator=g)}
        )
    return batches


def model() -> Transformer:
    torch.manual_seed(0)
    config = Config.preset(
        "tiny", decoder_layers=0, heads=("classify",), n_labels=3, dropout=0.0, attention_dropout=0.0
    )
    return Transformer(config)


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    net = model()
    if mode in ("train", "fsdp"):
        run = TrainConfig(steps=STEPS, lr=1e-3, progress=False, parallel="fsdp" if mode == "fsdp" else "ddp")
        result = train(net, classification_batches(2 * STEPS), run)
        save_tensors(out / f"rank{dist.get_rank()}.safetensors", dict(net.state_dict()))
        (out / f"losses{dist.get_rank()}.txt").write_text(" ".join(x.hex() for x in result.losses))
    elif mode == "fsdp-resume":  # stop after 2 steps with a checkpoint, then resume to STEPS in a fresh model
        ckpt = str(out / "checkpoints")
        train(
            net,
            classification_batches(2 * STEPS),
            TrainConfig(steps=STEPS, lr=1e-3, progress=False, parallel="fsdp", checkpoint_dir=ckpt, checkpoint_every=2),
            callback=stop_at(2),
        )
    elif mode == "fsdp-resume-finish":
        run = TrainConfig(
            steps=STEPS,
            lr=1e-3,
            progress=False,
            parallel="fsdp",
            checkpoint_dir=str(out / "checkpoints"),
            checkpoint_every=2,
        )
        result = train(net, classification_batches(2 * STEPS), run)
        save_tensors(out / f"rank{dist.get_rank()}.safetensors", dict(net.state_dict()))
        (out / f"losses{dist.get_rank()}.txt").write_text(" ".join(x.hex() for x in result.losses))
    elif mode in ("distill", "fsdp-distill"):  # the Distill pass, unchanged, under DDP or FSDP2
        student = Prune(heads=0.5, ffn=0.5)(net, Context(data=None, teacher=net))
        parallel = "fsdp" if mode.startswith("fsdp") else "ddp"
        ctx = Context(data=classification_batches(2 * STEPS), teacher=net.eval(), parallel=parallel)
        Distill(steps=STEPS, progress=False)(student, ctx)
        save_tensors(out / f"rank{dist.get_rank()}.safetensors", dict(student.state_dict()))
    else:  # rank 1 brings an empty shard of its own
        data = classification_batches(STEPS) if os.environ["RANK"] == "0" else []
        train(net, data, TrainConfig(steps=STEPS, progress=False, shard=False))


if __name__ == "__main__":
    try:
        main()
    except Interrupt:  # the planned interruption of fsdp-resume
        dist.destroy_process_group()

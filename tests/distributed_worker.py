"""A training run launched by torchrun from tests/test_distributed.py (not a test module itself).

Usage: torchrun --nproc-per-node 2 tests/distributed_worker.py OUT_DIR {train|distill|empty-shard}
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from compress import Context, Distill, Prune
from model.config import Config
from model.io import save_tensors
from model.train import TrainConfig, train
from model.transformer import Transformer

STEPS = 3


def classification_batches(n: int) -> list[dict[str, torch.Tensor]]:
    """n equal-sized labelled batches: per-rank mean losses then average to the global batch's mean."""
    g = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(n):
        ids = torch.randint(5, 512, (4, 10), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 3, (4,), generator=g)})
    return batches


def model() -> Transformer:
    torch.manual_seed(0)
    config = Config.preset("tiny", decoder_layers=0, heads=("classify",), n_labels=3, dropout=0.0, attention_dropout=0.0)
    return Transformer(config)


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    net = model()
    if mode == "train":
        train(net, classification_batches(2 * STEPS), TrainConfig(steps=STEPS, lr=1e-3, progress=False))
        save_tensors(out / f"rank{dist.get_rank()}.safetensors", dict(net.state_dict()))
    elif mode == "distill":  # the Distill pass, unchanged, under DDP
        student = Prune(heads=0.5, ffn=0.5)(net, Context(data=None, teacher=net))
        Distill(steps=STEPS, progress=False)(student, Context(data=classification_batches(2 * STEPS), teacher=net.eval()))
        save_tensors(out / f"rank{dist.get_rank()}.safetensors", dict(student.state_dict()))
    else:  # rank 1 brings an empty shard of its own
        data = classification_batches(STEPS) if os.environ["RANK"] == "0" else []
        train(net, data, TrainConfig(steps=STEPS, progress=False, shard=False))


if __name__ == "__main__":
    main()

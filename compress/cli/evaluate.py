"""`flashlite eval`: dev metrics, size and latency of a model folder or an ONNX file on a task."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from compress.cli.common import (
    DATA_HELP,
    DEV_ARTICLES_HELP,
    TASK_HELP,
    TASKS,
    check_max_len,
    positive_int,
    print_table,
    progress,
    squad_data,
)


def add_parser(commands) -> None:
    """Register the `eval` subcommand.

    Args:
        commands: the top-level parser's subparsers.
    """
    p = commands.add_parser(
        "eval",
        help="dev metrics plus parameters, bytes and latency of a model or ONNX file",
        description="Score a fine-tuned model (PyTorch folder or ONNX file) on a task's dev split and "
        "measure its size and latency; prints a table, --json writes it.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="a flashlite model folder with the task's head")
    source.add_argument(
        "--onnx", type=Path, help="an ONNX file written by `flashlite export` (run on ONNX Runtime, CPU)"
    )
    p.add_argument(
        "--tokenizer", type=Path, default=None, help="with --onnx: tokenizer.json (default: the one beside the file)"
    )
    p.add_argument("--task", required=True, choices=TASKS, metavar="TASK", help=TASK_HELP)
    p.add_argument("--data", type=Path, required=True, help=DATA_HELP)
    p.add_argument("--rows", type=positive_int, default=None, help="score the first N dev rows (default: all)")
    p.add_argument("--dev-articles", type=positive_int, default=1, help=DEV_ARTICLES_HELP)
    p.add_argument("--max-len", type=positive_int, default=128, help="tokens per example (default: 128)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="rows per timed call (default: 1)")
    p.add_argument("--device", default="cpu", help="torch device for --model (default: cpu)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results to FILE as JSON")
    p.set_defaults(run=run)


def eval_source(args: argparse.Namespace):
    """(model for glue/squad, tokenizer, (params, unique params), bytes on disk, timer(batch) -> latency dict).

    Args:
        args: the parsed command line, with `model` or `onnx` (and `tokenizer`, `device`).
    """
    import tokenizers

    from compress.evaluate.measure import count_params, size_on_disk, time_model, time_onnx

    if args.model:
        from model import load

        model = load(args.model, device=args.device)
        return model, model.tokenizer, count_params(model), size_on_disk(args.model), lambda b: time_model(model, b)
    from model.onnx.runtime import OrtModel, OrtModule, graph_paths
    from model.transformer import Transformer

    if args.onnx.is_file() and args.onnx.suffix != ".onnx":
        raise ValueError(f"--onnx {args.onnx} is not an .onnx file (write one with `flashlite export`)")
    runner = OrtModel(args.onnx)
    graph_folder = runner.encoder.path.parent  # a sentence-transformers folder keeps its graphs in onnx/
    beside = [folder / "tokenizer.json" for folder in (graph_folder, graph_folder.parent)]
    path = args.tokenizer or next((p for p in beside if p.is_file()), beside[0])
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer at {path}: pass --tokenizer FILE (export writes tokenizer.json beside model.onnx)"
        )
    tokenizer = tokenizers.Tokenizer.from_file(str(path))
    files = [p for p in graph_paths(args.onnx).values() if p.exists()]
    size = sum(size_on_disk(p) for p in files)
    return OrtModule(runner), tokenizer, count_params(Transformer(runner.config)), size, lambda b: time_onnx(runner, b)


def score(args: argparse.Namespace, model, tokenizer, rows: list[dict]) -> tuple[dict[str, float], dict]:
    """(dev metrics over `rows`, one batch of --batch-size rows to time).

    Args:
        args: the parsed command line.
        model: the model or ONNX Runtime module.
        tokenizer: its tokenizer.
        rows: the dev rows to score.
    """
    from compress.evaluate import glue, squad

    if args.task == "squad":
        metrics = squad.evaluate(
            model, rows, tokenizer, max_len=args.max_len, doc_stride=args.max_len // 2, progress=progress()
        )
        feats = squad.features(rows[: args.batch_size], tokenizer, max_len=args.max_len, doc_stride=args.max_len // 2)
        batch = squad.batches(feats[: args.batch_size], tokenizer, batch_size=args.batch_size)[0]
    else:
        metrics = glue.evaluate(
            model, args.task, "dev", args.data, tokenizer, max_len=args.max_len, limit=args.rows, progress=progress()
        )
        unlabelled = [{**r, "label": None} for r in rows[: args.batch_size]]
        batch = glue.batches(unlabelled, tokenizer, args.task, max_len=args.max_len, batch_size=args.batch_size)[0]
    return metrics, batch


def run(args: argparse.Namespace) -> int:
    """Score the model on --task's dev split, time it, print the table and write --json when given.

    Args:
        args: the parsed command line.
    """
    from compress.evaluate import glue

    if args.task == "squad":
        rows = squad_data(args.data, args.dev_articles)[1][: args.rows]
    else:
        rows = glue.load(args.task, "dev", args.data)[: args.rows]  # checked before the model loads
    model, tokenizer, (params, unique), size, timer = eval_source(args)
    glue.tokenizer_of(model, tokenizer)
    check_max_len(model, args.max_len)
    metrics, batch = score(args, model, tokenizer, rows)
    count = len(rows)
    latency = timer(batch)
    runtime = "ONNX Runtime" if args.onnx else f"PyTorch ({args.device})"
    print(
        f"{args.task} dev, {count} rows, {runtime}: {args.onnx or args.model} (latency: batch of {len(batch['input_ids'])})"
    )
    sizes = {"params": params, "unique_params": unique, "bytes_on_disk": size}
    print_table({**metrics, **sizes, "latency_p50_ms": latency["p50_ms"], "latency_p90_ms": latency["p90_ms"]})
    if args.json:
        result = {
            "task": args.task,
            "split": "dev",
            "rows": count,
            "source": str(args.onnx or args.model),
            "runtime": runtime,
            "metrics": metrics,
            **sizes,
            "latency_batch": len(batch["input_ids"]),
            "latency_ms": latency,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0

"""`flashlite compress`: run a compression recipe on a model and print its report."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from compress.cli.common import HF_FAMILIES, add_parallel, add_source, load_source


def add_parser(commands) -> None:
    """Register the `compress` subcommand.

    Args:
        commands: the top-level parser's subparsers.
    """
    p = commands.add_parser(
        "compress",
        help="run a recipe (share, prune, distill, quantize, export) on a model",
        description="Compress a model with a YAML recipe; writes the Lite model, report.json/.md, plots and ONNX. "
        f"The model is a flashlite folder (--model) or a Hugging Face one (--hf: {HF_FAMILIES}); a model with a "
        "decoder also gets ROUGE/BLEU of its seq2seq head in the report.",
    )
    p.add_argument(
        "recipe",
        help="a recipe YAML file or a built-in recipe name (flash-lite, prune-only, quantize-only, "
        "minilm-embedding, glue-task)",
    )
    add_source(p, required=True)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a recipe setting, e.g. --set distill.steps=50 --set data.max_len=32 (repeatable)",
    )
    p.add_argument(
        "--student",
        type=Path,
        help="a flashlite model folder to start the passes from, distilling from the --model/--hf teacher: the task "
        "stage after a general distillation (e.g. OUT/model of a `general` run); it takes the teacher's task heads",
    )
    p.add_argument("--out", type=Path, required=True, help="folder for model/, report.json, report.md, plots, onnx/")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh: discard the finished passes in OUT/work (a rerun otherwise resumes them, and refuses "
        "when they were made from another model, data or recipe)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device for the training passes (default: cpu)")
    add_parallel(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Load the recipe and the model, run the job, print the report and the files written.

    Args:
        args: the parsed command line.
    """
    import torch

    from compress.job import run_job
    from compress.recipe import load_recipe
    from model import load
    from model.io import read_manifest

    recipe = load_recipe(args.recipe, args.set)  # validated before the (slow) model load
    if args.overwrite and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--overwrite under torchrun would race the other ranks: delete OUT/work before launching")
    if args.overwrite:
        shutil.rmtree(args.out / "work", ignore_errors=True)
    torch.manual_seed(args.seed)
    student = load(args.student) if args.student else None
    teacher = load_source(args)
    manifest = read_manifest(args.model) if args.model else None  # a flashlite-pretrained model names its corpus
    result = run_job(
        recipe,
        teacher,
        args.out,
        student=student,
        seed=args.seed,
        device=args.device,
        parallel=args.parallel,
        pretraining=(manifest or {}).get("pretraining"),
    )
    if not result.files:  # a torchrun rank other than 0: rank 0 reports
        return 0
    print()
    print(result.files["markdown"].read_text())
    if result.onnx is not None:
        worst = max(result.onnx.parity.values(), default=0.0)
        print(f"ONNX export verified against PyTorch (max abs difference {worst:.2e}): {result.files['onnx']}")
    for name, path in result.files.items():
        print(f"{name:>15}: {path}")
    return 0

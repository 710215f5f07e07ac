"""`flashlite compress`: run a compression recipe on a model and print its report."""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import sys
from pathlib import Path

from compress.cli.common import HF_FAMILIES, add_parallel, add_source, load_source

# The seq2seq evaluation: sentences, tokens per sentence (also the new tokens generated), words masked.
SEQ2SEQ = dict(n=32, max_len=32, ratio=0.15)


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

    from compress.heads import adopt_heads
    from compress.job import run_job
    from compress.recipe import load_recipe
    from model import load

    recipe = load_recipe(args.recipe, args.set)  # validated before the (slow) model load
    if args.overwrite and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--overwrite under torchrun would race the other ranks: delete OUT/work before launching")
    if args.overwrite:
        shutil.rmtree(args.out / "work", ignore_errors=True)
    torch.manual_seed(args.seed)
    student = load(args.student) if args.student else None
    teacher = load_source(args)
    result = run_job(
        recipe,
        teacher,
        args.out,
        student=student,
        seed=args.seed,
        device=args.device,
        parallel=args.parallel,
    )
    if not result.files:  # a torchrun rank other than 0: rank 0 reports
        return 0
    if result.model.decoder is not None and "lm" in result.model.config.heads:
        start = teacher if student is None else adopt_heads(student, teacher, seed=args.seed)  # as run_job starts
        result.files.update(seq2seq_report(args, recipe, teacher, start, result))
    print()
    print(result.files["markdown"].read_text())
    if result.onnx is not None:
        worst = max(result.onnx.parity.values(), default=0.0)
        print(f"ONNX export verified against PyTorch (max abs difference {worst:.2e}): {result.files['onnx']}")
    for name, path in result.files.items():
        print(f"{name:>15}: {path}")
    return 0


def held_out_text(args: argparse.Namespace, recipe) -> tuple[list[str], str]:
    """(held-out documents, where they come from) for the seq2seq evaluation of a compression run.

    A model pretrained by flashlite (its manifest names the corpus, seed and holdout) gives the
    documents its pretraining held out; any other model, the recipe's held-out texts (the split
    `compress.job.recipe_batches` makes: the first of the texts shuffled with --seed).

    Args:
        args: the parsed command line. recipe: the loaded recipe.
    """
    from compress.evaluate import generation
    from compress.job import glue_sentences
    from model.data.corpus import load_corpus

    manifest = args.model / "manifest.json" if args.model else None
    pretraining = json.loads(manifest.read_text()).get("pretraining") if manifest and manifest.is_file() else None
    if pretraining and "corpus" in pretraining:
        corpus = pretraining["corpus"]
        documents = generation.held_out_documents(corpus, seed=pretraining["seed"], holdout=pretraining["holdout"])
        return documents, f"the held-out split of its pretraining corpus ({corpus or 'the built-in corpus'})"
    spec = recipe.data
    texts = glue_sentences(spec.glue_text, spec.glue_dir) if spec.glue_text else load_corpus(spec.corpus)
    random.Random(args.seed).shuffle(texts)
    texts = texts[: spec.limit]
    n_held = min(8 * spec.batch_size, max(spec.batch_size, len(texts) // 10))
    return texts[:n_held], f"the recipe's held-out texts ({spec.corpus or 'the built-in corpus'})"


def seq2seq_report(args: argparse.Namespace, recipe, teacher, start, result) -> dict[str, Path]:
    """Add ROUGE/BLEU of the seq2seq head (teacher, each stage, the Lite ONNX rows) to the job's report.

    The task is the decoder's pretraining one (`generation.denoising`): rebuild held-out
    sentences from copies with some of their words masked, greedy, as small as `make demo` affords.

    Args:
        args: the parsed command line. recipe: the loaded recipe. teacher: the input model.
        start: the model the passes started from (the teacher, or the --student with its heads).
        result: run_job's result, whose report is rewritten.
    """
    from compress.evaluate import generation
    from compress.evaluate.deploy import TEACHER
    from compress.report import add_generation

    documents, where = held_out_text(args, recipe)
    settings = dict(max_new_tokens=SEQ2SEQ["max_len"], max_len=SEQ2SEQ["max_len"])
    try:
        sources, references, options = generation.denoising(documents, teacher.tokenizer, seed=args.seed, **SEQ2SEQ)
    except ValueError as err:  # held-out text without a sentence of the task's length: the rest of the report stands
        print(f"flashlite compress: the seq2seq head is not scored: {err}", file=sys.stderr)
        return {}
    evaluate = functools.partial(
        generation.evaluate, sources=sources, references=references, tokenizer=teacher.tokenizer, **settings, **options
    )
    names = [row["name"] for row in json.loads(result.files["json"].read_text())["stages"]]
    models = [start, *result.pipeline.stage_models(args.out / "work")[:-1], result.model]
    onnx = {}
    if result.onnx is not None:
        onnx["Lite, ONNX"] = result.onnx.paths["encoder"]
        onnx |= {f"Lite, ONNX {mode}": variant.paths["encoder"] for mode, variant in result.onnx.quantized.items()}
    models += [teacher if name == TEACHER else onnx.get(name) for name in names[len(models) :]]
    masked = any(teacher.tokenizer.token_to_id(t) is not None for t in generation.MASK_TOKENS)
    copies = (
        f"copies with {SEQ2SEQ['ratio']:.0%} of their words masked" if masked else "unmasked copies (no mask token)"
    )
    note = (
        f"rouge1/rouge2/rougeL (F-measure, 0-1) and bleu (corpus BLEU, 0-100): the seq2seq head rebuilds "
        f"{len(sources)} sentences of {where} from {copies} (greedy, up to {settings['max_new_tokens']} new tokens)."
    )
    return add_generation(args.out, models, evaluate, note=note)

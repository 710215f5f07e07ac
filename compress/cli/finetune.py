"""`flashlite finetune`: fine-tune a model on a GLUE task or SQuAD, report dev metrics, save it."""

from __future__ import annotations

import argparse
from pathlib import Path

from compress.cli.common import (
    DATA_HELP,
    DEV_ARTICLES_HELP,
    TASK_HELP,
    TASKS,
    add_parallel,
    add_source,
    check_max_len,
    load_source,
    positive_int,
    print_table,
    progress,
    squad_data,
    task_head,
)


def add_parser(commands) -> None:
    """Register the `finetune` subcommand.

    Args:
        commands: the top-level parser's subparsers.
    """
    p = commands.add_parser(
        "finetune",
        help="fine-tune a model on a GLUE task or SQuAD and report dev metrics",
        description="Attach the task's head if the model lacks it (classify for GLUE, qa for SQuAD), "
        "fine-tune, evaluate on dev, and save the model with the dev metrics in manifest.json.",
    )
    p.add_argument("--task", required=True, choices=TASKS, metavar="TASK", help=TASK_HELP)
    add_source(p, required=True)
    p.add_argument("--data", type=Path, required=True, help=DATA_HELP)
    p.add_argument("--out", type=Path, required=True, help="the model folder to write")
    p.add_argument("--steps", type=positive_int, default=300, help="optimizer steps (default: 300)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate (default: 5e-5)")
    p.add_argument("--max-len", type=positive_int, default=128, help="tokens per example (default: 128)")
    p.add_argument(
        "--train-rows", type=positive_int, default=None, help="train on a random subset of N rows (default: all)"
    )
    p.add_argument("--dev-articles", type=positive_int, default=1, help=DEV_ARTICLES_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    add_parallel(p)
    p.set_defaults(run=run)


def with_head(model, task: str, *, seed: int):
    """The model with the task's head ("classify" of the task's width, or "qa" for SQuAD); (model, note).

    A model that already has it is returned as it is. Otherwise an encoder-only copy is built
    whose heads are just that one, freshly initialised (seeded): the encoder, embeddings and a
    pooler it already has keep their weights; other heads and the decoder are dropped.

    Args:
        model: the loaded model.
        task: a name from TASKS.
        seed: the seed of the new head's initialisation.
    """
    import torch

    from model.rebuild import rebuild
    from model.transformer import Transformer

    config = model.config
    head, n_labels = task_head(task)
    if head in config.heads and (head == "qa" or config.n_labels == n_labels):
        return model, None
    if config.quantized:
        raise ValueError(f"the model is quantized and has no {head!r} head for {task}: fine-tune before quantizing")
    new_config = config.replace(heads=(head,), n_labels=n_labels, decoder=(), decoder_share=None)
    with torch.device("meta"):
        wanted = Transformer(new_config, attention_backend=model.attention_backend).state_dict()
    state = {k: v for k, v in model.state_dict().items() if k in wanted and not k.startswith("heads.")}
    optional = ("heads.", "pooler.")
    missing = [k for k in wanted if k not in state and not k.startswith(optional)]
    if missing:
        raise RuntimeError(f"attaching the {head!r} head left weights without values: {missing[:5]}")
    torch.manual_seed(seed)
    fresh = rebuild(model, new_config, state, optional=optional)
    dropped = [h for h in config.heads if h != head] + (["decoder"] if config.decoder else [])
    note = f"attached a new {head!r} head" + (f" ({n_labels} outputs)" if n_labels else "")
    return fresh.eval(), note + (f", dropped {', '.join(dropped)}" if dropped else "")


def load_rows(args: argparse.Namespace) -> tuple[list[dict], list[dict] | None]:
    """(training rows, SQuAD dev rows or None for GLUE), subsampled to --train-rows; checked before the model loads.

    Args:
        args: the parsed command line.
    """
    import numpy as np

    from compress.evaluate import glue

    dev_rows = None
    if args.task == "squad":
        train_rows, dev_rows = squad_data(args.data, args.dev_articles)
    else:
        train_rows = glue.load(args.task, "train", args.data)  # FileNotFoundError naming the expected file and layout
        glue.load(args.task, "dev", args.data)  # checked before the (slow) model load and training
    if args.train_rows is not None and args.train_rows < len(train_rows):
        keep = np.random.default_rng(args.seed).permutation(len(train_rows))[: args.train_rows]
        train_rows = [train_rows[i] for i in sorted(keep)]
    return train_rows, dev_rows


def run(args: argparse.Namespace) -> int:
    """Fine-tune on --task, evaluate on its dev split, print the metrics and save the model to --out.

    Args:
        args: the parsed command line.
    """
    import torch

    from compress.evaluate import glue, squad
    from model import save
    from model.training.distributed import is_main

    train_rows, dev_rows = load_rows(args)
    head, n_labels = task_head(args.task)
    torch.manual_seed(args.seed)  # a head from_hf adds is initialised from it
    model, note = with_head(load_source(args, heads=(head,), n_labels=n_labels), args.task, seed=args.seed)
    glue.tokenizer_of(model, None)  # ValueError before training when the model has no tokenizer
    check_max_len(model, args.max_len)
    if note:
        print(note)
    options = dict(
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        max_len=args.max_len,
        seed=args.seed,
        device=args.device,
        parallel=args.parallel,
        progress=progress(),
    )
    if args.task == "squad":
        squad.finetune(model, train_rows, doc_stride=args.max_len // 2, **options)
        if not is_main():
            return 0
        metrics = squad.evaluate(
            model, dev_rows, max_len=args.max_len, doc_stride=args.max_len // 2, progress=progress()
        )
        split = f"{len(dev_rows)} held-out questions ({args.dev_articles} article(s))"
    else:
        glue.finetune(model, args.task, train_rows, **options)
        if not is_main():  # a torchrun rank other than 0: rank 0 reports and saves
            return 0
        metrics = glue.evaluate(model, args.task, "dev", args.data, max_len=args.max_len, progress=progress())
        split = "dev"
    print(f"\nfine-tuned on {args.task} ({len(train_rows)} training rows, {args.steps} steps); {split}:")
    print_table(metrics, "metric")
    record = {k: getattr(args, k) for k in ("task", "steps", "batch_size", "lr", "max_len", "seed")}
    record.update(source=str(args.model or args.hf), train_rows=len(train_rows), dev=metrics)
    save(model.cpu(), args.out, manifest={"finetune": record})
    print(f"saved the model to {args.out}/ (dev metrics in manifest.json)")
    return 0

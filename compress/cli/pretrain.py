"""`flashlite pretrain`: pretrain a fresh model, report held-out losses, save it with its loss curve."""

from __future__ import annotations

import argparse
from pathlib import Path

from compress.cli.common import add_parallel, positive_int


def add_parser(commands) -> None:
    """Register the `pretrain` subcommand.

    Args:
        commands: the top-level parser's subparsers.
    """
    p = commands.add_parser(
        "pretrain",
        help="pretrain a model on the built-in corpus or your text",
        description="Pretrain a fresh model with MLM, sentence-pair (SOP/NSP) and denoising objectives.",
    )
    p.add_argument("--preset", default="full", choices=["full", "tiny"], help="model size (default: full)")
    p.add_argument("--corpus", default=None, help="text file, JSONL file or folder (default: the built-in corpus)")
    p.add_argument("--steps", type=positive_int, default=300, help="optimizer steps (default: 300)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--max-len", type=positive_int, default=128, help="tokens per sequence (default: 128)")
    p.add_argument(
        "--pair-task", default="sop", choices=["sop", "nsp", "none"], help="sentence-pair objective (default: sop)"
    )
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    add_parallel(p)
    p.add_argument(
        "--checkpoint-every", type=int, default=0, help="steps between checkpoints in OUT/checkpoints (0 = at the end)"
    )
    p.add_argument("--out", type=Path, default=None, help="folder to save the model in (resumes its checkpoints)")
    p.set_defaults(run=run)


def plot_losses(losses: list[float], path: Path) -> None:
    """Training loss per step with a moving average, written as a PNG.

    Args:
        losses: the loss of each step.
        path: the PNG file to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, alpha=0.3, label="loss")
    ax.plot(range(1, len(losses) + 1), smooth, label=f"moving average ({window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (sum of objectives)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args: argparse.Namespace, result) -> None:
    """Print the model's size, the throughput and the held-out and training losses before and after.

    Args:
        args: the parsed command line.
        result: pretrain()'s result.
    """
    model, run = result.model, result.train
    params = sum(p.numel() for p in model.parameters())
    print(
        f"\npretrained preset {args.preset!r}: {params / 1e6:.1f}M parameters (vocabulary {model.config.vocab_size}), "
        f"{len(run.losses)} steps" + (f" (resumed at step {run.resumed_from})" if run.resumed_from else "")
    )
    if run.seconds:
        print(f"this run: {run.tokens_per_second:.0f} tokens/s over {run.seconds:.0f} s")
    print(f"{'held-out loss':<14} {'before':>8} {'after':>8}")
    for name, after in result.eval_after.items():
        print(f"{name:<14} {result.eval_before[name]:>8.3f} {after:>8.3f}")
    window = max(1, min(20, len(run.losses) // 4))
    first, last = run.losses[:window], run.losses[-window:]
    print(
        f"training loss (all objectives): {sum(first) / len(first):.3f} over the first {window} steps, "
        f"{sum(last) / len(last):.3f} over the last {window}"
    )


def run(args: argparse.Namespace) -> int:
    """Pretrain, report, and save to --out (model, manifest, loss.png) when given.

    Args:
        args: the parsed command line.
    """
    from model import save
    from model.config import Config
    from model.training.distributed import is_main
    from model.training.pretrain import HOLDOUT, pretrain

    config = Config.preset(args.preset)
    result = pretrain(
        config,
        args.corpus,
        steps=args.steps,
        batch_size=args.batch_size,
        max_len=args.max_len,
        pair_task=None if args.pair_task == "none" else args.pair_task,
        lr=args.lr,
        seed=args.seed,
        holdout=HOLDOUT,
        checkpoint_dir=str(args.out / "checkpoints") if args.out else None,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
        parallel=args.parallel,
    )
    if not is_main():  # a torchrun rank other than 0: rank 0 reports and saves
        return 0
    report(args, result)
    if args.out:
        manifest = {
            "pretraining": {
                "preset": args.preset,
                # with seed and holdout, the held-out split that `flashlite compress` evaluates generation on
                "corpus": str(Path(args.corpus).resolve()) if args.corpus else None,
                "holdout": HOLDOUT,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "max_len": args.max_len,
                "pair_task": args.pair_task,
                "seed": args.seed,
                "tokens_per_second": result.train.tokens_per_second,
                "held_out_before": result.eval_before,
                "held_out_after": result.eval_after,
            }
        }
        save(result.model, args.out, manifest=manifest)
        plot_losses(result.train.losses, args.out / "loss.png")
        print(f"saved the model to {args.out}/ and the loss curve to {args.out / 'loss.png'}")
    return 0

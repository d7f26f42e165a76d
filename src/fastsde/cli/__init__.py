"""The `fastsde` command line: one module per subcommand, each exposing
``add_parser(subparsers)`` which registers the subcommand and sets ``func(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import sys

# One line per subcommand module (fastsde.cli.<name>).
SUBCOMMANDS = ("sample", "train", "likelihood", "bench", "fit_iia")


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastsde", description="Sample score-based diffusion models with few network evaluations."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"fastsde.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"fastsde.cli.{name}":
                continue  # subcommand not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        print(f"fastsde {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

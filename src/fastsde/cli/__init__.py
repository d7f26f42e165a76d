"""The `fastsde` command line: one module per subcommand, each exposing
``add_parser(subparsers)`` which registers the subcommand and sets ``func(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import sys

# One line per subcommand module (fastsde.cli.<name>).
SUBCOMMANDS = ("sample", "train", "likelihood", "bench", "fit_iia", "fit_mlem", "fit_grid", "tune")


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
    parser.subcommands = sub.choices  # name -> subparser, for errors in a subcommand's own terms
    return parser


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (library messages may quote multi-line details)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Exit status: 0 done, 2 bad input or a solve that could not finish (one
    line on stderr, no traceback), 130 interrupted (Ctrl-C), 141 output pipe closed (``| head``)."""
    from ..score import NonFiniteScoreError
    from ..solvers.core.driver import IntegrationError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if extra:  # let the subcommand's parser say it, with its own usage line
        parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command, for the records outputs carry
    if _stdout_closed():  # `fastsde ... >&-`: say so before any work rather than fail when printing
        print(
            f"fastsde {args.command}: error: standard output is closed; redirect it (>/dev/null) instead of closing it",
            file=sys.stderr,
        )
        return 2
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush
        return status
    except (
        CLIError,
        ValueError,
        OSError,
        IntegrationError,
        NonFiniteScoreError,
    ) as exc:
        if isinstance(exc, BrokenPipeError):
            return _broken_pipe()
        if _stdout_closed():  # stdout went away mid-run (closed descriptor): no second error at exit
            _broken_pipe()
        print(f"fastsde {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastsde {args.command}: interrupted", file=sys.stderr)
        return 130


def _stdout_closed() -> bool:
    """Whether stdout cannot be written: None (the process started with it closed), a closed file
    object, or a descriptor that no longer accepts writes (a flush fails)."""
    out = sys.stdout
    if out is None or getattr(out, "closed", False):
        return True
    try:
        out.flush()
    except BrokenPipeError:  # a reader that left (`| head`): the run's own path stops quietly
        return False
    except (OSError, ValueError):
        return True
    return False


def _broken_pipe() -> int:
    """The reader of stdout went away (``fastsde ... | head -2``): stop quietly. stdout is pointed
    at /dev/null so that the interpreter's final flush does not raise again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no descriptor to point (None, or a closed object)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives until the interpreter exits
    return 141


if __name__ == "__main__":
    sys.exit(main())

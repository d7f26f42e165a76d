"""Checks every command makes before any compute, so that a user error is one line and exit status 2
and never a traceback, a huge allocation, or an error found only after the work:

- sizes and step counts within the limits below (each message states its limit);
- ``--device``: a device that exists on this machine (never 'meta');
- outputs: a file or folder that can be created, tested by creating (and removing) a file where it goes;
- input files: read inside :func:`reading`, which turns whatever a malformed file makes a loader raise
  into one line naming the flag, the file and what was expected.

Limits (why):

- ``MAX_STEPS`` = 100 000 grid points / solver steps: far beyond any use (1000 is EM's default), while a
  typo like 1e11 would allocate terabytes for the time grid.
- ``MAX_N`` = 10**8 samples (rows) in one in-memory run, and at most ``MAX_BYTES`` = 4 GiB for the array
  of all samples (n x prod(shape) x itemsize): a result must fit in memory next to the model. A run
  folder (``--out DIR/``) writes shard by shard and allows ``MAX_SHARDED_N`` = 10**10 samples in at most
  ``MAX_SHARDS`` = 100 000 shards, each shard within ``MAX_BYTES``.
- ``MAX_PNG`` = 65 536 images in a PNG grid (a 256 x 256 grid); more belong in an .npz or a run folder.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import CLIError

MAX_STEPS = 100_000
MAX_N = 10**8
MAX_SHARDED_N = 10**10
MAX_SHARDS = 100_000
MAX_BYTES = 4 * 2**30
MAX_PNG = 65_536


def check_int(flag: str, value: Any, low: int = 1, high: int | None = None, hint: str = "") -> int:
    """``value`` as an int in [low, high]; else a CLIError naming ``flag``, the value and the range."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        want = f"an integer >= {low}" + ("" if high is None else f" and <= {high}")
        raise CLIError(f"{flag} must be {want}{hint}, got {value!r}")
    return value


def check_number(
    flag: str, value: Any, low: float | None = None, high: float | None = None, *, open_low: bool = False
) -> float:
    """``value`` as a finite float in [low, high] (or (low, high] with ``open_low``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        want = (
            f"a finite number in {'(' if open_low or low is None else '['}{lo}, {hi}{']' if high is not None else ')'}"
        )
        raise CLIError(f"{flag} must be {want}, got {value!r}")
    return float(value)


def check_memory(what: str, count: int, shape: tuple[int, ...], itemsize: int, hint: str = "") -> None:
    """Refuse ``count`` arrays of ``shape`` whose total size exceeds MAX_BYTES (before allocating them)."""
    size = count * math.prod(shape) * itemsize
    if size > MAX_BYTES:
        raise CLIError(
            f"{what}: {count} x {tuple(shape)} x {itemsize} bytes = {size / 2**30:.3g} GiB exceeds the limit of "
            f"{MAX_BYTES / 2**30:g} GiB for one array in memory{hint}"
        )


def check_device(name: str, flag: str = "--device") -> Any:
    """``--device`` as a torch.device that exists here (``fastsde.api.check_device``: cpu, an available
    cuda index, or mps; 'meta' and other backends are refused: they would fail, or compute nothing, only
    after the work), a CLIError naming the flag otherwise."""
    from ..api import check_device as library_check

    try:
        return library_check(name, flag)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def _writable_folder(folder: Path, flag: str, shown: str) -> None:
    """A file can be created in ``folder`` (which exists); nothing is left behind."""
    from ..files import check_writable

    try:
        check_writable(folder / ".fastsde-write-check")
    except OSError as exc:
        raise CLIError(f"{flag} {shown!r}: cannot write in folder {str(folder)!r} ({exc.strerror or exc})") from None


def check_out_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """An output file that can be created (its folder exists and is writable; it is not a folder)."""
    out = Path(path)
    shown = str(path)
    if str(path).endswith(("/", "\\")) or out.is_dir():
        raise CLIError(f"{flag} {shown!r} is a folder; give a file name")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise CLIError(f"{flag} {shown!r}: folder {str(folder)!r} does not exist")
    from ..files import check_writable

    try:
        check_writable(out)  # its message names the file: "cannot write '<out>': <reason>"
    except OSError as exc:
        raise CLIError(str(exc)) from None
    return out


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """An output folder that exists and is writable, or that can be created: its nearest existing
    ancestor is a writable folder. Nothing is created here (a later error must leave no folder)."""
    out = Path(path)
    shown = str(path)
    if out.exists():
        if not out.is_dir():
            raise CLIError(f"{flag} {shown!r} is a file, not a folder")
        _writable_folder(out, flag, shown)
        return out
    probe = out.absolute().parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise CLIError(f"{flag} {shown!r}: cannot create the folder, {str(probe)!r} is a file")
    _writable_folder(probe, flag, shown)
    return out


def _file_errors() -> tuple[type[BaseException], ...]:
    """What a loader can raise on a malformed file: format errors (ValueError, the readers' own) and
    what a wrong-typed or missing field makes plain code raise (KeyError, TypeError, ...)."""
    import zipfile

    errors: list[type[BaseException]] = [
        ValueError,
        OSError,
        EOFError,
        KeyError,
        IndexError,
        TypeError,
        AttributeError,
        OverflowError,
        ZeroDivisionError,
        MemoryError,
        RuntimeError,  # torch: a state dict that does not fit the network, a tensor of the wrong size
        zipfile.BadZipFile,
    ]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors is a dependency
        pass
    return tuple(errors)


@contextmanager
def reading(flag: str, path: Any, what: str) -> Iterator[None]:
    """Read an input file given on the command line: any failure a malformed file can cause is one
    CLIError naming ``flag``, the file and ``what`` it should be. CLIErrors pass through unchanged."""
    try:
        yield
    except CLIError:
        raise
    except _file_errors() as exc:
        detail = " ".join(str(exc).split())
        if not isinstance(exc, (ValueError, OSError)) or not detail:  # a bare KeyError says only the key
            detail = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        where = f"{flag} {str(path)!r}" if flag else repr(str(path))
        if str(path) in detail:
            raise CLIError(f"{flag + ': ' if flag else ''}{detail}"[:2000]) from None
        raise CLIError(f"{where}: not {what} ({detail})"[:2000]) from None


def fit_model(name: str, device: Any = None) -> tuple[Any, Any, tuple[int, ...], Any]:
    """(process, score, shape of one sample, dtype) of --model for the fitting commands (fit-iia, fit-grid,
    tune): the exact 2-D mixture in float64, or a shipped / trained model in float32, its network moved to
    ``device`` when one is given."""
    import torch

    import fastsde

    if name == "mixture":
        sde = fastsde.VPSDE()
        gm = fastsde.problems.mixture_2d(sde)
        return sde, gm.score, tuple(gm.shape), torch.float64
    if name in fastsde.list_models() or (name.strip() and Path(name).is_dir()):
        with reading("--model", name, "a model (a shipped name or a folder written by `fastsde train`)"):
            model = fastsde.load_model(name)
            if device is not None:
                model.network.to(device)
        return model.sde, model.score, tuple(model.shape), torch.float32
    raise CLIError(
        f"unknown model {name!r}; available: {', '.join(fastsde.list_models() + ['mixture'])}, "
        "or the path of a model folder"
    )

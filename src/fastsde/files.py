"""Writing output files whole or not at all.

Every file fastsde writes (samples, pictures, records, checkpoints) goes to a temporary name in the
target's folder and is renamed over the target once complete (``os.replace`` is atomic within a
folder), so an interrupted or failed write never leaves a truncated file where a good one was.
``check_writable`` tries to create a file next to the target before any compute: ``os.access`` says
yes to root for any path, so only creating something is a real test.

Every file fastsde reads is checked field by field when it is read, before any compute: a bad file is
a :class:`FileFormatError` (a ValueError, so the CLI prints one line and exits 2) naming the file, the
field, what was expected and what was found. :class:`Fields` reads one JSON object of a file as a
short schema; :func:`check_tensor` checks a tensor's dtype, shape and finiteness.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .sde import sde_from_config

__all__ = [
    "atomic_path",
    "write_atomic",
    "write_text_atomic",
    "write_json_atomic",
    "check_writable",
    "FileFormatError",
    "Fields",
    "check_tensor",
    "read_json",
    "save_tensors_with_meta",
    "read_tensors_with_meta",
]


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder (same suffix, so writers that pick the format
    from the name keep working); on success it replaces ``target``, on error it is removed."""
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=f".tmp{target.suffix}")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _file_mode(target))  # mkstemp makes 0600; give the mode a plain open would
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _file_mode(target: Path) -> int:
    """The existing target's mode, or 0666 less the umask for a new file."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def write_atomic(target: str | Path, writer: Callable[[Path], Any]) -> None:
    """Call ``writer(path)`` on a temporary path, then rename it over ``target``."""
    with atomic_path(target) as tmp:
        writer(tmp)


def write_text_atomic(target: str | Path, text: str) -> None:
    """Write text whole or not at all."""
    write_atomic(target, lambda p: p.write_text(text, encoding="utf-8"))


def write_json_atomic(target: str | Path, data: Any, indent: int | None = 2) -> None:
    """Write a JSON document whole or not at all."""
    write_text_atomic(target, json.dumps(data, indent=indent) + "\n")


def check_writable(target: str | Path) -> None:
    """Raise PermissionError / FileNotFoundError / IsADirectoryError (naming ``target``) unless a
    file can be created next to it and ``target`` is not a folder. Nothing is left behind."""
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise IsADirectoryError(f"cannot write {str(target)!r}: it is a folder")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {str(target)!r}: folder {str(folder)!r} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".check")
    except OSError as exc:
        raise PermissionError(f"cannot write {str(target)!r}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(tmp)


def save_tensors_with_meta(target: str | Path, tensors: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write float tensors plus a JSON record (safetensors metadata key "fastsde") whole or not at
    all: the file format of IIA tables, fitted grids, ML-EM schedules and training states (never pickle)."""
    from safetensors.torch import save

    path = Path(target)
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"fastsde": json.dumps(meta, sort_keys=True)})
    write_atomic(path, lambda tmp: tmp.write_bytes(data))
    return path


# ---------------------------------------------------------------------------------------------
# Reading files: one error type, small field validators
# ---------------------------------------------------------------------------------------------

#: The default of a validator: the field is required.
REQUIRED: Any = object()
_MISSING: Any = object()


def _show(v: Any) -> str:
    """A short description of a found value for an error message."""
    if v is _MISSING:
        return "nothing (the field is missing)"
    if hasattr(v, "shape") and hasattr(v, "dtype"):
        return f"a {str(v.dtype).removeprefix('torch.')} tensor of shape {tuple(v.shape)}"
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


class FileFormatError(ValueError):
    """A file fastsde reads is not what it should be. The message names the file, the field (when
    one is to blame), what was expected and what was found, e.g.
    ``runs/x/config.json: field 'flops_per_sample': expected a positive finite number, got 0``.
    A ValueError, so callers (and the CLI's one-line errors) treat it as bad input."""

    def __init__(
        self,
        path: str | Path,
        field: str | None,
        expected: str,
        got: Any = _MISSING,
        *,
        what: str = "",
        context: str = "",
        message: str | None = None,
    ) -> None:
        self.path, self.field, self.expected = str(path), field, expected
        if message is None and field is not None:
            message = f"{self.path}: field {field!r}: expected {expected}, got {_show(got)}"
        elif message is None:
            message = f"{self.path} is not {what or 'a readable file'}: {expected}"
        self.context = context
        super().__init__(f"{context}: {message}" if context else message)

    def within(self, context: str) -> FileFormatError:
        """The same error with its message prefixed by ``context`` (e.g. "model 'digits'")."""
        body = str(self)
        return FileFormatError(self.path, self.field, self.expected, context=context, message=body)


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f" {'<' if high_open else '<='} {high:g}"
    return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_number(
    path: str | Path,
    field: str,
    v: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
) -> float:
    """A real number (not a bool, not a string) as a float, finite unless ``finite=False`` and
    within the bounds given; otherwise a FileFormatError."""
    kind = "a finite number" if finite else "a number"
    if low == 0 and low_open and high is None:
        kind, low = ("a positive finite number" if finite else "a positive number"), None
    expected = kind + _range_text(low, high, low_open, high_open)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise FileFormatError(path, field, expected, v)
    try:
        x = float(v)
    except OverflowError:  # an int too large for a float
        raise FileFormatError(path, field, expected, v) from None
    if kind.startswith("a positive"):
        low, low_open = 0.0, True
    bad = (finite and not math.isfinite(x)) or (math.isnan(x) and (low is not None or high is not None))
    if low is not None and not math.isnan(x):
        bad = bad or (x <= low if low_open else x < low)
    if high is not None and not math.isnan(x):
        bad = bad or (x >= high if high_open else x > high)
    if bad:
        raise FileFormatError(path, field, expected, v)
    return x


def check_int(path: str | Path, field: str, v: Any, *, low: int | None = None, high: int | None = None) -> int:
    """An integer (a JSON integer: not a bool, not 3.0) within [low, high]; otherwise a FileFormatError."""
    ok = isinstance(v, int) and not isinstance(v, bool)
    if not ok or (low is not None and v < low) or (high is not None and v > high):
        if low is not None and high is not None:
            expected = f"an integer in [{low}, {high}]"
        elif low is not None:
            expected = f"an integer >= {low}"
        else:
            expected = "an integer" if high is None else f"an integer <= {high}"
        raise FileFormatError(path, field, expected, v)
    return int(v)


def check_string(path: str | Path, field: str, v: Any, choices: Sequence[str] | None = None) -> str:
    """A string (one of ``choices`` when given); otherwise a FileFormatError."""
    if not isinstance(v, str) or (choices is not None and v not in choices):
        raise FileFormatError(path, field, "a string" if choices is None else f"one of {sorted(choices)}", v)
    return v


class Fields:
    """Typed reads of one JSON object of a file: each read names the file and the field (dotted
    from the file's top: ``key.process.beta_min``, ``costs[1]``) when it fails. Every reader takes
    ``default``: without it the field is required."""

    def __init__(self, path: str | Path, data: Any, prefix: str = "") -> None:
        if not isinstance(data, dict):
            if prefix:
                raise FileFormatError(path, prefix, "a JSON object", data)
            raise FileFormatError(path, None, f"expected a JSON object, got {_show(data)}", what="the expected file")
        self.path, self.data, self.prefix = str(path), data, prefix

    def name(self, key: str) -> str:
        """The dotted name of ``key`` in this object."""
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, key: str, expected: str, got: Any = _MISSING) -> FileFormatError:
        """A FileFormatError for ``key`` of this object (for checks across fields)."""
        return FileFormatError(self.path, self.name(key), expected, got)

    def raw(self, key: str, default: Any = REQUIRED, expected: str = "a value") -> Any:
        """The value as stored; a missing required field is an error."""
        if key in self.data:
            return self.data[key]
        if default is REQUIRED:
            raise self.error(key, expected)
        return default

    def obj(self, key: str, default: Any = REQUIRED) -> Fields:
        """A nested JSON object as Fields (``default``: a dict used when the field is missing)."""
        v = self.raw(key, default, "a JSON object")
        return Fields(self.path, v, self.name(key))

    def number(self, key: str, default: Any = REQUIRED, **bounds: Any) -> float:
        """A number (see :func:`check_number` for ``low``, ``high``, ``low_open``, ``high_open``, ``finite``)."""
        v = self.raw(key, default, "a number")
        return v if v is default and default is not REQUIRED else check_number(self.path, self.name(key), v, **bounds)

    def positive(self, key: str, default: Any = REQUIRED) -> float:
        """A positive finite number."""
        return self.number(key, default, low=0.0, low_open=True)

    def integer(self, key: str, default: Any = REQUIRED, low: int | None = None, high: int | None = None) -> int:
        """An integer within [low, high]."""
        v = self.raw(key, default, "an integer")
        return (
            v
            if v is default and default is not REQUIRED
            else check_int(self.path, self.name(key), v, low=low, high=high)
        )

    def string(self, key: str, default: Any = REQUIRED, choices: Sequence[str] | None = None) -> str:
        """A string, one of ``choices`` when given."""
        v = self.raw(key, default, "a string")
        return v if v is default and default is not REQUIRED else check_string(self.path, self.name(key), v, choices)

    def boolean(self, key: str, default: Any = REQUIRED) -> bool:
        """true or false."""
        v = self.raw(key, default, "true or false")
        if v is default and default is not REQUIRED:
            return v
        if not isinstance(v, bool):
            raise self.error(key, "true or false", v)
        return v

    def items(self, key: str, default: Any = REQUIRED, length: int | None = None, min_length: int = 0) -> list:
        """A JSON list (of ``length`` items, or at least ``min_length``), items unchecked."""
        want = (
            f"a list of {length} items"
            if length is not None
            else "a list" + (f" of >= {min_length} items" if min_length else "")
        )
        v = self.raw(key, default, want)
        if v is default and default is not REQUIRED:
            return v
        if not isinstance(v, list) or (length is not None and len(v) != length) or len(v) < min_length:
            raise self.error(key, want, v)
        return v

    def numbers(
        self, key: str, default: Any = REQUIRED, length: int | None = None, min_length: int = 0, **bounds: Any
    ) -> list[float]:
        """A list of numbers, each checked like :meth:`number`."""
        v = self.items(key, default, length, min_length)
        if v is default and default is not REQUIRED:
            return v
        return [check_number(self.path, f"{self.name(key)}[{i}]", x, **bounds) for i, x in enumerate(v)]

    def integers(
        self,
        key: str,
        default: Any = REQUIRED,
        length: int | None = None,
        min_length: int = 0,
        low: int | None = None,
        high: int | None = None,
    ) -> list[int]:
        """A list of integers within [low, high]."""
        v = self.items(key, default, length, min_length)
        if v is default and default is not REQUIRED:
            return v
        return [check_int(self.path, f"{self.name(key)}[{i}]", x, low=low, high=high) for i, x in enumerate(v)]

    def strings(
        self,
        key: str,
        default: Any = REQUIRED,
        length: int | None = None,
        min_length: int = 0,
        choices: Sequence[str] | None = None,
    ) -> list[str]:
        """A list of strings (each one of ``choices`` when given)."""
        v = self.items(key, default, length, min_length)
        if v is default and default is not REQUIRED:
            return v
        return [check_string(self.path, f"{self.name(key)}[{i}]", x, choices) for i, x in enumerate(v)]

    def process(self, key: str) -> Any:
        """A process config (``sde.config()``) rebuilt as the SDE it describes."""
        cfg = self.obj(key)
        try:
            return sde_from_config(cfg.data)
        except (TypeError, ValueError, KeyError, OverflowError, RuntimeError) as exc:
            raise self.error(key, f"a process config (sde.config()): {exc}", cfg.data) from None


def check_tensor(
    path: str | Path,
    tensors: dict[str, Any],
    name: str,
    shape: Sequence[int | None] | None = None,
    *,
    finite: bool = True,
    required: bool = True,
) -> Any:
    """``tensors[name]`` as float64: a floating tensor of ``shape`` (None: any size on that axis)
    with finite values; None when absent and not required; otherwise a FileFormatError."""
    import torch

    want = "a floating tensor" + (
        "" if shape is None else f" of shape ({', '.join('n' if s is None else str(s) for s in shape)})"
    )
    if name not in tensors:
        if not required:
            return None
        raise FileFormatError(path, name, want)
    t = tensors[name]
    ok = isinstance(t, torch.Tensor) and t.dtype.is_floating_point
    if ok and shape is not None:
        ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
    if not ok:
        raise FileFormatError(path, name, want, t)
    t = t.to(torch.float64)
    if finite and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise FileFormatError(path, name, f"finite values ({want})", f"{bad} NaN or infinite value(s)")
    return t


def read_json(path: str | Path, what: str) -> Any:
    """The JSON document in ``path``; an unreadable or non-JSON file is a FileFormatError."""
    p = Path(path)
    try:
        return json.loads(p.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FileFormatError(p, None, f"not valid UTF-8 JSON ({exc})", what=what) from None


def read_tensors_with_meta(data: bytes, where: str, fmt: str, what: str, required: str) -> tuple[dict, Fields]:
    """(tensors, record) of bytes written by :func:`save_tensors_with_meta`: the record as
    :class:`Fields`. A FileFormatError naming ``where`` and ``what`` when the bytes are not a
    safetensors file with a JSON record of format ``fmt`` holding the tensor ``required``."""
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types (and others) on junk
        raise FileFormatError(where, None, f"not a safetensors file ({str(exc)[:200]})", what=what) from None
    try:  # safetensors checked the header: a JSON object whose __metadata__ maps strings to strings
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        text = (header.get("__metadata__") or {}).get("fastsde")
        meta = json.loads(text) if isinstance(text, str) else None
    except (ValueError, AttributeError, RecursionError) as exc:
        raise FileFormatError(where, None, f"its fastsde record is not JSON ({exc})", what=what) from None
    if meta is None:
        raise FileFormatError(where, None, f"no fastsde record (format {fmt!r} expected)", what=what)
    if not isinstance(meta, dict):
        raise FileFormatError(where, None, f"its fastsde record is not a JSON object, got {_show(meta)}", what=what)
    record = Fields(where, meta)
    if meta.get("format") != fmt:
        raise FileFormatError(
            where, None, f"format {fmt!r} expected, got {_show(meta.get('format', _MISSING))}", what=what
        )
    if required not in tensors:
        raise FileFormatError(where, required, "a floating tensor")
    return tensors, record

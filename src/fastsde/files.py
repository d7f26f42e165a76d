"""Writing output files whole or not at all.

Every file fastsde writes (samples, pictures, records, checkpoints) goes to a temporary name in the
target's folder and is renamed over the target once complete (``os.replace`` is atomic within a
folder), so an interrupted or failed write never leaves a truncated file where a good one was.
``check_writable`` tries to create a file next to the target before any compute: ``os.access`` says
yes to root for any path, so only creating something is a real test.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "write_atomic", "write_text_atomic", "write_json_atomic", "check_writable"]


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
    all: the file format of IIA tables, fitted grids and ML-EM schedules (never pickle)."""
    from safetensors.torch import save

    path = Path(target)
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"fastsde": json.dumps(meta, sort_keys=True)})
    write_atomic(path, lambda tmp: tmp.write_bytes(data))
    return path


def read_tensors_with_meta(data: bytes, where: str, fmt: str, what: str, required: str) -> tuple[dict, dict]:
    """(tensors, record) of bytes written by :func:`save_tensors_with_meta`; a ValueError naming
    ``where`` and ``what`` when they are not such a file of format ``fmt`` holding ``required``."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8 : 8 + n]).get("__metadata__", {}).get("fastsde", "null"))
    except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where} is not {what} ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt or required not in tensors:
        raise ValueError(f"{where} is not {what} (format {fmt!r} expected)")
    return tensors, meta

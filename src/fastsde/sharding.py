"""Sharded, resumable sampling: ``sample_to_dir`` writes a run of n samples as fixed-size shards of
consecutive indices plus a manifest; ``load_samples`` reads them back in index order.

Why this works for any number of workers: fastsde's noise is keyed by sample index
(:meth:`~fastsde.noise.NoiseSource.from_seed` with ``start``), so shard k, computed alone, holds
exactly rows [k·s, k·s + s) of ``fastsde.sample(..., seed=seed)``. A shard file is written to a
temporary name and renamed (``fastsde.files``), and carries the run's fingerprint, so a file that
exists, reads back whole and matches the manifest is done and never recomputed: rerunning the same
call resumes a killed job, losing at most the shards that were in progress. A rerun with different
settings into the same folder is refused, naming the fields that differ. The model is part of
those settings by content (``fastsde.identity``): every module's weights, tensor and plain parameter
reachable from the score, and for a score with no module in reach its outputs on fixed probe inputs,
so a folder resumed with retrained weights behind the same name is refused, not mixed.

One writer at a time: the writer (rank 0 under torchrun) holds an exclusive lock on the folder's
``.lock`` file for the whole run; a second writer is refused, naming the holder's pid. Progress is
appended to ``manifest.progress.jsonl`` (one line per shard) instead of rewriting the manifest per
shard; :func:`read_manifest` merges it, and the final manifest replaces it.

Under ``torchrun`` (RANK / WORLD_SIZE set) the shards still to do are dealt round-robin across ranks
(the j-th missing shard to rank j mod world): no padding, no duplicates, and a resumed run stays
balanced. Only rank 0 writes the manifest: after each of its own shards and, after a barrier, once
more with every shard's status and the run's summary.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .api import DEFAULT_SOLVER, _recordable, check_device, check_dtype, check_run, sample
from .files import Fields, write_atomic, write_json_atomic
from .guidance import with_null_rows
from .identity import content_digests, has_module, probe, probe_matches
from .noise import NoiseSource, check_seed
from .score import check_cond
from .sde import SDE
from .solvers import SolverSpec
from .solvers.base import as_python_number

__all__ = [
    "MANIFEST",
    "ShardInfo",
    "ShardRun",
    "sample_to_dir",
    "load_samples",
    "read_manifest",
    "score_identity",
    "model_probe",
    "device_for_rank",
]

#: the manifest's file name inside a run folder
MANIFEST = "manifest.json"
#: shard lines appended while a run goes (merged by read_manifest; replaced by the final manifest)
PROGRESS = "manifest.progress.jsonl"
#: the writer's lock file inside a run folder
LOCK = ".lock"
#: the largest run a manifest may describe (a bound on what a tampered file can make a reader allocate)
MAX_RUN = 10**12
DTYPES = ("float64", "float32", "float16", "bfloat16")
FORMAT = "fastsde-shards/1"
#: how long a rank waits for the others at the final barrier when fastsde starts the process group
#: (ranks finish their last shards at different times; torchrun tears the group down if one dies)
BARRIER_TIMEOUT = timedelta(hours=6)
#: the settings a run is identified by, in the order a mismatch is reported
SETTINGS_FIELDS = (
    "model",
    "model_content",
    "sde",
    "solver",
    "options",
    "t_end",
    "denoise",
    "seed",
    "n",
    "shape",
    "dtype",
    "shard_size",
)


@dataclass
class ShardInfo:
    """One shard just written (handed to ``on_shard``): where it lies, its mean NFE and wall time."""

    shard: int
    start: int
    stop: int
    num_shards: int
    nfe: float
    wall_time: float
    unfinished: int
    rank: int


@dataclass
class ShardRun:
    """What ``sample_to_dir`` did: the shards this rank computed, those found done before, and
    whether the whole run is now complete (every rank agrees on ``complete``)."""

    out_dir: Path
    n: int
    num_shards: int
    computed: list[int]
    skipped: list[int]
    complete: bool
    rank: int
    world_size: int
    wall_time: float
    manifest: dict[str, Any] = field(default_factory=dict)


def score_identity(score: Any, model: str | None = None) -> str:
    """What the manifest records as the model: ``model`` if given, a loaded model's name, else the
    score's qualified name with a digest of the tensors it holds (so two mixtures differ)."""
    if model is not None:
        return str(model)
    from .levels import Levels

    if isinstance(score, Levels):  # ML-EM: every level, coarse to fine, and its cost
        parts = [f"{score_identity(f)}@{c:.6g}" for f, c in zip(score.scores, score.costs)]
        return f"levels[{', '.join(parts)}]"
    owner = getattr(score, "__self__", None)
    name = getattr(owner, "name", None)
    if isinstance(name, str):
        return name
    obj = owner if owner is not None else score
    if owner is None and isinstance(getattr(score, "__qualname__", None), str):  # a plain function
        label = f"{getattr(score, '__module__', '?')}.{score.__qualname__}"
    else:  # a bound method or a callable object: its class
        label = f"{type(obj).__module__}.{type(obj).__qualname__}"
    digest = _tensor_digest(obj)
    return label if digest is None else f"{label}#{digest}"


def model_probe(
    score: Any,
    sde: SDE,
    dims: Sequence[int],
    t_end: float,
    dtype: torch.dtype,
    device: torch.device,
    cond: dict[str, Tensor] | None = None,
) -> dict[str, Any] | None:
    """The manifest's probe of a score with no module in reach (its outputs on fixed inputs,
    ``fastsde.identity.probe``; a multilevel score: every level's), or None when modules' weights
    identify it exactly."""
    if has_module(score):
        return None
    from .levels import Levels

    scores = score.scores if isinstance(score, Levels) else [score]
    values: list[float] = []
    for f in scores:
        values += probe(f, sde, tuple(dims), t_end, dtype, device, cond)
    return {"dtype": str(dtype).removeprefix("torch."), "values": [v if math.isfinite(v) else None for v in values]}


def _probe_differs(old: Any, new: dict[str, Any] | None) -> str | None:
    """Why a resumed run's probe shows another model (None: the same one)."""
    if new is None or not isinstance(old, dict):
        return None if new is None and old is None else "the run was started with another kind of model"
    nan = float("nan")
    a = [nan if v is None else v for v in old.get("values", [])] if isinstance(old.get("values"), list) else []
    b = [nan if v is None else v for v in new["values"]]
    if all(isinstance(v, (int, float)) for v in a) and probe_matches(a, b, getattr(torch, new["dtype"])):
        return None
    return "the score's outputs on fixed probe inputs differ from the ones the run was started with"


def _tensor_digest(obj: Any) -> str | None:
    """A short hash of the tensors an object holds (its attributes, or a module's state), or None."""
    tensors: list[tuple[str, Tensor]] = []
    if isinstance(obj, torch.nn.Module):
        tensors = list(obj.state_dict().items())
    else:
        try:
            attrs = vars(obj)
        except TypeError:
            return None
        tensors = [(k, v) for k, v in sorted(attrs.items()) if isinstance(v, Tensor)]
    if not tensors:
        return None
    h = hashlib.sha256()
    for key, value in tensors:
        h.update(key.encode())
        h.update(value.detach().to("cpu").contiguous().reshape(-1).to(torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    """An option value as JSON data; objects by their repr (by type where the repr is an address)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Tensor) or callable(getattr(value, "config", None)):
        # an explicit grid's times, a fitted grid or learned schedule by its description: as res.config()
        return _jsonable(_recordable(value))
    text = repr(value)
    return f"{type(value).__module__}.{type(value).__qualname__}" if " at 0x" in text else text


def cond_digest(cond: dict[str, Tensor]) -> dict[str, str]:
    """Per key, the dtype, shape and a sha256 of the conditioning's bytes (a run's identity)."""
    out = {}
    for key, value in sorted(cond.items()):
        arr = value.detach().to("cpu").contiguous()
        raw = arr.view(torch.uint8).numpy().tobytes() if arr.numel() else b""
        out[key] = f"{str(arr.dtype).removeprefix('torch.')}{list(arr.shape)}:{hashlib.sha256(raw).hexdigest()[:16]}"
    return out


def _fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _shard_name(k: int, num_shards: int) -> str:
    return f"shard-{k:0{max(5, len(str(num_shards - 1)))}d}.npz"


def _ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(a, min(n, a + shard_size)) for a in range(0, n, shard_size)]


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype a shard stores samples in (bfloat16, which numpy lacks, as float32: exact)."""
    return np.dtype(np.float32) if dtype == torch.bfloat16 else torch.empty((), dtype=dtype).numpy().dtype


def _rows_spec(settings: dict[str, Any]) -> tuple[str, tuple[int, ...], np.dtype]:
    """The array a shard holds one row per index of: (name, row shape, numpy dtype)."""
    if settings.get("kind", "samples") == "likelihood":
        return "logp", (), np.dtype(np.float64)
    return "samples", tuple(settings["shape"]), _np_dtype(getattr(torch, settings["dtype"]))


def _read_shard(path: Path, fingerprint: str, k: int, start: int, stop: int, settings: dict[str, Any]):
    """The shard's arrays if the file reads back whole (every member, CRC checked) and belongs to
    this run at this place; None for a missing, truncated, foreign or malformed file."""
    key, dims, dtype = _rows_spec(settings)
    rows_shape = (stop - start, *dims)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {key: z[key] for key in z.files}
    except Exception:  # noqa: BLE001 - any unreadable file is simply not done
        return None
    try:
        ok = (
            str(data["fingerprint"]) == fingerprint
            and int(data["shard"]) == k
            and int(data["start"]) == start
            and int(data["stop"]) == stop
            and data[key].shape == rows_shape
            and data[key].dtype == dtype
            and data["nfe_per_sample"].shape == (stop - start,)
            and data["status"].shape == (stop - start,)
        )
    except (KeyError, ValueError, TypeError, AttributeError):
        return None
    return data if ok else None


def _shard_entry(k: int, start: int, stop: int, num_shards: int, data: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest's line for one shard."""
    entry: dict[str, Any] = {"shard": k, "start": start, "stop": stop, "file": _shard_name(k, num_shards)}
    if data is None:
        return {**entry, "status": "pending", "nfe": None}
    unfinished = int(sum(1 for s in data["status"].tolist() if s not in ("done", "stopped")))
    entry = {
        **entry,
        "status": "done" if unfinished == 0 else "partial",
        "nfe": float(data["nfe_per_sample"].mean()),
        "unfinished": unfinished,
        "wall_s": round(float(data["wall_s"]), 4),
    }
    if "bpd" in data:
        entry["bpd"] = float(np.mean(data["bpd"]))
    if "nfe_per_level" in data and "cost_per_sample" in data:
        entry["nfe_per_level"] = [float(v) for v in np.mean(data["nfe_per_level"], axis=0)]
        entry["cost"] = float(np.mean(data["cost_per_sample"]))
    return entry


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """A run folder's manifest, checked field by field and against its own fingerprint, with the
    shards finished since it was written (``PROGRESS``) merged in. ValueError naming the folder if
    there is none; FileFormatError naming the field if it is not a sound manifest."""
    path = Path(out_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{str(out_dir)!r} holds no fastsde run ({MANIFEST} is missing)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"cannot read {str(path)!r}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a fastsde run manifest (format {FORMAT!r})")
    _check_manifest(path, manifest)
    _merge_progress(Path(out_dir), manifest)
    return manifest


def _check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """The fields readers rely on, and the fingerprint of the settings (an edited manifest fails)."""
    top = Fields(path, manifest)
    s = top.obj("settings")
    kind = s.string("kind", "samples", choices=("samples", "likelihood"))
    n = s.integer("n", low=1, high=MAX_RUN)
    size = s.integer("shard_size", low=1, high=MAX_RUN)
    dims = s.integers("shape", low=1, high=MAX_RUN)
    if kind == "samples":
        s.string("dtype", choices=DTYPES)
    if math.prod(dims) > MAX_RUN:
        raise s.error("shape", f"at most {MAX_RUN} values per sample", dims)
    fp = top.string("fingerprint")
    if fp != _fingerprint(manifest["settings"]):
        raise top.error("fingerprint", "the sha256 of the manifest's settings (the settings were edited)", fp)
    num = -(-n // size)
    top.integer("num_shards", low=num, high=num)
    if len(top.items("shards", length=num)) != num:  # pragma: no cover - items checks the length
        raise top.error("shards", f"a list of {num} entries")


def _merge_progress(out: Path, manifest: dict[str, Any]) -> None:
    """Shard lines appended since the manifest was written replace their pending entries."""
    try:
        lines = (out / PROGRESS).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return
    shards = manifest["shards"]
    for line in lines:
        try:
            entry = json.loads(line)
            k = entry["shard"]
        except (ValueError, TypeError, KeyError):
            continue  # a line cut short by a kill
        if isinstance(k, int) and 0 <= k < len(shards) and isinstance(shards[k], dict):
            if shards[k].get("status") == "pending" and entry.get("status") in ("done", "partial"):
                shards[k] = entry


def _mismatch(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The settings that differ, as 'field: old -> new' (options field by field)."""
    out = []
    names = [*SETTINGS_FIELDS, *sorted((set(old) | set(new)) - set(SETTINGS_FIELDS))]
    for name in names:
        a, b = old.get(name), new.get(name)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    out.append(f"{name}.{key}: {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}")
        else:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


# ---------------------------------------------------------------------------------------------
# torch.distributed
# ---------------------------------------------------------------------------------------------


def device_for_rank(device: torch.device | str) -> torch.device:
    """Under torchrun, a bare 'cuda' means this rank's GPU (LOCAL_RANK)."""
    dev = check_device(device)
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def _dist_setup(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether fastsde started the process group): an existing group is used;
    otherwise one is started (gloo on CPU, nccl on CUDA) only if torchrun's variables say so."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and "RANK" in os.environ:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=BARRIER_TIMEOUT)
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _broadcast(obj: Any, world: int) -> Any:
    """Rank 0's object on every rank."""
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# ---------------------------------------------------------------------------------------------
# writing a run
# ---------------------------------------------------------------------------------------------


def _settings(
    score: Any,
    sde: SDE,
    shape: tuple[int, ...],
    spec: SolverSpec,
    options: dict[str, Any],
    t_end: float,
    denoise: bool,
    seed: int,
    dtype: torch.dtype,
    shard_size: int,
    model: str | None,
) -> dict[str, Any]:
    """What identifies a run (JSON data, as read back from the manifest)."""
    resolved = spec.resolve(sde, dict(options), t_end)  # also validates names and values
    if resolved.get("per_sample_norm") is False:  # pc's default, as in Song et al.'s code
        raise ValueError(
            f"{spec.name} with per_sample_norm=False takes its corrector step from norms averaged over the "
            "batch, so a sample depends on which samples share its shard: pass per_sample_norm=True "
            "(--option per_sample_norm=true) for a sharded run"
        )
    settings = {
        "model": score_identity(score, model),
        "model_content": content_digests(score),
        "sde": sde.config(),
        "solver": spec.name,
        "options": {k: _jsonable(v) for k, v in resolved.items()},
        "t_end": float(t_end),
        "denoise": denoise,
        "seed": seed,
        "n": shape[0],
        "shape": list(shape[1:]),
        "dtype": str(dtype).removeprefix("torch."),
        "shard_size": shard_size,
    }
    return json.loads(json.dumps(settings))


class RunLock:
    """An exclusive lock on a run folder (``flock`` on its ``.lock`` file, which holds the writer's
    pid), taken before anything in the folder is read or removed and held until the run ends. The
    kernel drops it when the process dies, so a killed run never leaves the folder locked."""

    def __init__(self, out: Path) -> None:
        self.out, self.fd = out, None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # no flock on this platform: no lock
            return self
        fd = os.open(self.out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(
                f"{str(self.out)!r} is being written by another fastsde process (pid {holder}): wait for it "
                "to finish, or write to another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def _prepare(
    out: Path, settings: dict[str, Any], fp: str, ranges: list[tuple[int, int]], probe_record: dict | None = None
) -> dict[int, dict]:
    """Rank 0, holding the folder's lock: refuse a run with other settings (or another model's
    probe), clear stale temporary files, find the shards already done and write the manifest.
    Returns {shard: manifest entry} of those done."""
    path = out / MANIFEST
    if path.exists():
        old = read_manifest(out)
        diff = _mismatch(old.get("settings", {}), settings)
        if not diff:
            why = _probe_differs(old.get("model_probe"), probe_record)
            diff = [] if why is None else [f"model: {why}"]
        if diff:
            raise ValueError(
                f"{str(out)!r} holds a run with other settings ({'; '.join(diff)}): rerun with the "
                "same settings to resume it, or write to another folder"
            )
    for pattern in (".shard-*.tmp.npz", f".{MANIFEST}.*.tmp.json"):  # writes killed before their rename
        for stale in out.glob(pattern):
            stale.unlink(missing_ok=True)
    num = len(ranges)
    entries = []
    for k, (a, b) in enumerate(ranges):
        data = _read_shard(out / _shard_name(k, num), fp, k, a, b, settings)
        entries.append(_shard_entry(k, a, b, num, data))
    extra = {} if probe_record is None else {"model_probe": probe_record}
    manifest = _manifest(settings, fp, entries, complete=all(e["status"] != "pending" for e in entries), **extra)
    write_json_atomic(path, manifest)
    (out / PROGRESS).unlink(missing_ok=True)  # its lines are in the manifest now
    return {e["shard"]: e for e in entries if e["status"] != "pending"}


def _append_progress(out: Path, entry: dict[str, Any]) -> None:
    """One shard's manifest line, appended (a short O_APPEND write: whole even with several ranks)."""
    with open(out / PROGRESS, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")


def _manifest(settings: dict[str, Any], fp: str, entries: list[dict], complete: bool, **extra: Any) -> dict[str, Any]:
    from . import __version__

    return {
        "format": FORMAT,
        "fastsde": __version__,
        "settings": settings,
        "fingerprint": fp,
        "num_shards": len(entries),
        "complete": complete,
        **extra,
        "shards": entries,
    }


def _write_shard(
    path: Path,
    k: int,
    a: int,
    b: int,
    fp: str,
    arrays: dict[str, np.ndarray],
    nfe: Tensor,
    status: list[str],
    wall: float,
) -> None:
    """One shard, whole or not at all (temporary name in the folder, fsynced, then renamed)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: numpy would append .npz to a name
            np.savez(
                fh,
                **arrays,
                nfe_per_sample=nfe.detach().to("cpu", torch.float64).numpy(),
                status=np.array(status, dtype=str),
                shard=np.array(k, dtype=np.int64),
                start=np.array(a, dtype=np.int64),
                stop=np.array(b, dtype=np.int64),
                fingerprint=np.array(fp),
                wall_s=np.array(wall, dtype=np.float64),
            )
            fh.flush()
            os.fsync(fh.fileno())

    write_atomic(path, write)


def sample_to_dir(
    score: Any,
    sde: SDE,
    shape: Sequence[int],
    out_dir: str | Path,
    solver: str | SolverSpec = DEFAULT_SOLVER,
    seed: int = 0,
    *,
    shard_size: int = 1000,
    model: str | None = None,
    t_end: float | None = None,
    denoise: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    progress: bool = False,
    on_shard: Callable[[ShardInfo], Any] | None = None,
    cond: Tensor | dict[str, Tensor] | None = None,
    **options: Any,
) -> ShardRun:
    """Draw ``fastsde.sample(score, sde, shape, solver, seed, ...)`` into ``out_dir`` as shards of
    ``shard_size`` consecutive samples and a manifest, resuming whatever a previous identical call
    left done; under torchrun the shards are split across ranks. ``load_samples(out_dir)`` then
    equals the single call's samples.

    Args:
        score, sde, shape, solver, t_end, denoise, dtype, device, options: as for ``fastsde.sample``.
        out_dir: the run's folder (created if missing).
        seed: one int (per-sample seeds derive from it and the sample's index).
        shard_size: samples per shard file; part of the run's identity.
        model: the model's name for the manifest (default: derived from the score).
        batch_size: samples per ``fastsde.sample`` call inside a shard (default: the whole shard).
        progress: a progress bar per shard.
        on_shard: called with a :class:`ShardInfo` after each shard this rank writes.
        cond: per-sample conditioning as for ``fastsde.sample`` (one row per sample of the whole run);
            each shard gets its rows, and a digest of it is part of the run's identity.
    """
    shape, spec, t_end, denoise = check_run(score, sde, shape, solver, t_end, denoise)
    cond_kw = check_cond(with_null_rows(score, cond, shape[0]), shape[0])  # CFG's per-sample null rows too
    seed = check_seed(seed, "seed")
    shard_size = as_python_number(shard_size)
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    dtype = check_dtype(dtype)
    settings = _settings(score, sde, shape, spec, options, t_end, denoise, seed, dtype, shard_size, model)
    if cond_kw is not None:
        settings["cond"] = cond_digest(cond_kw)
    fp = _fingerprint(settings)
    out = Path(out_dir)
    n, dims = shape[0], shape[1:]
    ranges = _ranges(n, shard_size)
    dev = device_for_rank(device)

    def compute(k: int, a: int, b: int) -> tuple[dict[str, np.ndarray], Tensor, list[str]]:
        samples, nfe, status, per_level = _sample_shard(
            score, sde, dims, spec, seed, a, b, batch_size, t_end, denoise, dtype, dev, progress, options, cond_kw
        )
        arr = samples if samples.dtype != torch.bfloat16 else samples.float()
        arrays = {"samples": arr.numpy()}
        if per_level is not None:  # multilevel: each sample's evaluations per level, and its compute
            arrays["nfe_per_level"] = per_level.numpy()
            arrays["cost_per_sample"] = (per_level @ torch.tensor(score.costs, dtype=torch.float64)).numpy()
        return arrays, nfe, status

    def probe_record() -> dict[str, Any] | None:
        return model_probe(score, sde, dims, t_end, dtype, dev, cond_kw)

    return _run_shards(out, settings, fp, ranges, dev, compute, on_shard, probe_record)


def _run_shards(
    out: Path,
    settings: dict[str, Any],
    fp: str,
    ranges: list[tuple[int, int]],
    dev: torch.device,
    compute: Callable[[int, int, int], tuple[dict[str, np.ndarray], Tensor, list[str]]],
    on_shard: Callable[[ShardInfo], Any] | None,
    probe_record: Callable[[], dict[str, Any] | None] | None = None,
) -> ShardRun:
    """The run loop shared by sampling and likelihood: rank 0 locks and prepares the folder, each
    rank computes and writes its share of the missing shards, rank 0 writes the manifest and the
    summary. ``probe_record``: the model probe for the manifest (called by rank 0 once)."""
    n, num = settings["n"], len(ranges)
    rank, world, owned = _dist_setup(dev)
    start_time = time.perf_counter()
    lock = RunLock(out)
    probed: dict[str, Any] | None = None
    try:
        plan: Any = None
        if rank == 0:
            try:
                out.mkdir(parents=True, exist_ok=True)
                lock.acquire()
                probed = None if probe_record is None else probe_record()
                plan = _prepare(out, settings, fp, ranges, probed)
            except (ValueError, OSError) as exc:
                plan = exc
        plan = _broadcast(plan, world)
        if isinstance(plan, BaseException):
            raise plan
        done: dict[int, dict] = {int(k): v for k, v in plan.items()}
        todo = [k for k in range(num) if k not in done]
        mine = todo[rank::world]
        entries = {k: v for k, v in done.items()}
        computed = []
        for k in mine:
            a, b = ranges[k]
            t0 = time.perf_counter()
            arrays, nfe, status = compute(k, a, b)
            wall = time.perf_counter() - t0
            path = out / _shard_name(k, num)
            _write_shard(path, k, a, b, fp, arrays, nfe, status, wall)
            computed.append(k)
            data = {**arrays, "status": np.array(status), "nfe_per_sample": nfe.numpy(), "wall_s": np.array(wall)}
            entries[k] = _shard_entry(k, a, b, num, data)
            _append_progress(out, entries[k])  # read_manifest merges it; no rewrite of the manifest per shard
            if on_shard is not None:
                on_shard(ShardInfo(k, a, b, num, float(nfe.mean()), wall, entries[k].get("unfinished", 0), rank))
        _barrier(world)
        wall_total = time.perf_counter() - start_time
        manifest: Any = None
        if rank == 0:
            listed = []
            for j, (a, b) in enumerate(ranges):
                if j in entries:
                    listed.append(entries[j])
                else:  # another rank's: read it back
                    data = _read_shard(out / _shard_name(j, num), fp, j, a, b, settings)
                    listed.append(_shard_entry(j, a, b, num, data))
            complete = all(e["status"] != "pending" for e in listed)
            summary = _summary(listed, n, wall_total, world, len(done))
            kept = {} if probed is None else {"model_probe": probed}
            manifest = _manifest(settings, fp, listed, complete=complete, summary=summary, **kept)
            write_json_atomic(out / MANIFEST, manifest)
            (out / PROGRESS).unlink(missing_ok=True)
        manifest = _broadcast(manifest, world)
    finally:
        lock.release()
        if owned:
            import torch.distributed as dist

            dist.destroy_process_group()
    return ShardRun(
        out_dir=out,
        n=n,
        num_shards=num,
        computed=computed,
        skipped=sorted(done),
        complete=bool(manifest["complete"]),
        rank=rank,
        world_size=world,
        wall_time=wall_total,
        manifest=manifest,
    )


def _summary(entries: list[dict], n: int, wall: float, world: int, skipped: int) -> dict[str, Any]:
    """The run's totals for the manifest: samples done, mean NFE, unfinished samples, wall time."""
    done = [e for e in entries if e["status"] != "pending"]
    count = sum(e["stop"] - e["start"] for e in done)
    nfe = sum(e["nfe"] * (e["stop"] - e["start"]) for e in done) / count if count else None
    return {
        "samples_done": count,
        "n": n,
        "shards_done": len(done),
        "shards_skipped_this_call": skipped,
        "nfe": nfe,
        "unfinished": sum(e.get("unfinished", 0) for e in done),
        **(
            {"bpd": sum(e["bpd"] * (e["stop"] - e["start"]) for e in done) / count}
            if count and all("bpd" in e for e in done)
            else {}
        ),
        **(_level_totals(done, count) if count and all("cost" in e for e in done) else {}),
        "wall_s_this_call": round(wall, 3),
        "world_size": world,
    }


def _level_totals(done: list[dict], count: int) -> dict[str, Any]:
    """A multilevel run's mean compute and evaluations per level per sample, over the shards done."""
    rows = [(e["stop"] - e["start"], e) for e in done]
    levels = len(rows[0][1]["nfe_per_level"])
    return {
        "cost": sum(m * e["cost"] for m, e in rows) / count,
        "nfe_per_level": [sum(m * e["nfe_per_level"][k] for m, e in rows) / count for k in range(levels)],
    }


def _sample_shard(
    score: Any,
    sde: SDE,
    dims: tuple[int, ...],
    spec: SolverSpec,
    seed: int,
    a: int,
    b: int,
    batch_size: int | None,
    t_end: float,
    denoise: bool,
    dtype: torch.dtype,
    device: torch.device,
    progress: bool,
    options: dict[str, Any],
    cond: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor, list[str], Tensor | None]:
    """Rows [a, b) of the run, with the noise (and the conditioning rows) of those global indices:
    samples, NFE per sample, status, and for a multilevel run the (rows, K) evaluations per level."""
    chunks, nfes, status, levels = [], [], [], []
    step = batch_size or (b - a)
    for lo in range(a, b, step):
        hi = min(b, lo + step)
        res = sample(
            score,
            sde,
            (hi - lo, *dims),
            solver=spec,
            seed=NoiseSource.from_seed(seed, hi - lo, start=lo),
            t_end=t_end,
            denoise=denoise,
            dtype=dtype,
            device=device,
            progress=progress,
            cond=None if cond is None else {k: v[lo:hi] for k, v in cond.items()},
            **options,
        )
        chunks.append(res.samples.detach().to("cpu"))
        nfes.append(res.nfe_per_sample.to(torch.float64))
        status += list(res.stats.get("status", ["done"] * (hi - lo)))
        if "nfe_per_level_per_sample" in res.stats:
            levels.append(res.stats["nfe_per_level_per_sample"].detach().to("cpu", torch.float64))
    per_level = torch.cat(levels) if levels else None
    return torch.cat(chunks), torch.cat(nfes), status, per_level


# ---------------------------------------------------------------------------------------------
# reading a run
# ---------------------------------------------------------------------------------------------


def load_samples(
    out_dir: str | Path, *, allow_incomplete: bool = False, with_indices: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """All samples of a run folder in index order, in the run's dtype (equal to ``fastsde.sample``
    with the run's settings). An incomplete run is a ValueError naming the missing shards unless
    ``allow_incomplete``; then only the shards done are returned, and ``with_indices`` also returns
    their global sample indices."""
    out = Path(out_dir)
    manifest = read_manifest(out)
    settings, fp = manifest["settings"], manifest["fingerprint"]
    if settings.get("kind", "samples") != "samples":
        raise ValueError(f"{str(out)!r} holds a {settings['kind']} run: read it with load_likelihood")
    n, size, dims, dtype = settings["n"], settings["shard_size"], settings["shape"], settings["dtype"]
    ranges = _ranges(n, size)
    parts, idx, missing = [], [], []
    for k, (a, b) in enumerate(ranges):
        data = _read_shard(out / _shard_name(k, len(ranges)), fp, k, a, b, settings)
        if data is None:
            missing.append(k)
            continue
        parts.append(torch.from_numpy(data["samples"]))
        idx.append(torch.arange(a, b))
    if missing and not allow_incomplete:
        have = n - sum(ranges[k][1] - ranges[k][0] for k in missing)
        shown = ", ".join(str(k) for k in missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise ValueError(
            f"the run in {str(out)!r} is incomplete: {len(missing)} of {len(ranges)} shards missing "
            f"({shown}; {have} of {n} samples done); rerun the same command to resume it, or pass "
            "allow_incomplete=True"
        )
    tdtype = getattr(torch, dtype)
    x = torch.cat(parts).to(tdtype) if parts else torch.empty((0, *dims), dtype=tdtype)
    if with_indices:
        return x, (torch.cat(idx) if idx else torch.empty(0, dtype=torch.long))
    return x

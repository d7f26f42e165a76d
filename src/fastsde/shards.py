"""The shard engine of run folders: what ``fastsde.sample_to_dir`` (fastsde.sharding) and
``fastsde.likelihood_to_dir`` (fastsde.likelihood.sharded) share.

A run of n rows is written as fixed-size shards of consecutive indices plus a manifest. A shard file
is written to a temporary name and renamed (``fastsde.files``), and carries the run's fingerprint, so
a file that exists, reads back whole and matches the manifest is done and never recomputed: rerunning
the same call resumes a killed job, losing at most the shards that were in progress. A rerun with
different settings into the same folder is refused, naming the fields that differ. The model is part
of those settings by content (``fastsde.identity``): every module's weights, tensor and plain
parameter reachable from the score, and for a score with no module in reach its outputs on fixed
probe inputs, so a folder resumed with retrained weights behind the same name is refused, not mixed.

One writer at a time: the writer (rank 0 under torchrun) holds an exclusive lock on the folder's
``.lock`` file for the whole run (:class:`RunLock`); a second writer is refused, naming the holder's
pid. Progress is appended to ``manifest.progress.jsonl`` (one line per shard) instead of rewriting
the manifest per shard; :func:`read_manifest` merges it, and the final manifest replaces it.

Under ``torchrun`` (RANK / WORLD_SIZE set) the shards still to do are dealt round-robin across ranks
(the j-th missing shard to rank j mod world): no padding, no duplicates, and a resumed run stays
balanced. Only rank 0 writes the manifest: after a barrier, once with every shard's status and the
run's summary.

A caller hands :func:`run_shards` the run's settings (JSON data; ``n`` and ``shard_size`` among them)
and a ``compute(k, start, stop)`` that returns one shard's arrays, per-row NFE and per-row status.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .api import check_device
from .files import Fields, write_atomic, write_json_atomic
from .identity import has_module, probe, probe_matches
from .levels import Levels
from .sde import SDE

__all__ = [
    "MANIFEST",
    "PROGRESS",
    "LOCK",
    "ShardInfo",
    "ShardRun",
    "RunLock",
    "run_shards",
    "read_manifest",
    "read_shards",
    "shard_ranges",
    "fingerprint",
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

#: compute(k, start, stop) -> (the shard's arrays, NFE per row, status per row)
Compute = Callable[[int, int, int], tuple[dict[str, np.ndarray], Tensor, list[str]]]


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


# ---------------------------------------------------------------------------------------------
# a run's identity
# ---------------------------------------------------------------------------------------------


def score_identity(score: Any, model: str | None = None) -> str:
    """What the manifest records as the model: ``model`` if given, a loaded model's name, else the
    score's qualified name with a digest of the tensors it holds (so two mixtures differ)."""
    if model is not None:
        return str(model)

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


def fingerprint(settings: dict[str, Any]) -> str:
    """The sha256 of a run's settings (JSON, sorted keys): what every shard file carries."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


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
# shard files
# ---------------------------------------------------------------------------------------------


def shard_name(k: int, num_shards: int) -> str:
    """The file name of shard k of num_shards."""
    return f"shard-{k:0{max(5, len(str(num_shards - 1)))}d}.npz"


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """The [start, stop) of each shard of a run of n rows."""
    return [(a, min(n, a + shard_size)) for a in range(0, n, shard_size)]


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype a shard stores samples in (bfloat16, which numpy lacks, as float32: exact)."""
    return np.dtype(np.float32) if dtype == torch.bfloat16 else torch.empty((), dtype=dtype).numpy().dtype


def _rows_spec(settings: dict[str, Any]) -> tuple[str, tuple[int, ...], np.dtype]:
    """The array a shard holds one row per index of: (name, row shape, numpy dtype)."""
    if settings.get("kind", "samples") == "likelihood":
        return "logp", (), np.dtype(np.float64)
    return "samples", tuple(settings["shape"]), _np_dtype(getattr(torch, settings["dtype"]))


def read_shard(path: Path, fp: str, k: int, start: int, stop: int, settings: dict[str, Any]):
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
            str(data["fingerprint"]) == fp
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


def read_shards(out: Path, manifest: dict[str, Any]) -> list[tuple[int, int, int, dict[str, Any] | None]]:
    """Every shard of a run folder in order, as (k, start, stop, its arrays or None if not done)."""
    settings, fp = manifest["settings"], manifest["fingerprint"]
    ranges = shard_ranges(settings["n"], settings["shard_size"])
    return [
        (k, a, b, read_shard(out / shard_name(k, len(ranges)), fp, k, a, b, settings))
        for k, (a, b) in enumerate(ranges)
    ]


def _shard_entry(k: int, start: int, stop: int, num_shards: int, data: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest's line for one shard."""
    entry: dict[str, Any] = {"shard": k, "start": start, "stop": stop, "file": shard_name(k, num_shards)}
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


# ---------------------------------------------------------------------------------------------
# the manifest
# ---------------------------------------------------------------------------------------------


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
    if fp != fingerprint(manifest["settings"]):
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


def _append_progress(out: Path, entry: dict[str, Any]) -> None:
    """One shard's manifest line, appended (a short O_APPEND write: whole even with several ranks)."""
    with open(out / PROGRESS, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")


def _version() -> str:
    """fastsde's version for the manifest (the package's ``__version__``, which pyproject states),
    read without importing the package namespace: the installed distribution's, else the loaded
    package's."""
    try:
        return importlib.metadata.version("fastsde")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return str(getattr(sys.modules.get("fastsde"), "__version__", "unknown"))


def _manifest(settings: dict[str, Any], fp: str, entries: list[dict], complete: bool, **extra: Any) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "fastsde": _version(),
        "settings": settings,
        "fingerprint": fp,
        "num_shards": len(entries),
        "complete": complete,
        **extra,
        "shards": entries,
    }


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


@dataclass(frozen=True)
class _Run:
    """One call's view of a run folder: where, what (settings and their fingerprint), its shards,
    and this process's place among the ranks."""

    out: Path
    settings: dict[str, Any]
    fp: str
    ranges: list[tuple[int, int]]
    rank: int
    world: int

    def path(self, k: int) -> Path:
        return self.out / shard_name(k, len(self.ranges))


def _prepare(run: _Run, probe_record: dict | None = None) -> dict[int, dict]:
    """Rank 0, holding the folder's lock: refuse a run with other settings (or another model's
    probe), clear stale temporary files, find the shards already done and write the manifest.
    Returns {shard: manifest entry} of those done."""
    out, settings, fp = run.out, run.settings, run.fp
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
    num = len(run.ranges)
    entries = []
    for k, (a, b) in enumerate(run.ranges):
        data = read_shard(run.path(k), fp, k, a, b, settings)
        entries.append(_shard_entry(k, a, b, num, data))
    extra = {} if probe_record is None else {"model_probe": probe_record}
    manifest = _manifest(settings, fp, entries, complete=all(e["status"] != "pending" for e in entries), **extra)
    write_json_atomic(path, manifest)
    (out / PROGRESS).unlink(missing_ok=True)  # its lines are in the manifest now
    return {e["shard"]: e for e in entries if e["status"] != "pending"}


def _plan(
    run: _Run, lock: RunLock, probe_record: Callable[[], dict[str, Any] | None] | None
) -> tuple[dict[int, dict], dict[str, Any] | None]:
    """Every rank: the shards found done ({shard: manifest entry}, rank 0's finding) and, on rank 0,
    the model probe. Rank 0 locks and prepares the folder; its error is raised on every rank."""
    plan: Any = None
    probed: dict[str, Any] | None = None
    if run.rank == 0:
        try:
            run.out.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            probed = None if probe_record is None else probe_record()
            plan = _prepare(run, probed)
        except (ValueError, OSError) as exc:
            plan = exc
    plan = _broadcast(plan, run.world)
    if isinstance(plan, BaseException):
        raise plan
    return {int(k): v for k, v in plan.items()}, probed


def _compute_shards(
    run: _Run, mine: list[int], compute: Compute, on_shard: Callable[[ShardInfo], Any] | None, entries: dict[int, dict]
) -> list[int]:
    """This rank's shards: each computed, written, its manifest line added to ``entries`` and
    appended to the progress file, and reported to ``on_shard``. Returns the shards computed."""
    num = len(run.ranges)
    computed = []
    for k in mine:
        a, b = run.ranges[k]
        t0 = time.perf_counter()
        arrays, nfe, status = compute(k, a, b)
        wall = time.perf_counter() - t0
        _write_shard(run.path(k), k, a, b, run.fp, arrays, nfe, status, wall)
        computed.append(k)
        data = {**arrays, "status": np.array(status), "nfe_per_sample": nfe.numpy(), "wall_s": np.array(wall)}
        entries[k] = _shard_entry(k, a, b, num, data)
        _append_progress(run.out, entries[k])  # read_manifest merges it; no rewrite of the manifest per shard
        if on_shard is not None:
            on_shard(ShardInfo(k, a, b, num, float(nfe.mean()), wall, entries[k].get("unfinished", 0), run.rank))
    return computed


def _finish(
    run: _Run, entries: dict[int, dict], skipped: int, wall: float, probed: dict[str, Any] | None
) -> dict[str, Any]:
    """Rank 0 writes the final manifest (every shard's line, other ranks' read back from their
    files, and the summary) and removes the progress file; every rank gets the manifest."""
    manifest: Any = None
    if run.rank == 0:
        num = len(run.ranges)
        listed = []
        for j, (a, b) in enumerate(run.ranges):
            if j in entries:
                listed.append(entries[j])
            else:  # another rank's: read it back
                data = read_shard(run.path(j), run.fp, j, a, b, run.settings)
                listed.append(_shard_entry(j, a, b, num, data))
        complete = all(e["status"] != "pending" for e in listed)
        summary = _summary(listed, run.settings["n"], wall, run.world, skipped)
        kept = {} if probed is None else {"model_probe": probed}
        manifest = _manifest(run.settings, run.fp, listed, complete=complete, summary=summary, **kept)
        write_json_atomic(run.out / MANIFEST, manifest)
        (run.out / PROGRESS).unlink(missing_ok=True)
    return _broadcast(manifest, run.world)


def run_shards(
    out: Path,
    settings: dict[str, Any],
    device: torch.device,
    compute: Compute,
    on_shard: Callable[[ShardInfo], Any] | None = None,
    probe_record: Callable[[], dict[str, Any] | None] | None = None,
) -> ShardRun:
    """The run loop of sampling and likelihood: rank 0 locks and prepares the folder, each rank
    computes and writes its share of the missing shards (``compute``), rank 0 writes the manifest and
    the summary. ``settings`` identify the run (JSON data with ``n`` and ``shard_size``);
    ``probe_record``: the model probe for the manifest (called by rank 0 once)."""
    n = settings["n"]
    ranges = shard_ranges(n, settings["shard_size"])
    rank, world, owned = _dist_setup(device)
    run = _Run(out, settings, fingerprint(settings), ranges, rank, world)
    start_time = time.perf_counter()
    lock = RunLock(out)
    try:
        done, probed = _plan(run, lock, probe_record)
        todo = [k for k in range(len(ranges)) if k not in done]
        entries = dict(done)
        computed = _compute_shards(run, todo[rank::world], compute, on_shard, entries)
        _barrier(world)
        wall_total = time.perf_counter() - start_time
        manifest = _finish(run, entries, len(done), wall_total, probed)
    finally:
        lock.release()
        if owned:
            import torch.distributed as dist

            dist.destroy_process_group()
    return ShardRun(
        out_dir=out,
        n=n,
        num_shards=len(ranges),
        computed=computed,
        skipped=sorted(done),
        complete=bool(manifest["complete"]),
        rank=rank,
        world_size=world,
        wall_time=wall_total,
        manifest=manifest,
    )

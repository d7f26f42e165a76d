"""What a score *is*, for a run folder's identity: its content, not its name.

A run folder resumed with other weights behind the same name, or with another instance of the same
class, must be refused, not mixed. Two parts:

- :func:`content_digests`: short sha256 digests of everything reachable from the score object that
  decides its outputs: every ``nn.Module``'s state (weights and buffers), every tensor or array, and
  the plain parameters (numbers, strings) held by instances, ``functools.partial`` objects, closures
  and default arguments, keyed by where they were found (``score.__self__.network``, ...). Exact and
  the same on every machine; a changed field is named in the refusal.
- :func:`probe`: for a score with no module in reach (a function calling a global network, say), its
  outputs on fixed inputs at fixed times, compared with a tolerance (float outputs move in the last
  bits from one CPU to another), as IIA tables and fitted grids key a user's score.

The walk is bounded (depth, entries) and skips what cannot change outputs (modules' own Python
bookkeeping, classes, module objects, and the attributes a class names in ``identity_ignores``).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .noise import NoiseSource, Stream
from .sde import SDE

__all__ = ["content_digests", "has_module", "probe", "probe_outputs", "probe_matches", "PROBE_ROWS"]

#: how deep the walk follows attributes, and how many entries a digest map keeps (the rest fold into one)
MAX_DEPTH = 6
MAX_ENTRIES = 48
#: fixed probe inputs: rows, noise seed, and times as fractions of [t_end, T]
PROBE_ROWS = 4
PROBE_SEED = 90210
PROBE_FRACTIONS = (0.02, 0.1, 0.4, 0.9)
#: per row, the probe keeps this many random projections of σ·score (a sketch: a few numbers per row)
PROBE_PROJECTIONS = 8
#: relative L2 difference of two probes that still counts as the same score, per dtype
PROBE_RTOL = {torch.float64: 1e-8, torch.float32: 1e-4}
PROBE_RTOL_DEFAULT = 1e-2

_SCALARS = (bool, int, float, complex, str, bytes, type(None))


def _digest_tensor(h: Any, value: Tensor) -> None:
    arr = value.detach().to("cpu").contiguous()
    h.update(f"{str(arr.dtype)}{list(arr.shape)}".encode())
    if arr.numel():
        h.update(arr.reshape(-1).view(torch.uint8).numpy().tobytes())


def _digest_module(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    h.update(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        _digest_tensor(h, value)
    return h.hexdigest()[:16]


def _digest_leaf(value: Any) -> str:
    h = hashlib.sha256()
    if isinstance(value, Tensor):
        _digest_tensor(h, value)
    elif isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        h.update(f"{arr.dtype}{list(arr.shape)}".encode())
        h.update(arr.tobytes() if arr.dtype != object else repr(arr.tolist()).encode())
    elif isinstance(value, float) and math.isnan(value):
        h.update(b"nan")
    else:  # plain data: its repr, dicts in key order
        h.update(repr(_sorted(value)).encode())
    return h.hexdigest()[:16]


def _sorted(value: Any) -> Any:
    """Plain data with every dict's items in key order (a repr that does not depend on insertion order)."""
    if isinstance(value, dict):
        return [(repr(k), _sorted(v)) for k, v in sorted(value.items(), key=lambda kv: repr(kv[0]))]
    if isinstance(value, (list, tuple)):
        return type(value)(_sorted(v) for v in value)
    return value


def _children(obj: Any) -> list[tuple[str, Any]]:
    """The (name, value) pairs the walk follows from ``obj``."""
    if isinstance(obj, functools.partial):
        return [("func", obj.func), *((f"args[{i}]", a) for i, a in enumerate(obj.args))] + [
            (f"keywords[{k!r}]", v) for k, v in sorted(obj.keywords.items())
        ]
    if isinstance(obj, types.MethodType):
        return [("__self__", obj.__self__), ("__func__", obj.__func__)]
    if isinstance(obj, types.FunctionType):
        out: list[tuple[str, Any]] = []
        for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or ()):
            try:
                out.append((f"<closure {name}>", cell.cell_contents))
            except ValueError:  # an empty cell
                continue
        out += [(f"<default {i}>", d) for i, d in enumerate(obj.__defaults__ or ())]
        out += [(f"<default {k}>", v) for k, v in sorted((obj.__kwdefaults__ or {}).items())]
        return out
    if isinstance(obj, (list, tuple)):
        return [(f"[{i}]", v) for i, v in enumerate(obj[:256])]
    if isinstance(obj, dict):
        items = sorted(obj.items(), key=lambda kv: repr(kv[0]))[:256]
        return [(f"[{k!r}]", v) for k, v in items]
    attrs: dict[str, Any] = {}
    try:
        attrs = dict(vars(obj))
    except TypeError:
        for slot in getattr(type(obj), "__slots__", ()):
            if hasattr(obj, slot):
                attrs[slot] = getattr(obj, slot)
    ignored = getattr(type(obj), "identity_ignores", ())  # a class's labels and costs, not its outputs
    return [(k, v) for k, v in sorted(attrs.items()) if k not in ignored]


def _plain(obj: Any, depth: int = 0) -> bool:
    """Plain data (numbers, strings, and lists / tuples / dicts of them): digested as one entry."""
    if isinstance(obj, _SCALARS):
        return True
    if depth > MAX_DEPTH or not isinstance(obj, (list, tuple, dict)):
        return False
    if isinstance(obj, dict):
        return all(isinstance(k, _SCALARS) and _plain(v, depth + 1) for k, v in obj.items())
    return all(_plain(v, depth + 1) for v in obj)


def _walk(obj: Any, path: str, depth: int, seen: set[int], out: dict[str, str] | None, found: list[bool]) -> None:
    """Visit what is reachable from ``obj``: digest it into ``out`` by path, and set ``found[0]`` on
    meeting a module. With ``out`` None nothing is hashed and the walk stops at the first module."""
    if out is None and found[0]:
        return
    if isinstance(obj, (Tensor, np.ndarray, np.generic)) or _plain(obj):
        if out is not None:
            out[path] = _digest_leaf(obj.item() if isinstance(obj, np.generic) else obj)
        return
    if isinstance(obj, (type, types.ModuleType, types.BuiltinFunctionType, SDE, torch.dtype, torch.device)):
        return  # no state of the score's own (the process is recorded on its own)
    if isinstance(obj, os.PathLike):
        return  # where a model was read from is not what it is
    if id(obj) in seen or depth > MAX_DEPTH:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        found[0] = True
        if out is not None:
            out[path] = _digest_module(obj)
        return
    for name, child in _children(obj):
        sep = "" if name.startswith("[") else "."
        _walk(child, f"{path}{sep}{name}", depth + 1, seen, out, found)


def content_digests(score: Any) -> dict[str, str]:
    """{where: short sha256} of every module, tensor and plain parameter reachable from ``score``
    (see the module docstring); at most MAX_ENTRIES entries, the rest folded into one."""
    out: dict[str, str] = {}
    _walk(score, "score", 0, set(), out, [False])
    if len(out) <= MAX_ENTRIES:
        return dict(sorted(out.items()))
    keys = sorted(out)
    kept = {k: out[k] for k in keys[: MAX_ENTRIES - 1]}
    h = hashlib.sha256()
    for k in keys[MAX_ENTRIES - 1 :]:
        h.update(f"{k}={out[k]};".encode())
    kept[f"<{len(keys) - MAX_ENTRIES + 1} more>"] = h.hexdigest()[:16]
    return kept


def has_module(score: Any) -> bool:
    """Whether an ``nn.Module`` is reachable from ``score`` (then its weights identify it exactly): the
    walk of :func:`content_digests`, hashing nothing and stopping at the first module."""
    found = [False]
    _walk(score, "score", 0, set(), None, found)
    return found[0]


def probe_outputs(
    score: Callable[..., Tensor],
    sde: SDE,
    dims: tuple[int, ...],
    t_end: float,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    *,
    seed: int = PROBE_SEED,
    rows: int = PROBE_ROWS,
    cond: dict[str, Tensor] | None = None,
) -> Any:
    """σ(t)·score(σ(t)·z, t) at ``rows`` fixed inputs (keyed noise of ``seed``) and the times
    PROBE_FRACTIONS of [t_end, T], as float64 on the CPU: a score's fingerprint by its outputs (run
    folders, IIA tables, fitted grids). ``cond``: conditioning rows for the probe's rows."""
    frac = torch.tensor(PROBE_FRACTIONS[:rows], dtype=torch.float64)
    t = (t_end + frac * (sde.T - t_end)).to(dtype=dtype, device=device)
    z = NoiseSource.from_seed(seed, rows).normal(dims, Stream.USER, 0, dtype=dtype, device=device)
    sig = sde.marginal_std(t).reshape(-1, *([1] * len(dims)))
    kw = {} if cond is None else {k: v[:rows] for k, v in cond.items()}
    with torch.no_grad():
        out = score(sig * z, t, **kw)
    if not isinstance(out, Tensor) or out.shape != z.shape:
        return out  # not a score's output: the caller (or the run's own first call) says what is wrong
    return (sig * out).to(torch.float64).cpu()


def probe(
    score: Callable[..., Tensor],
    sde: SDE,
    dims: tuple[int, ...],
    t_end: float,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    cond: dict[str, Tensor] | None = None,
) -> list[float]:
    """:func:`probe_outputs` sketched to PROBE_PROJECTIONS numbers per row (float64; NaN stays NaN), for
    a run folder's manifest; [] for a score whose output is not shaped like its input."""
    rows = PROBE_ROWS if cond is None else min(PROBE_ROWS, *(int(v.shape[0]) for v in cond.values()))
    out = probe_outputs(score, sde, dims, t_end, dtype, device, rows=rows, cond=cond)
    if not isinstance(out, Tensor) or out.shape != (rows, *dims):
        return []
    flat = out.reshape(rows, -1)
    proj = NoiseSource.from_seed(PROBE_SEED, rows).normal(
        (flat.shape[1], PROBE_PROJECTIONS), Stream.USER, 1, dtype=torch.float64
    )[0]
    return [float(v) for v in (flat @ proj / math.sqrt(flat.shape[1])).reshape(-1)]


def probe_matches(old: list[float], new: list[float], dtype: torch.dtype) -> bool:
    """Whether two probes are the same score up to the rounding of ``dtype`` (NaN matches NaN)."""
    if len(old) != len(new):
        return False
    a = torch.tensor(old, dtype=torch.float64)
    b = torch.tensor(new, dtype=torch.float64)
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return False
    a, b = a.nan_to_num(0.0), b.nan_to_num(0.0)
    rtol = PROBE_RTOL.get(dtype, PROBE_RTOL_DEFAULT)
    return float((a - b).norm()) <= rtol * max(float(a.norm()), float(b.norm()), 1e-300)

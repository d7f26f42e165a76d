"""Sharded, resumable sampling: ``sample_to_dir`` writes a run of n samples as fixed-size shards of
consecutive indices plus a manifest; ``load_samples`` reads them back in index order.

Why this works for any number of workers: fastsde's noise is keyed by sample index
(:meth:`~fastsde.noise.NoiseSource.from_seed` with ``start``), so shard k, computed alone, holds
exactly rows [k·s, k·s + s) of ``fastsde.sample(..., seed=seed)``. The folder, the manifest, resuming,
the refusal of other settings or another model, the writer's lock and torchrun's ranks are the shard
engine's (``fastsde.shards``); this module says what a sampling run is: its settings, and how one
shard's samples are drawn.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .api import DEFAULT_SOLVER, _recordable, check_dtype, check_run, sample
from .guidance import with_null_rows
from .identity import content_digests
from .noise import NoiseSource, check_seed
from .score import check_cond
from .sde import SDE
from .shards import (
    ShardInfo,
    ShardRun,
    device_for_rank,
    model_probe,
    read_manifest,
    read_shards,
    run_shards,
    score_identity,
)
from .solvers import SolverSpec
from .solvers.core.options import as_python_number

__all__ = ["sample_to_dir", "load_samples", "cond_digest"]


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


@dataclass(frozen=True)
class SampleJob:
    """What every shard of a sampling run draws with: the model, the solver and its options, the
    run's seed and the per-call settings of ``fastsde.sample`` (``cond``: the whole run's rows)."""

    score: Any
    sde: SDE
    dims: tuple[int, ...]
    spec: SolverSpec
    seed: int
    t_end: float
    denoise: bool
    dtype: torch.dtype
    device: torch.device | None
    options: dict[str, Any]
    batch_size: int | None = None
    progress: bool = False
    cond: dict[str, Tensor] | None = None

    def settings(self, n: int, shard_size: int, model: str | None) -> dict[str, Any]:
        """What identifies the run (JSON data, as read back from the manifest)."""
        spec = self.spec
        resolved = spec.resolve(self.sde, dict(self.options), self.t_end)  # also validates names and values
        if resolved.get("per_sample_norm") is False:  # pc's default, as in Song et al.'s code
            raise ValueError(
                f"{spec.name} with per_sample_norm=False takes its corrector step from norms averaged over the "
                "batch, so a sample depends on which samples share its shard: pass per_sample_norm=True "
                "(--option per_sample_norm=true) for a sharded run"
            )
        settings = {
            "model": score_identity(self.score, model),
            "model_content": content_digests(self.score),
            "sde": self.sde.config(),
            "solver": spec.name,
            "options": {k: _jsonable(v) for k, v in resolved.items()},
            "t_end": float(self.t_end),
            "denoise": self.denoise,
            "seed": self.seed,
            "n": n,
            "shape": list(self.dims),
            "dtype": str(self.dtype).removeprefix("torch."),
            "shard_size": shard_size,
        }
        settings = json.loads(json.dumps(settings))
        if self.cond is not None:
            settings["cond"] = cond_digest(self.cond)
        return settings

    def draw(self, a: int, b: int) -> tuple[Tensor, Tensor, list[str], Tensor | None]:
        """Rows [a, b) of the run, with the noise (and the conditioning rows) of those global indices:
        samples, NFE per sample, status, and for a multilevel run the (rows, K) evaluations per level."""
        chunks, nfes, status, levels = [], [], [], []
        step = self.batch_size or (b - a)
        for lo in range(a, b, step):
            hi = min(b, lo + step)
            res = sample(
                self.score,
                self.sde,
                (hi - lo, *self.dims),
                solver=self.spec,
                seed=NoiseSource.from_seed(self.seed, hi - lo, start=lo),
                t_end=self.t_end,
                denoise=self.denoise,
                dtype=self.dtype,
                device=self.device,
                progress=self.progress,
                cond=None if self.cond is None else {k: v[lo:hi] for k, v in self.cond.items()},
                **self.options,
            )
            chunks.append(res.samples.detach().to("cpu"))
            nfes.append(res.nfe_per_sample.to(torch.float64))
            status += list(res.stats.get("status", ["done"] * (hi - lo)))
            if "nfe_per_level_per_sample" in res.stats:
                levels.append(res.stats["nfe_per_level_per_sample"].detach().to("cpu", torch.float64))
        per_level = torch.cat(levels) if levels else None
        return torch.cat(chunks), torch.cat(nfes), status, per_level

    def shard(self, k: int, a: int, b: int) -> tuple[dict[str, np.ndarray], Tensor, list[str]]:
        """One shard's arrays for the engine (``fastsde.shards.run_shards``): the samples and, for a
        multilevel run, each sample's evaluations per level and its compute."""
        samples, nfe, status, per_level = self.draw(a, b)
        arr = samples if samples.dtype != torch.bfloat16 else samples.float()
        arrays = {"samples": arr.numpy()}
        if per_level is not None:  # multilevel: each sample's evaluations per level, and its compute
            arrays["nfe_per_level"] = per_level.numpy()
            arrays["cost_per_sample"] = (per_level @ torch.tensor(self.score.costs, dtype=torch.float64)).numpy()
        return arrays, nfe, status


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
    shape, spec, t_end, denoise = check_run(score, sde, shape, solver, t_end, denoise, options)
    cond_kw = check_cond(with_null_rows(score, cond, shape[0]), shape[0])  # CFG's per-sample null rows too
    seed = check_seed(seed, "seed")
    shard_size = as_python_number(shard_size)
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    dtype = check_dtype(dtype)
    job = SampleJob(
        score, sde, shape[1:], spec, seed, t_end, denoise, dtype, None, options, batch_size, progress, cond_kw
    )
    settings = job.settings(shape[0], shard_size, model)  # validates the options before the device is taken
    dev = device_for_rank(device)
    job = replace(job, device=dev)

    def probe_record() -> dict[str, Any] | None:
        return model_probe(score, sde, job.dims, t_end, dtype, dev, cond_kw)

    return run_shards(Path(out_dir), settings, dev, job.shard, on_shard, probe_record)


def load_samples(
    out_dir: str | Path, *, allow_incomplete: bool = False, with_indices: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """All samples of a run folder in index order, in the run's dtype (equal to ``fastsde.sample``
    with the run's settings). An incomplete run is a ValueError naming the missing shards unless
    ``allow_incomplete``; then only the shards done are returned, and ``with_indices`` also returns
    their global sample indices."""
    out = Path(out_dir)
    manifest = read_manifest(out)
    settings = manifest["settings"]
    if settings.get("kind", "samples") != "samples":
        raise ValueError(f"{str(out)!r} holds a {settings['kind']} run: read it with load_likelihood")
    n, dims, dtype = settings["n"], settings["shape"], settings["dtype"]
    shards = read_shards(out, manifest)
    parts = [torch.from_numpy(data["samples"]) for _, _, _, data in shards if data is not None]
    idx = [torch.arange(a, b) for _, a, b, data in shards if data is not None]
    missing = [(k, b - a) for k, a, b, data in shards if data is None]
    if missing and not allow_incomplete:
        have = n - sum(rows for _, rows in missing)
        shown = ", ".join(str(k) for k, _ in missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise ValueError(
            f"the run in {str(out)!r} is incomplete: {len(missing)} of {len(shards)} shards missing "
            f"({shown}; {have} of {n} samples done); rerun the same command to resume it, or pass "
            "allow_incomplete=True"
        )
    tdtype = getattr(torch, dtype)
    x = torch.cat(parts).to(tdtype) if parts else torch.empty((0, *dims), dtype=tdtype)
    if with_indices:
        return x, (torch.cat(idx) if idx else torch.empty(0, dtype=torch.long))
    return x

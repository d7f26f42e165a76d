"""Sharded, resumable log-likelihood of a data set: ``likelihood_to_dir`` evaluates rows [a, b) of
the data per shard with the dequantisation noise and probes of those global indices, so
``load_likelihood(DIR)`` equals ``fastsde.dataset_likelihood`` on the whole data set (to rounding:
the adaptive RK45 solve of a batch depends on its composition); the folder, resuming, refusals and
torchrun behave as for ``fastsde.sample_to_dir`` (fastsde.sharding)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .api import check_score_and_process
from .identity import content_digests
from .likelihood import bits_per_dim, bpd_offset
from .likelihood_data import DatasetLikelihood, _as_levels, _positive_int, evaluate_passes
from .noise import NoiseSource, check_seed
from .sde import SDE
from .sharding import (
    ShardInfo,
    ShardRun,
    _fingerprint,
    _ranges,
    _read_shard,
    _run_shards,
    _shard_name,
    device_for_rank,
    model_probe,
    read_manifest,
    score_identity,
)

__all__ = ["likelihood_to_dir", "load_likelihood"]


def likelihood_to_dir(
    score: Any,
    sde: SDE,
    data: Any,
    shape: Sequence[int],
    out_dir: str | Path,
    *,
    shard_size: int = 1000,
    model: str | None = None,
    levels: int | None = None,
    offset: float | None = None,
    seed: int = 0,
    passes: int = 1,
    batch_size: int = 256,
    trace: str | None = None,
    probes: int = 1,
    probe: str = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "rk45",
    max_steps: int = 10_000,
    dtype: torch.dtype = torch.float32,
    on_shard: Callable[[ShardInfo], Any] | None = None,
    levels_option: str = "levels",
) -> ShardRun:
    """``fastsde.dataset_likelihood(score, sde, data, shape, ...)`` into ``out_dir`` as shards of
    ``shard_size`` rows (per-sample log p, bits/dim and NFE) and a manifest; rerunning resumes, other
    settings (or other data: the manifest keeps its sha256) are refused. Arguments as there, plus
    ``shard_size``, ``model`` (a name for the manifest) and ``on_shard`` as for ``sample_to_dir``."""
    check_score_and_process(score, sde)
    shape = tuple(int(s) for s in shape)
    seed = check_seed(seed, "seed")
    for name, value in (("passes", passes), ("batch_size", batch_size), ("probes", probes), ("shard_size", shard_size)):
        _positive_int(name, value)
    arr, lv, _note = _as_levels(data, shape, levels, levels_option)  # once, on the whole data set
    if offset is None:
        offset = bpd_offset(lv) if lv is not None else 0.0
    d = math.prod(shape)
    trace = trace or ("exact" if d <= 16 else "hutchinson")
    n = arr.shape[0]
    digest = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
    settings = {
        "kind": "likelihood",
        "model": score_identity(score, model),
        "model_content": content_digests(score),
        "sde": sde.config(),
        "data": {"sha256": digest, "shape": list(arr.shape), "dtype": str(arr.dtype)},
        "levels": lv,
        "offset": float(offset),
        "trace": trace,
        "probes": probes,
        "probe": probe,
        "rtol": float(rtol),
        "atol": float(atol),
        "method": method,
        "max_steps": max_steps,
        "passes": passes,
        "seed": seed,
        "n": n,
        "shape": list(shape),
        "dtype": str(dtype).removeprefix("torch."),
        "shard_size": shard_size,
    }
    fp = _fingerprint(settings)
    ranges = _ranges(n, shard_size)
    dev = device_for_rank("cpu")

    def compute(k: int, a: int, b: int) -> tuple[dict[str, np.ndarray], Tensor, list[str]]:
        noise = NoiseSource.from_seed(seed, b - a, start=a)
        res = evaluate_passes(
            score,
            sde,
            arr[a:b],
            lv,
            noise,
            d,
            offset,
            passes=passes,
            batch_size=batch_size,
            trace=trace,
            probes=probes,
            probe=probe,
            rtol=rtol,
            atol=atol,
            method=method,
            max_steps=max_steps,
            dtype=dtype,
        )
        logp, nfe = res.logp, res.nfe
        arrays = {
            "logp": logp.numpy(),
            "bpd": bits_per_dim(logp, d, offset).numpy(),
            "nfe_passes": nfe.numpy(),
            "pass_bpd": np.array(res.pass_bpd, dtype=np.float64),
        }
        return arrays, nfe.mean(dim=0), ["done"] * (b - a)

    def probe_record() -> dict[str, Any] | None:
        return model_probe(score, sde, shape, sde.default_t_end, dtype, dev)

    return _run_shards(Path(out_dir), settings, fp, ranges, dev, compute, on_shard, probe_record)


def load_likelihood(out_dir: str | Path, *, allow_incomplete: bool = False) -> DatasetLikelihood:
    """A likelihood run folder as ``fastsde.dataset_likelihood`` returns it (``calls`` is 0: batched
    calls are not kept per shard; ``wall_time`` is the shards' total). An incomplete run is a
    ValueError naming the missing shards unless ``allow_incomplete`` (then the rows done, in order)."""
    out = Path(out_dir)
    manifest = read_manifest(out)
    settings, fp = manifest["settings"], manifest["fingerprint"]
    if settings.get("kind") != "likelihood":
        raise ValueError(f"{str(out)!r} holds a sampling run: read it with load_samples")
    n, size, shape = settings["n"], settings["shard_size"], tuple(settings["shape"])
    ranges = _ranges(n, size)
    parts: list[dict[str, Any]] = []
    missing = []
    for k, (a, b) in enumerate(ranges):
        data = _read_shard(out / _shard_name(k, len(ranges)), fp, k, a, b, settings)
        if data is None:
            missing.append(k)
        else:
            parts.append(data)
    if (missing and not allow_incomplete) or not parts:
        shown = ", ".join(str(k) for k in missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise ValueError(
            f"the likelihood run in {str(out)!r} is incomplete: {len(missing)} of {len(ranges)} shards missing "
            f"({shown}); rerun the same command to resume it, or pass allow_incomplete=True"
        )
    logp = torch.from_numpy(np.concatenate([p["logp"] for p in parts]))
    bpd = torch.from_numpy(np.concatenate([p["bpd"] for p in parts]))
    nfe = torch.from_numpy(np.concatenate([p["nfe_passes"] for p in parts], axis=1))
    rows = np.array([p["logp"].shape[0] for p in parts], dtype=np.float64)
    pass_bpd = (np.stack([p["pass_bpd"] for p in parts]) * rows[:, None]).sum(axis=0) / rows.sum()
    lv = settings["levels"]
    note = f"dequantised {lv} levels onto [-1, 1]" if lv is not None else "continuous float data used as given"
    return DatasetLikelihood(
        logp=logp,
        bpd=bpd,
        pass_bpd=[float(v) for v in pass_bpd],
        nfe_per_sample=nfe,
        calls=0,
        wall_time=float(sum(float(p["wall_s"]) for p in parts)),
        offset=settings["offset"],
        note=note,
        trace=settings["trace"],
        shape=shape,
    )

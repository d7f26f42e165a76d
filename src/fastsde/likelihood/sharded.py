"""Sharded, resumable log-likelihood of a data set: ``likelihood_to_dir`` evaluates rows [a, b) of
the data per shard with the dequantisation noise and probes of those global indices, so
``load_likelihood(DIR)`` equals ``fastsde.dataset_likelihood`` on the whole data set (to rounding:
the adaptive RK45 solve of a batch depends on its composition); the folder, resuming, refusals and
torchrun are the shard engine's (``fastsde.shards``), as for ``fastsde.sample_to_dir``."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..identity import content_digests
from ..noise import NoiseSource, check_seed
from ..score import check_score_and_process
from ..sde import SDE
from ..shards import (
    ShardInfo,
    ShardRun,
    device_for_rank,
    model_probe,
    read_manifest,
    read_shards,
    run_shards,
    score_identity,
)
from .dataset import DatasetLikelihood, LevelRows, _positive_int, evaluate_passes, level_rows
from .pf_ode import LikelihoodSettings, bits_per_dim, default_trace

__all__ = ["likelihood_to_dir", "load_likelihood"]


@dataclass(frozen=True)
class _LikelihoodJob:
    """What every shard of a likelihood run evaluates with: the model, the checked rows of the
    whole data set, the run's seed and the settings."""

    score: Any
    sde: SDE
    rows: LevelRows
    seed: int
    settings: LikelihoodSettings

    def run_settings(self, shape: tuple[int, ...], shard_size: int, model: str | None) -> dict[str, Any]:
        """What identifies the run in its manifest (the data by its sha256)."""
        arr, s = self.rows.arr, self.settings
        digest = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
        return {
            "kind": "likelihood",
            "model": score_identity(self.score, model),
            "model_content": content_digests(self.score),
            "sde": self.sde.config(),
            "data": {"sha256": digest, "shape": list(arr.shape), "dtype": str(arr.dtype)},
            "levels": self.rows.levels,
            "offset": float(self.rows.offset),
            "trace": s.trace,
            "probes": s.probes,
            "probe": s.probe,
            "rtol": float(s.rtol),
            "atol": float(s.atol),
            "method": s.method,
            "max_steps": s.max_steps,
            "passes": s.passes,
            "seed": self.seed,
            "n": arr.shape[0],
            "shape": list(shape),
            "dtype": str(s.dtype).removeprefix("torch."),
            "shard_size": shard_size,
            # scipy's solve_ivp steps the flattened batch together, so its results depend on the batch;
            # rk45 steps each sample on its own, so its runs resume under any batch size
            **({"batch_size": s.batch_size} if s.method == "scipy" else {}),
        }

    def shard(self, k: int, a: int, b: int) -> tuple[dict[str, np.ndarray], Tensor, list[str]]:
        """Rows [a, b) with the noise of those global indices: per-row log p, bits/dim and NFE per
        pass, and each pass's mean bits/dim."""
        noise = NoiseSource.from_seed(self.seed, b - a, start=a)
        res = evaluate_passes(self.score, self.sde, self.rows.rows(a, b), noise, self.settings)
        logp, nfe = res.logp, res.nfe
        arrays = {
            "logp": logp.numpy(),
            "bpd": bits_per_dim(logp, self.rows.dims, self.rows.offset).numpy(),
            "nfe_passes": nfe.numpy(),
            "pass_bpd": np.array(res.pass_bpd, dtype=np.float64),
        }
        return arrays, nfe.mean(dim=0), ["done"] * (b - a)


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
    rows = level_rows(data, shape, levels, offset, levels_option)  # once, on the whole data set
    settings = LikelihoodSettings(
        trace=trace or default_trace(rows.dims),
        probes=probes,
        probe=probe,
        rtol=rtol,
        atol=atol,
        method=method,
        max_steps=max_steps,
        passes=passes,
        batch_size=batch_size,
        dtype=dtype,
    )
    job = _LikelihoodJob(score, sde, rows, seed, settings)
    run_settings = job.run_settings(shape, shard_size, model)
    dev = device_for_rank("cpu")

    def probe_record() -> dict[str, Any] | None:
        return model_probe(score, sde, shape, sde.default_t_end, dtype, dev)

    return run_shards(Path(out_dir), run_settings, dev, job.shard, on_shard, probe_record)


def load_likelihood(out_dir: str | Path, *, allow_incomplete: bool = False) -> DatasetLikelihood:
    """A likelihood run folder as ``fastsde.dataset_likelihood`` returns it (``calls`` is 0: batched
    calls are not kept per shard; ``wall_time`` is the shards' total). An incomplete run is a
    ValueError naming the missing shards unless ``allow_incomplete`` (then the rows done, in order)."""
    out = Path(out_dir)
    manifest = read_manifest(out)
    settings = manifest["settings"]
    if settings.get("kind") != "likelihood":
        raise ValueError(f"{str(out)!r} holds a sampling run: read it with load_samples")
    shape = tuple(settings["shape"])
    shards = read_shards(out, manifest)
    parts: list[dict[str, Any]] = [data for _, _, _, data in shards if data is not None]
    missing = [k for k, _, _, data in shards if data is None]
    if (missing and not allow_incomplete) or not parts:
        shown = ", ".join(str(k) for k in missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise ValueError(
            f"the likelihood run in {str(out)!r} is incomplete: {len(missing)} of {len(shards)} shards missing "
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

"""Bits/dim of a data set under a model, through the probability-flow ODE (behind ``fastsde likelihood``).

Integer data (quantised levels; 17 when the largest value is ≤ 16, else 256, as ``fastsde.data``
reads integer arrays) is dequantised with keyed uniform noise and mapped to the model's range
[-1, 1]. Float data must lie in that range: if it sits on a grid of L levels (the digits' 17 levels
stored as floats) it is mapped back to levels and dequantised, else it is used as given. The bits/dim
offset is log2(levels) − 1 (7 for 8-bit data), as Score SDE reports it; continuous data gets none.

``dataset_likelihood`` runs the PF-ODE likelihood (``fastsde.likelihood.pf_ode``) over the rows in
batches, for one or more passes (each with fresh dequantisation noise and Hutchinson probes), and
averages log p per sample over passes. Its options travel as one ``LikelihoodSettings``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data import integer_levels
from ..noise import NoiseSource, as_noise_source
from ..score import NoisePredictionScore, ScoreFn
from ..sde import SDE
from .pf_ode import LikelihoodSettings, bits_per_dim, bpd_offset, default_trace, dequantize, pf_ode_likelihood

__all__ = [
    "DatasetLikelihood",
    "LevelRows",
    "PreparedData",
    "dataset_likelihood",
    "differentiable_score",
    "evaluate_passes",
    "grid_levels",
    "level_rows",
    "prepare_data",
]


@dataclass
class PreparedData:
    """Data in model space: ``x`` (n, *shape); ``levels`` its quantisation levels (None for
    continuous data used as given); ``offset`` the bits/dim offset; ``note`` what was done."""

    x: Tensor
    levels: int | None
    offset: float
    note: str


@dataclass
class DatasetLikelihood:
    """Log-likelihood of a data set: per sample, averaged over passes, and what it cost.

    ``nfe_per_sample`` is (passes, n): the evaluations each sample received in each pass.
    """

    logp: Tensor
    bpd: Tensor
    pass_bpd: list[float]
    nfe_per_sample: Tensor
    calls: int
    wall_time: float
    offset: float
    note: str
    trace: str
    shape: tuple[int, ...]

    @property
    def bits_per_dim(self) -> float:
        """Mean bits/dim over the samples."""
        return float(self.bpd.mean())

    @property
    def standard_error(self) -> float:
        """Standard error of the mean bits/dim over samples (NaN for one sample)."""
        n = self.bpd.shape[0]
        return float(self.bpd.std() / math.sqrt(n)) if n > 1 else float("nan")

    @property
    def nfe(self) -> float:
        """Mean evaluations per sample and pass."""
        return float(self.nfe_per_sample.mean())


def differentiable_score(model: Any) -> ScoreFn:
    """model.score if autograd flows through it, else the model's score with autograd on: a loaded
    model's ``autograd_score`` (flow, noise-prediction, conditional and diffusers-folder models), or the
    score rebuilt from a noise-prediction ``network`` with a ``time_input``. The score used is checked
    against model.score before use. A ValueError if neither works."""
    probe_x = torch.zeros(2, *model.shape)
    probe_t = torch.tensor([0.5 * model.sde.T, 0.9 * model.sde.T])
    refused = ValueError(f"model {model!r} has no differentiable score; the likelihood needs autograd through it")
    with torch.enable_grad():
        xin = probe_x.clone().requires_grad_(True)
        out = model.score(xin, probe_t)
        if out.requires_grad:
            return model.score
        score = getattr(model, "autograd_score", None)
        if score is None:
            net = getattr(model, "network", None)
            if net is None or not hasattr(net, "time_input"):
                raise refused
            score = NoisePredictionScore(net, model.sde, time_input=net.time_input)
        again = score(xin, probe_t)
    if not again.requires_grad or not torch.allclose(again.detach(), out, rtol=1e-5, atol=1e-6):
        raise refused
    return score


def grid_levels(arr: np.ndarray, levels: int | None = None) -> int | None:
    """Number of levels L if every value of float data in [-1, 1] sits on the grid −1 + 2k/(L−1)
    (quantised data stored as floats, e.g. the digits' 17 levels), else None. With ``levels`` only
    that grid is tried."""
    u = np.unique(arr.astype(np.float64))
    if u.size > 256:
        return None
    v = (u + 1.0) / 2.0
    for k in [levels - 1] if levels is not None else range(1, 256):
        r = v * k
        if np.all(np.abs(r - np.round(r)) < 1e-4):
            return k + 1
    return None


def _as_levels(
    data: Any, shape: tuple[int, ...], levels: int | None, levels_option: str
) -> tuple[np.ndarray, int | None, str]:
    """Checked data as (integer levels, L, note), or (floats, None, note) for continuous data."""
    if isinstance(data, Tensor):
        data = data.detach().cpu().numpy()
    arr = np.asarray(data)
    d = math.prod(shape)
    if arr.ndim < 2 or arr.shape[0] == 0:
        raise ValueError(f"data must have shape (n, {', '.join(map(str, shape))}) or (n, {d}), got {arr.shape}")
    if tuple(arr.shape[1:]) != shape:
        if math.prod(arr.shape[1:]) != d:
            raise ValueError(
                f"data shape {arr.shape} does not match the model's sample shape {shape}: "
                f"expected (n, {', '.join(map(str, shape))}) or (n, {d})"
            )
        arr = arr.reshape(arr.shape[0], *shape)
    if arr.dtype.kind in "iub":
        lo, hi = int(arr.min()), int(arr.max())
        lv = levels if levels is not None else integer_levels(arr)
        if lo < 0 or hi > lv - 1:
            raise ValueError(
                f"integer data must hold levels 0..{lv - 1} (set {levels_option}), got values in [{lo}, {hi}]"
            )
        note = f"dequantised {lv} levels onto [-1, 1]" + (f" ({levels_option} to override)" if levels is None else "")
        return arr.astype(np.int64), lv, note
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ValueError("data holds NaN or Inf")
        lo, hi = float(arr.min()), float(arr.max())
        outside = lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6
        if outside and bool(np.all(arr == np.round(arr))):  # levels (0..255, 0..16) stored as floats
            raise ValueError(
                f"float data must lie in the model's range [-1, 1], got values in [{lo:.4g}, {hi:.4g}]; "
                "pass integer levels to have them dequantised"
            )
        lv = None if outside else grid_levels(arr, levels)  # continuous data may leave [-1, 1] (a mixture's tails)
        if lv is None:
            if levels is not None:
                raise ValueError(f"float data does not sit on the grid of {levels} levels in [-1, 1] ({levels_option})")
            return arr, None, "continuous float data used as given"
        ints = np.round((arr.astype(np.float64) + 1.0) / 2.0 * (lv - 1)).astype(np.int64)
        return ints, lv, f"float data on a grid of {lv} levels, dequantised onto [-1, 1]"
    raise ValueError(f"data must be integer levels or floats, got dtype {arr.dtype}")


def _model_space(
    arr: np.ndarray, lv: int | None, seed: int | Sequence[int] | NoiseSource, dtype: torch.dtype, pass_index: int
) -> Tensor:
    if lv is None:
        return torch.from_numpy(arr).to(dtype)
    return dequantize(torch.from_numpy(arr), seed=seed, levels=lv, pass_index=pass_index, dtype=dtype)


def prepare_data(
    data: Any,
    shape: tuple[int, ...],
    levels: int | None = None,
    seed: int | Sequence[int] | NoiseSource = 0,
    dtype: torch.dtype = torch.float32,
    pass_index: int = 0,
    *,
    levels_option: str = "levels",
) -> PreparedData:
    """Check shape and range of data (n, *shape) or (n, D); dequantise quantised data.

    Integer data holds levels 0..levels−1 (default: 17 if its largest value is ≤ 16, else 256).
    Float data on a grid in [-1, 1]: if it sits on a grid of L levels (found, or ``levels`` if given)
    it is mapped back to levels and dequantised, since a density evaluated at lattice points is
    meaningless; otherwise it is used as given, with offset 0 (no dequantisation, so bits/dim is
    the density's −log2 p per dimension in the units of x). ``seed`` keys the
    dequantisation noise per sample, ``pass_index`` draws fresh noise for repeated passes.
    ``levels_option`` is how messages name the levels setting (the command line: "--levels").
    """
    arr, lv, note = _as_levels(data, tuple(shape), levels, levels_option)
    x = _model_space(arr, lv, seed, dtype, pass_index)
    return PreparedData(x, lv, bpd_offset(lv) if lv is not None else 0.0, note)


def _positive_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")


@dataclass
class LevelRows:
    """The checked rows of a data set (``_as_levels``): ``arr`` (n, *shape) as integer levels with
    their number ``levels``, or floats used as given (``levels`` None); ``offset`` the bits/dim
    offset; ``note`` what was done."""

    arr: np.ndarray
    levels: int | None
    offset: float
    note: str

    @property
    def dims(self) -> int:
        """Values per row (D)."""
        return math.prod(self.arr.shape[1:])

    def rows(self, start: int, stop: int) -> LevelRows:
        """Rows [start, stop) of these."""
        return replace(self, arr=self.arr[start:stop])


def level_rows(
    data: Any, shape: tuple[int, ...], levels: int | None, offset: float | None, levels_option: str = "levels"
) -> LevelRows:
    """The rows of ``data`` checked against the sample ``shape`` (see ``prepare_data``), with the
    bits/dim ``offset`` (default: that of their levels; 0 for continuous data)."""
    arr, lv, note = _as_levels(data, shape, levels, levels_option)
    if offset is None:
        offset = bpd_offset(lv) if lv is not None else 0.0  # continuous data: no dequantisation offset
    return LevelRows(arr, lv, offset, note)


@dataclass
class PassResult:
    """What ``evaluate_passes`` returns: log p per row averaged over passes, NFE (passes, n), calls,
    the mean bits/dim of each pass."""

    logp: Tensor
    nfe: Tensor
    calls: int
    pass_bpd: list[float]


def evaluate_passes(
    score: ScoreFn,
    sde: SDE,
    rows: LevelRows,
    noise: NoiseSource,
    settings: LikelihoodSettings,
    bar: Any = None,
) -> PassResult:
    """The PF-ODE likelihood of the rows in batches of ``settings.batch_size``, for each of
    ``settings.passes`` passes with fresh dequantisation noise and probes of the rows' own seeds
    (``noise``, one per row): the loop of ``dataset_likelihood`` and of each shard of
    ``likelihood_to_dir``. ``bar``: a tqdm bar to advance."""
    arr, d, offset = rows.arr, rows.dims, rows.offset
    n = arr.shape[0]
    logps, nfes, calls, pass_bpd = [], [], 0, []
    for p in range(settings.passes):
        x = _model_space(arr, rows.levels, noise, settings.dtype, p)
        pass_settings = replace(settings, pass_index=p)
        pass_logps, pass_nfes = [], []
        for lo in range(0, n, settings.batch_size):
            batch = list(range(lo, min(n, lo + settings.batch_size)))
            out = pf_ode_likelihood(score, sde, x[batch[0] : batch[-1] + 1], noise.subset(batch), pass_settings)
            pass_logps.append(out.logp.detach().cpu().to(torch.float64))
            pass_nfes.append(out.nfe_per_sample.to(torch.float64))
            calls += out.calls
            if bar is not None:
                bar.update(len(batch))
                bar.set_postfix(bpd=f"{float(bits_per_dim(torch.cat(pass_logps), d, offset).mean()):.4f}")
        logps.append(torch.cat(pass_logps))
        nfes.append(torch.cat(pass_nfes))
        pass_bpd.append(float(bits_per_dim(logps[-1], d, offset).mean()))
    return PassResult(torch.stack(logps).mean(dim=0), torch.stack(nfes), calls, pass_bpd)


def dataset_likelihood(
    score: ScoreFn,
    sde: SDE,
    data: Any,
    shape: Sequence[int],
    *,
    levels: int | None = None,
    offset: float | None = None,
    seed: int | Sequence[int] | NoiseSource = 0,
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
    progress: bool = False,
    levels_option: str = "levels",
) -> DatasetLikelihood:
    """Log-likelihood and bits/dim of every row of ``data`` under (score, sde).

    The rows are prepared as in ``prepare_data`` (``levels``, ``seed``, ``dtype``) and evaluated by
    ``log_likelihood`` in batches of ``batch_size`` (``trace``: default "exact" if D ≤ 16, else
    "hutchinson"; ``probes``, ``probe``, ``rtol``, ``atol``, ``method``, ``max_steps`` as there).
    Sample i's dequantisation noise and probes depend only on its seed, so the result does not
    depend on the batch size. Each of ``passes`` passes draws fresh noise and probes; log p is
    averaged per sample over passes. ``offset`` overrides the bits/dim offset of the data.
    ``progress`` shows a tqdm bar with the running bits/dim of the pass.
    """
    _positive_int("passes", passes)
    _positive_int("batch_size", batch_size)
    shape = tuple(shape)
    rows = level_rows(data, shape, levels, offset, levels_option)
    d = rows.dims
    settings = LikelihoodSettings(
        trace=trace or default_trace(d),
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
    n = rows.arr.shape[0]
    noise = as_noise_source(seed, n)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n * passes, desc="likelihood", unit="sample")
    start = time.perf_counter()
    try:
        passes_out = evaluate_passes(score, sde, rows, noise, settings, bar)
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - start
    logp = passes_out.logp
    return DatasetLikelihood(
        logp=logp,
        bpd=bits_per_dim(logp, d, rows.offset),
        pass_bpd=passes_out.pass_bpd,
        nfe_per_sample=passes_out.nfe,
        calls=passes_out.calls,
        wall_time=wall,
        offset=rows.offset,
        note=rows.note,
        trace=settings.trace,
        shape=shape,
    )

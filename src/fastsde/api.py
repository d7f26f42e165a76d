"""The front door: ``fastsde.sample`` picks a solver, runs it, applies the final denoise and returns
the samples with their accounting."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .noise import NoiseSource, Stream, as_noise_source
from .score import CountingScore, ScoreFn
from .sde import SDE
from .solvers import SolverSpec, get_solver
from .solvers.base import SolverContext, StepInfo

__all__ = ["SampleResult", "sample", "check_shape", "check_score_and_process"]


@dataclass
class SampleResult:
    """Samples and their accounting.

    ``nfe`` is the mean over samples of the score evaluations each sample received (rejected steps
    and the final denoise included); ``calls`` counts calls made to the score (batched).
    """

    samples: Tensor
    nfe: float
    nfe_per_sample: Tensor
    calls: int
    solver: str
    options: dict[str, Any]
    wall_time: float
    stats: dict[str, Any] = field(default_factory=dict)
    stopped_early: bool = False
    #: mean compute per sample: evaluations × cost per evaluation (equals ``nfe`` for a plain score)
    cost: float | None = None

    def __post_init__(self) -> None:
        if self.cost is None:
            self.cost = self.nfe

    def config(self) -> dict[str, Any]:
        """Every knob that produced these samples (for benchmark records)."""
        return {"solver": self.solver, **self.options}


def check_score_and_process(score: Any, sde: Any) -> None:
    """The front doors' first checks: a fastsde process and a callable score."""
    if not isinstance(sde, SDE):
        raise ValueError(f"sde must be a fastsde process (VPSDE, SubVPSDE, VESDE, EDM), got {sde!r}")
    if not callable(score):
        raise ValueError(f"score must be callable as score(x, t), got {score!r}")


def check_shape(shape: Any) -> tuple[int, ...]:
    """shape must be (n, *dims) of positive ints with at least one data dimension."""
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    ok = (
        isinstance(shape, (tuple, list))
        and len(shape) >= 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    )
    if not ok:
        raise ValueError(
            f"shape must be a tuple (n, *dims) of positive ints with at least one data dimension, got {shape!r}"
        )
    return tuple(shape)


def sample(
    score: ScoreFn,
    sde: SDE,
    shape: Sequence[int],
    solver: str | SolverSpec = "adaptive",
    seed: int | Sequence[int] | NoiseSource = 0,
    *,
    t_end: float | None = None,
    denoise: bool = True,
    callback: Callable[[StepInfo], Any] | None = None,
    progress: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    x_init: Tensor | None = None,
    **options: Any,
) -> SampleResult:
    """Draw samples from the model given by ``score`` under the process ``sde``.

    Args:
        score: callable score(x, t) with one time per row of x.
        sde: the forward process the score belongs to.
        shape: (n, *dims).
        solver: a solver name (see ``fastsde.SOLVERS``) or a SolverSpec.
        seed: one int, one int per sample, or a NoiseSource; sample i depends only on its seed.
        t_end: end time of the solve (default: the process's ε).
        denoise: apply the Tweedie denoise at t_end (1 NFE, counted).
        callback: called with a StepInfo after each step; return False to stop early.
        progress: show a tqdm progress bar.
        dtype, device: where the solve runs (default float32 on CPU; float64 works).
        x_init: start from this state at T instead of a prior draw.
        **options: solver options; unknown names are a ValueError listing the valid ones.
    """
    check_score_and_process(score, sde)
    shape = check_shape(shape)
    spec = get_solver(solver)
    t_end = sde.default_t_end if t_end is None else t_end
    sde.check_time("t_end", t_end)
    if not t_end < sde.T:
        raise ValueError(f"t_end must be < T = {sde.T:g}, got {t_end!r}")
    if not isinstance(denoise, bool):
        raise ValueError(f"denoise must be True or False, got {denoise!r}")
    opts = spec.resolve(sde, options, t_end)
    dtype = dtype or torch.get_default_dtype()
    n = shape[0]
    noise = as_noise_source(seed, n)
    if x_init is not None and tuple(x_init.shape) != shape:
        raise ValueError(f"x_init must have shape {shape}, got {tuple(x_init.shape)}")

    counted = CountingScore(score, n)
    ctx = SolverContext(
        sde=sde, score=counted, noise=noise, t_start=sde.T, t_end=float(t_end), callback=callback, progress=progress
    )
    start = time.perf_counter()
    with torch.no_grad():
        if x_init is None:
            x = sde.prior_sample(noise.normal(shape[1:], Stream.PRIOR, 0, dtype=dtype, device=device))
        else:
            x = x_init.to(device, dtype)
        x = spec.run(ctx, x, **opts)
        if denoise and not ctx.stopped:
            t = ctx.times(ctx.t_end, x)
            x = sde.denoise(x, t, counted(x, t))
    wall = time.perf_counter() - start
    return SampleResult(
        samples=x,
        nfe=counted.nfe,
        nfe_per_sample=counted.nfe_per_sample.clone(),
        calls=counted.calls,
        solver=spec.name,
        options={**opts, "t_end": float(t_end), "denoise": denoise, "sde": sde.config(), "n": n},
        wall_time=wall,
        stats=dict(ctx.stats, rows_evaluated=counted.rows_evaluated),
        stopped_early=ctx.stopped,
        cost=counted.compute,
    )

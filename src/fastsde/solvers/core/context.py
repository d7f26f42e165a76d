"""What a solver may touch besides its options (:class:`SolverContext`), what a callback sees
(:class:`StepInfo`), and the grid a fixed-step solver's options name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ...grids import time_grid
from ...noise import NoiseSource
from ...score import CountingScore
from ...sde import SDE, per_row

__all__ = ["StepInfo", "SolverContext", "solver_grid", "progress_bar"]


@dataclass
class StepInfo:
    """What a callback sees after each step (or attempted step, for adaptive solvers)."""

    step: int
    t: Tensor  # per-sample time after the step
    h: Tensor  # per-sample step size used
    x: Tensor
    nfe: float  # mean NFE per sample so far
    accepted: Tensor | None = None  # per-sample acceptance, adaptive solvers only
    x0_hat: Tensor | None = None


@dataclass
class SolverContext:
    """Everything a solver may touch besides its own options."""

    sde: SDE
    score: CountingScore
    noise: NoiseSource
    t_start: float
    t_end: float
    callback: Callable[[StepInfo], Any] | None = None
    progress: bool = False
    stats: dict[str, Any] = field(default_factory=dict)
    stopped: bool = False
    #: the run ends at t = 0 (``t_end=0``): the front door's denoise is its last move, so the solver's
    #: last move to ``t_end`` (the grid's last interior point) is not the run's final one
    denoise_is_final_move: bool = False

    def times(self, value: float | Tensor, x: Tensor) -> Tensor:
        """A per-row time vector for x."""
        return per_row(value, x.shape[0], x.dtype, x.device)

    def report(self, info: StepInfo) -> bool:
        """Pass a step to the callback; False means the user asked to stop."""
        if self.callback is None:
            return True
        if self.callback(info) is False:
            self.stopped = True
            return False
        return True


def solver_grid(ctx: SolverContext, opts: Mapping[str, Any]) -> Tensor:
    """The grid named by a fixed-step solver's options."""
    return time_grid(ctx.sde, opts["grid"], opts["steps"], ctx.t_start, ctx.t_end, opts["rho"])


def progress_bar(desc: str):
    """A tqdm bar of the share of the way from start to end in percent (an attempt count or a rate in
    "it/s" would mislead for adaptive solvers)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=100, desc=desc, leave=False, bar_format="{desc}: {n_fmt}/{total_fmt} % |{bar}| {elapsed}<{remaining}"
    )

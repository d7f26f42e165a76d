"""What every solver shares: its declaration (name, options, run function), the context it runs in,
option validators, and the fixed-grid loop.

A solver is a function ``run(ctx, x, **options) -> x_at_t_end``. It draws randomness only from
``ctx.noise``, evaluates the score only through ``ctx.score`` (which counts NFE), reports each step
through ``ctx.report`` and returns the state at ``ctx.t_end``; the front door applies the final
denoise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..grids import GRIDS, default_grid, time_grid
from ..noise import NoiseSource
from ..score import CountingScore
from ..sde import SDE

__all__ = [
    "Option",
    "SolverSpec",
    "SolverContext",
    "StepInfo",
    "positive_int",
    "positive_float",
    "nonnegative_float",
    "unit_interval",
    "one_of",
    "boolean",
    "grid_options",
    "run_grid",
]


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One solver option: its default (a value, or a function of the process) and its check."""

    default: Any
    check: Callable[[str, Any], None]
    doc: str = ""

    def default_for(self, sde: SDE) -> Any:
        return self.default(sde) if callable(self.default) else self.default


def positive_int(minimum: int = 1) -> Callable[[str, Any], None]:
    def check(name: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")

    return check


def _finite_number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def positive_float(name: str, v: Any) -> None:
    if _finite_number(name, v) <= 0:
        raise ValueError(f"{name} must be > 0, got {v!r}")


def nonnegative_float(name: str, v: Any) -> None:
    if _finite_number(name, v) < 0:
        raise ValueError(f"{name} must be >= 0, got {v!r}")


def unit_interval(name: str, v: Any) -> None:
    x = _finite_number(name, v)
    if not 0 < x <= 1:
        raise ValueError(f"{name} must lie in (0, 1], got {v!r}")


def one_of(*choices: Any) -> Callable[[str, Any], None]:
    def check(name: str, v: Any) -> None:
        if v not in choices:
            raise ValueError(f"{name} must be one of {list(choices)}, got {v!r}")

    return check


def boolean(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be True or False, got {v!r}")


def grid_options(steps: int, family: str = "sde") -> dict[str, Option]:
    """The options of every fixed-grid solver: number of grid points, grid kind, ρ."""
    return {
        "steps": Option(steps, positive_int(2), "grid points from T to t_end, both included"),
        "grid": Option(lambda sde: default_grid(sde, family), one_of(*GRIDS), "time grid"),
        "rho": Option(7.0, positive_float, "ρ of the EDM grid"),
    }


# ---------------------------------------------------------------------------------------------
# Declaration and context
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver: its name, its run function and its options."""

    name: str
    run: Callable[..., Tensor]
    options: Mapping[str, Option]
    summary: str
    stochastic: bool = False
    #: Extra cross-option checks, run after each option is checked: check(options, sde, t_end).
    check: Callable[[dict, SDE, float], None] | None = None

    def resolve(self, sde: SDE, given: Mapping[str, Any], t_end: float) -> dict[str, Any]:
        """Fill defaults and check every option; raise a ValueError before any compute."""
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for solver {self.name!r}; valid options: "
                f"{sorted(self.options) + ['t_end', 'denoise']}"
            )
        resolved = {k: (given[k] if k in given else opt.default_for(sde)) for k, opt in self.options.items()}
        for k, opt in self.options.items():
            opt.check(k, resolved[k])
        if self.check is not None:
            self.check(resolved, sde, t_end)
        return resolved


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

    def times(self, value: float | Tensor, x: Tensor) -> Tensor:
        """A per-row time vector for x."""
        if isinstance(value, Tensor):
            return value.to(x.device, x.dtype).expand(x.shape[0]) if value.dim() == 0 else value.to(x.device, x.dtype)
        return torch.full((x.shape[0],), float(value), dtype=x.dtype, device=x.device)

    def normal(self, x: Tensor, stream: int, counter: int | Tensor, rows: Tensor | None = None) -> Tensor:
        """Standard normal noise shaped like x, keyed per sample."""
        return self.noise.normal(x.shape[1:], stream, counter, rows, dtype=x.dtype, device=x.device)

    def report(self, info: StepInfo) -> bool:
        """Pass a step to the callback; False means the user asked to stop."""
        if self.callback is None:
            return True
        if self.callback(info) is False:
            self.stopped = True
            return False
        return True


def progress_bar(ctx: SolverContext, total: int, desc: str):
    """A tqdm bar when progress is on, else None."""
    if not ctx.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def run_grid(
    ctx: SolverContext,
    x: Tensor,
    grid: Tensor,
    step: Callable[[int, Tensor, Tensor, Tensor], Tensor],
    desc: str,
) -> Tensor:
    """Run ``step(k, x, t_cur, t_next) -> x`` over consecutive grid points; handles callbacks and
    progress. t_cur and t_next are per-row time vectors."""
    bar = progress_bar(ctx, len(grid) - 1, desc)
    try:
        for k in range(len(grid) - 1):
            t_cur = ctx.times(float(grid[k]), x)
            t_next = ctx.times(float(grid[k + 1]), x)
            x = step(k, x, t_cur, t_next)
            if bar is not None:
                bar.update(1)
            if not ctx.report(StepInfo(step=k, t=t_next, h=t_cur - t_next, x=x, nfe=ctx.score.nfe)):
                break
    finally:
        if bar is not None:
            bar.close()
    return x


def solver_grid(ctx: SolverContext, opts: Mapping[str, Any]) -> Tensor:
    """The grid named by a fixed-step solver's options."""
    return time_grid(ctx.sde, opts["grid"], opts["steps"], ctx.t_start, ctx.t_end, opts["rho"])

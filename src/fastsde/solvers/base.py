"""What every solver shares: its declaration (name, options, declarations, how it is built), the
context it runs in, and option validators.

A solver is a stepper (``solvers.stepper``) run by the driver (``solvers.driver``) under a
controller (``solvers.controllers``). The stepper draws randomness only from the noise source,
evaluates the score only through the counting wrapper, and the driver returns the state at
``ctx.t_end``; the front door applies the final denoise.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from ..grids import GRIDS, check_explicit_grid, check_grid_choice, default_grid, explicit_times, time_grid
from ..noise import NoiseSource
from ..score import CountingScore
from ..sde import SDE, per_row

__all__ = [
    "Option",
    "as_python_number",
    "SolverSpec",
    "SolverContext",
    "StepInfo",
    "positive_int",
    "positive_float",
    "nonnegative_float",
    "unit_interval",
    "one_of",
    "optional",
    "positive_or_inf",
    "boolean",
    "grid_options",
    "solver_grid",
    "fixed_grid",
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


def as_python_number(v: Any) -> Any:
    """numpy (or any numbers.Integral / numbers.Real) scalars as Python int / float, numpy's bool as
    bool; everything else unchanged, so that options accept ``np.int64(10)`` as they accept ``10``
    (a bool stays a bool, which the integer and number checks refuse)."""
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, bool) or type(v) in (int, float) or not isinstance(v, numbers.Real):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    return float(v)


#: the most grid points (steps) a fixed-grid solver takes: far beyond any use (EM's default is 1000),
#: while a typo such as 1e11 would allocate the grid and its per-step state before failing
MAX_STEPS = 10**6


def positive_int(minimum: int = 1, maximum: int | None = None) -> Callable[[str, Any], None]:
    def check(name: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
        if maximum is not None and v > maximum:
            raise ValueError(f"{name} must be an integer <= {maximum} (the limit fastsde sets), got {v!r}")

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


def optional(check: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
    """The check of an option whose None means "chosen for you"; any other value must pass ``check``."""

    def check_optional(name: str, v: Any) -> None:
        if v is not None:
            check(name, v)

    return check_optional


def positive_or_inf(name: str, v: Any) -> None:
    """A positive number; math.inf for no limit."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or not v > 0:
        raise ValueError(f"{name} must be a number > 0 (math.inf for no cap), got {v!r}")


def boolean(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be True or False, got {v!r}")


def grid_options(steps: int, family: str = "sde") -> dict[str, Option]:
    """The options of every fixed-grid solver: number of grid points, grid kind, ρ."""
    return {
        "steps": Option(steps, positive_int(2, MAX_STEPS), "grid points from T to t_end, both included"),
        "grid": Option(
            lambda sde: default_grid(sde, family),
            check_grid_choice,
            f"time grid: one of {', '.join(GRIDS)}, or explicit times (a tensor, or fastsde.fit_grid's result)",
        ),
        "rho": Option(7.0, positive_float, "ρ of the EDM grid"),
    }


# ---------------------------------------------------------------------------------------------
# Declaration and context
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver: its name, options and declarations, and how it is built.

    ``build(ctx, options)`` returns the keyword arguments of :func:`~fastsde.solvers.driver.integrate`
    (stepper, controller, and the driver's settings); ``stepper`` is the stepper class, whose
    declarations (order, error order, NFE per step, stochasticity, coordinate) the solver reports.
    ``adaptive``: the step size is controlled per sample (``nfe_per_step`` is then None);
    ``tolerance``: the option a tolerance sweep varies (None for fixed-step solvers).
    """

    name: str
    build: Callable[[SolverContext, dict[str, Any]], dict[str, Any]]
    stepper: type
    options: Mapping[str, Option]
    summary: str
    adaptive: bool = False
    tolerance: str | None = None
    #: Extra cross-option checks, run after each option is checked: check(options, sde, t_end).
    check: Callable[[dict, SDE, float], None] | None = None

    # -- declarations --------------------------------------------------------------------------

    def _defaults(self, options: Mapping[str, Any] | None) -> dict[str, Any]:
        out = {k: (opt.default if not callable(opt.default) else None) for k, opt in self.options.items()}
        out.update(options or {})
        return out

    @property
    def order(self) -> float:
        """Convergence order at the default options (weak order for stochastic methods)."""
        return self.order_for(None)

    def order_for(self, options: Mapping[str, Any] | None) -> float:
        return float(self.stepper.declared_order(self._defaults(options)))

    @property
    def error_order(self) -> float | None:
        """Order of the embedded error estimate (None: the method has none)."""
        return self.stepper.error_order

    @property
    def nfe_per_step(self) -> int | None:
        """Score evaluations per step at the default options; None when the step size is adaptive."""
        return None if self.adaptive else self.nfe_per_step_for(None)

    def nfe_per_step_for(self, options: Mapping[str, Any] | None) -> int:
        """Evaluations per attempted step for these options (fixed-grid and adaptive alike)."""
        return int(self.stepper.declared_nfe(self._defaults(options)))

    def fixed_nfe(
        self, options: Mapping[str, Any] | None = None, denoise: bool = True, sde: SDE | None = None
    ) -> int | None:
        """Total NFE per sample of a fixed-grid run with these options (None when adaptive). With ``sde``
        the run is from its T: where m(T) = 0 (a rectified flow) and the method has no exact first move
        of its own, the driver's shared first move costs 1 evaluation in place of the method's move."""
        if self.adaptive:
            return None
        opts = self._defaults(options)
        total = (opts["steps"] - 1) * self.nfe_per_step_for(opts) + int(self.stepper.first_nfe) + int(denoise)
        return total - self.first_move_saving(opts, sde)

    def first_move_saving(self, opts: Mapping[str, Any], sde: SDE | None) -> int:
        """Evaluations the shared first move from m(T) = 0 saves over the method's own first move
        (``declared_move_nfe`` − 1; 0 when the run is not from m = 0 or the method moves from there itself)."""
        from .stepper import starts_at_zero_mean

        if sde is None or self.stepper.singular_start or not starts_at_zero_mean(sde, float(sde.T)):
            return 0
        return int(self.stepper.declared_move_nfe(opts)) - 1

    def is_stochastic(self, options: Mapping[str, Any] | None = None) -> bool:
        """True when the samples depend on the seed beyond x_T for these options."""
        return bool(self.stepper.declared_stochastic(self._defaults(options)))

    @property
    def stochastic(self) -> bool:
        """Stochastic at the default options."""
        return self.is_stochastic(None)

    @property
    def coordinate(self) -> str:
        """The coordinate the stepper steps in: "t" or "logsnr"."""
        return self.stepper.coordinate

    # -- running -------------------------------------------------------------------------------

    def resolve(self, sde: SDE, given: Mapping[str, Any], t_end: float) -> dict[str, Any]:
        """Fill defaults and check every option; raise a ValueError before any compute."""
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for solver {self.name!r}; valid options: "
                f"{sorted(self.options) + ['t_end', 'denoise']}"
            )
        resolved = {
            k: (as_python_number(given[k]) if k in given else opt.default_for(sde)) for k, opt in self.options.items()
        }
        for k, opt in self.options.items():
            opt.check(k, resolved[k])
        times = explicit_times(resolved["grid"]) if "grid" in resolved and "steps" in resolved else None
        if times is not None:  # an explicit grid: its length now; its ends when the run's start is known
            if times.numel() != resolved["steps"]:
                check_explicit_grid(times, resolved["steps"], float(times[0]), float(times[-1]))
            if hasattr(resolved["grid"], "check_run"):  # a fitted grid: keyed to the run it was fitted for
                resolved["grid"].check_run(sde, self.name, resolved, t_end)
        if self.check is not None:
            self.check(resolved, sde, t_end)
        return resolved

    def run(self, ctx: SolverContext, x: Tensor, **options: Any) -> Tensor:
        """Build the stepper and controller for these (resolved) options and run the driver."""
        from .driver import integrate

        plan = self.build(ctx, dict(options))
        return integrate(ctx, x, desc=self.name, **plan)


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


def fixed_grid(stepper_cls: type) -> Callable[[SolverContext, dict[str, Any]], dict[str, Any]]:
    """The build function of a fixed-grid solver: its stepper on the grid its options name."""
    from .controllers import FixedGrid

    def build(ctx: SolverContext, opts: dict[str, Any]) -> dict[str, Any]:
        return dict(stepper=stepper_cls(ctx, opts), controller=FixedGrid(solver_grid(ctx, opts)))

    return build

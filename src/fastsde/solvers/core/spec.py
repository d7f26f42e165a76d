"""What every solver shares: its declaration (name, options, declarations, how it is built) and the
build function of the fixed-grid solvers. The context is ``solvers.core.context``, the options and
their checks ``solvers.core.options``.

A solver is a stepper (``solvers.core.stepper``) run by the driver (``solvers.core.driver``) under a
controller (``solvers.core.controllers``). The stepper draws randomness only from the noise source,
evaluates the score only through the counting wrapper, and the driver returns the state at
``ctx.t_end``; the front door applies the final denoise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ...artifacts import FittedArtifact, FittedGrid
from ...grids import check_explicit_grid, explicit_times, long_flow_grid
from ...sde import SDE
from .context import SolverContext, solver_grid
from .controllers import FixedGrid
from .driver import integrate
from .options import (
    Option,
    as_python_number,
)
from .stepper import starts_at_zero_mean

__all__ = ["SolverSpec", "fixed_grid"]


# ---------------------------------------------------------------------------------------------
# Declaration and context
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver: its name, options and declarations, and how it is built.

    ``build(ctx, options)`` returns the keyword arguments of :func:`~fastsde.solvers.core.driver.integrate`
    (stepper, controller, and the driver's settings); ``stepper`` is the stepper class, whose
    declarations (order, error order, NFE per step, stochasticity, coordinate) the solver reports.
    ``adaptive``: the step size is controlled per sample (``nfe_per_step`` is then None);
    ``tolerance``: the option a tolerance sweep varies (None for fixed-step solvers).
    ``artifact``: (option, class) of the fitted artifact (``fastsde.artifacts``) the solver takes, e.g.
    ``("table", IIATable)``; every fixed-grid solver also takes a fitted grid in ``grid``.
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
    #: The fitted artifact the solver takes: (its option, its class); None: none.
    artifact: tuple[str, type[FittedArtifact]] | None = None

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
        if "grid" in resolved and "grid" not in given:  # a long run on a flow: quadratic, not uniform
            resolved["grid"] = long_flow_grid(sde, resolved["grid"], resolved.get("steps"), t_end)
        for k, opt in self.options.items():
            opt.check(k, resolved[k])
        times = explicit_times(resolved["grid"]) if "grid" in resolved and "steps" in resolved else None
        if times is not None:  # an explicit grid: its length now; its ends when the run's start is known
            if times.numel() != resolved["steps"]:
                check_explicit_grid(times, resolved["steps"], float(times[0]), float(times[-1]))
        if self.check is not None:
            self.check(resolved, sde, t_end)
        for artifact in self.artifacts(resolved):  # each keyed to the run it was fitted for
            artifact.check_run(sde, self.name, resolved, t_end)
        return resolved

    # -- fitted artifacts ----------------------------------------------------------------------

    def artifact_options(self) -> dict[str, type[FittedArtifact]]:
        """The options that take a fitted artifact, with its class: a fitted grid in a fixed-grid
        solver's ``grid``, and the solver's declared ``artifact``."""
        out: dict[str, type[FittedArtifact]] = {}
        if "grid" in self.options and "steps" in self.options:
            out["grid"] = FittedGrid
        if self.artifact is not None:
            out[self.artifact[0]] = self.artifact[1]
        return out

    def artifacts(self, options: Mapping[str, Any]) -> list[FittedArtifact]:
        """The fitted artifacts among these (resolved) options: a fitted grid first, then the declared one."""
        return [options[k] for k, cls in self.artifact_options().items() if isinstance(options.get(k), cls)]

    def run(self, ctx: SolverContext, x: Tensor, **options: Any) -> Tensor:
        """Build the stepper and controller for these (resolved) options and run the driver."""
        plan = self.build(ctx, dict(options))
        return integrate(ctx, x, desc=self.name, **plan)


def fixed_grid(stepper_cls: type) -> Callable[[SolverContext, dict[str, Any]], dict[str, Any]]:
    """The build function of a fixed-grid solver: its stepper on the grid its options name."""

    def build(ctx: SolverContext, opts: dict[str, Any]) -> dict[str, Any]:
        return dict(stepper=stepper_cls(ctx, opts), controller=FixedGrid(solver_grid(ctx, opts)))

    return build

"""PF-ODE predictor + Langevin corrector (Chen, Chewi, Lee, Li, Lu, Salim, NeurIPS 2023).

A deterministic probability-flow predictor (``predictor``: "ddim" / "euler" (the same first-order
exponential-integrator move), "heun", "dpmpp_2m", "dpmpp_3m" on a fixed grid, or "ode", the adaptive
Dormand–Prince solver) interleaved with Langevin dynamics at the noise level the predictor has
reached, run by the driver's corrector (``solvers.core.correctors``, the same objects as ``pc`` and
``adaptive`` use):

- ``corrector="underdamped"`` (DPUM, default): per call a fresh velocity, friction γ = friction/σ_t,
  duration duration·σ_t in ``corrector_steps`` exact frozen-score Ornstein–Uhlenbeck steps; the
  defaults (friction 2: critical damping for the scale L_t ≈ 1/σ_t²; duration 1 ≈ 1/√L_t) are
  fastsde's heuristics, not the paper's constants.
- ``corrector="overdamped"`` (DPOM): x ← x + ε·s + √(2ε)·z with ε = κ·σ_t² (``step_rule="sigma"``)
  or Song's snr rule with per-sample norms (``step_rule="snr"``).

Placement: after every predictor move but the last (t_end is corrected only with
``correct_end=True``: the Tweedie denoise follows), or only at
every c-th point (``every``), or only where σ_t ≤ ``sigma_max`` (σ_t is the marginal std). A
corrected sample restarts the predictor's history: multistep predictors (dpmpp_2m, dpmpp_3m) take
a first-order move after each corrected point and ``ode`` re-evaluates its FSAL value (1 NFE).
NFE = predictor NFE + corrector_steps × corrected points (+1 for the Tweedie denoise): with the
defaults, N grid points cost (N − 1) + (N − 2)·K + 1. ``corrector_steps=0`` is the plain predictor.

Order: with a corrector the law converges, as the step count grows, to the corrector's own biased
stationary law (set by κ, or by duration/K), not to the target, so no weak order is declared
(order 0); with corrector_steps=0 it is the predictor's order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..grids import time_grid
from ..sde import SDE
from .core.context import SolverContext
from .core.correctors import Corrector, Langevin, Underdamped
from .core.options import Option, boolean, grid_options, one_of, positive_float, positive_int, positive_or_inf
from .core.spec import SolverSpec
from .core.stepper import Stepper
from .ddim import DDIM
from .dpmpp_2m import DPMPP_2M
from .dpmpp_3m import DPMPP_3M
from .euler import EULER
from .heun import HEUN
from .ode import ODE

__all__ = ["ODE_CORRECTOR", "ODECorrector", "PREDICTOR_SOLVERS", "make_corrector"]

#: The predictors: deterministic solvers on the probability-flow ODE.
PREDICTOR_SOLVERS: dict[str, SolverSpec] = {
    "ddim": DDIM,
    "euler": EULER,
    "heun": HEUN,
    "dpmpp_2m": DPMPP_2M,
    "dpmpp_3m": DPMPP_3M,
    "ode": ODE,
}
#: Options handed on to the predictor when it has them.
SHARED = ("steps", "grid", "rho", "rtol", "atol")


def _predictor_options(spec: SolverSpec, options: Mapping[str, Any], sde: SDE | None) -> dict[str, Any]:
    """The predictor's options: its defaults, with the grid and tolerances of ode_corrector's."""
    out = {k: (o.default_for(sde) if sde is not None else o.default) for k, o in spec.options.items()}
    out.update({k: options[k] for k in SHARED if k in out and k in options and options[k] is not None})
    return out


class ODECorrector(Stepper):
    """Declarations only: the predictor's stepper runs, the corrector is the driver's."""

    stochastic = True

    @classmethod
    def _predictor(cls, options: Mapping[str, Any]) -> SolverSpec:
        return PREDICTOR_SOLVERS[options.get("predictor") or "ddim"]

    @classmethod
    def declared_order(cls, options: Mapping[str, Any]) -> float:
        spec = cls._predictor(options)
        if int(options.get("corrector_steps") or 0) > 0:
            return 0.0
        return spec.order_for(_predictor_options(spec, options, None))

    @classmethod
    def declared_nfe(cls, options: Mapping[str, Any]) -> int:
        spec = cls._predictor(options)
        return spec.nfe_per_step_for(_predictor_options(spec, options, None)) + int(options.get("corrector_steps") or 0)

    @classmethod
    def declared_stochastic(cls, options: Mapping[str, Any]) -> bool:
        return int(options.get("corrector_steps") or 0) > 0

    @classmethod
    def declared_move_nfe(cls, options: Mapping[str, Any]) -> int:
        """The predictor's move alone (the corrector's steps after it are the driver's)."""
        spec = cls._predictor(options)
        return spec.nfe_per_step_for(_predictor_options(spec, options, None))


def make_corrector(opts: Mapping[str, Any]) -> Corrector | None:
    """The corrector the options name (None for corrector_steps=0)."""
    k = opts["corrector_steps"]
    if k == 0:
        return None
    place = dict(
        at_start=False, at_end=opts["correct_end"], key="point", every=opts["every"], sigma_max=opts["sigma_max"]
    )
    if opts["corrector"] == "overdamped":
        return Langevin(k, opts["snr"], per_sample_norm=True, rule=opts["step_rule"], kappa=opts["kappa"], **place)
    return Underdamped(k, friction=opts["friction"], duration=opts["duration"], **place)


def _build(ctx: SolverContext, opts: dict[str, Any]) -> dict[str, Any]:
    spec = PREDICTOR_SOLVERS[opts["predictor"]]
    plan = spec.build(ctx, _predictor_options(spec, opts, ctx.sde))
    plan["corrector"] = make_corrector(opts)
    return plan


class _ODECorrectorSpec(SolverSpec):
    """``ode_corrector``: fixed-grid NFE from the placement (which points are corrected)."""

    def fixed_nfe(self, options: Mapping[str, Any] | None = None, denoise: bool = True, sde: SDE | None = None):
        opts = self._defaults(options)
        if sde is not None:  # defaults that depend on the process (the grid)
            opts.update({k: o.default_for(sde) for k, o in self.options.items() if opts.get(k) is None})
        pred = PREDICTOR_SOLVERS[opts["predictor"]]
        if pred.adaptive:
            return None
        popts = _predictor_options(pred, opts, sde)
        n, k = int(opts["steps"]), int(opts["corrector_steps"])
        points = torch.arange(1, n)  # the points reached by the n − 1 moves
        keep = (points % int(opts["every"])) == 0
        if not opts["correct_end"]:
            keep &= points < n - 1
        if math.isfinite(float(opts["sigma_max"])):
            if sde is None:
                return None  # the corrected points depend on the process's grid
            grid = time_grid(sde, popts["grid"], n, sde.T, sde.default_t_end, popts["rho"])
            keep &= sde.marginal_std(grid[1:]) <= float(opts["sigma_max"])
        total = (n - 1) * pred.nfe_per_step_for(popts) + int(pred.stepper.first_nfe) + k * int(keep.sum())
        return total + int(denoise) - pred.first_move_saving(popts, sde)


def _check(opts: dict, sde: SDE, t_end: float) -> None:
    if opts["predictor"] == "ode" and opts["every"] != 1:
        raise ValueError(f"every needs a fixed-grid predictor, got predictor='ode' with every={opts['every']!r}")


ODE_CORRECTOR = _ODECorrectorSpec(
    name="ode_corrector",
    build=_build,
    stepper=ODECorrector,
    options={
        **grid_options(20, "exp"),
        "predictor": Option("ddim", one_of(*PREDICTOR_SOLVERS), "probability-flow predictor ('ode': adaptive RK45)"),
        "corrector": Option("underdamped", one_of("underdamped", "overdamped"), "DPUM or DPOM Langevin corrector"),
        "corrector_steps": Option(1, positive_int(0), "Langevin steps K per corrected point (0: predictor only)"),
        "friction": Option(2.0, positive_float, "underdamped: friction γ·σ_t (2: critical damping)"),
        "duration": Option(1.0, positive_float, "underdamped: corrector time per call in units of σ_t"),
        "step_rule": Option("sigma", one_of("sigma", "snr"), "overdamped: ε = κ·σ_t² or Song's snr rule"),
        "kappa": Option(0.05, positive_float, "overdamped, step_rule='sigma': ε = κ·σ_t²"),
        "snr": Option(0.16, positive_float, "overdamped, step_rule='snr': Song's signal-to-noise ratio"),
        "every": Option(1, positive_int(1), "correct every c-th grid point"),
        "sigma_max": Option(math.inf, positive_or_inf, "correct only where the marginal std σ_t <= this"),
        "correct_end": Option(False, boolean, "also correct at t_end (after the last callback, before the denoise)"),
        "rtol": Option(1e-3, positive_float, "predictor='ode': relative tolerance"),
        "atol": Option(1e-3, positive_float, "predictor='ode': absolute tolerance"),
    },
    summary="PF-ODE predictor + underdamped/overdamped Langevin corrector (Chen et al. 2023)",
    check=_check,
)

"""Gotta Go Fast (Jolicoeur-Martineau et al. 2021): adaptive-step SDE solver with per-sample steps.

Algorithm 1 of the paper (arXiv:2105.14080). One iteration per active sample (state x, time t,
step h), with one z ~ N(0, I) shared by both stages:

- stage 1 (1 NFE): K₁ = −h·b(x, t) + g(t)·√h·z, EM proposal x′ = x + K₁;
- stage 2 (1 NFE): K₂ = −h·b(x′, t − h) + g(t − h)·√h·z, stochastic-Heun proposal x″ = x + ½(K₁ + K₂);
- error E = ‖(x″ − x′)/δ‖ with δ = max(ε_abs, ε_rel·max(|x′|, |x′_prev|)) (scaled L2 by default);
- accept iff E ≤ 1 (x ← x″, x′_prev ← x′); then h ← min(t − t_end, θ·h·E^(−r)) for every sample.

A non-finite E is a rejection with h ← h/10 (not in the paper). The last step lands exactly on
t_end. b = f − g²·s is the forward-time drift of the reverse SDE.

The pair is the stepper :class:`GottaGoFastPair`; the loop, the controller (Gotta Go Fast's law,
``solvers.controllers.Adaptive``), the Brownian paths (``fastsde.brownian``) and the corrector
(``solvers.correctors.Langevin``) are the driver's, shared with ``adaptive_sde_dpm`` and
``adaptive_sde_dpm_2m``; here the controller's coordinate is c = −t.

fastsde additions: finished samples leave the batch (``compact``); a per-sample NFE budget
(``max_nfe``) that raises :class:`AdaptiveBudgetError` naming how many samples did not finish, or
returns partial results with a per-sample status (``on_budget="partial"``); per-sample accepted /
rejected counts in ``ctx.stats``; an optional Langevin corrector after accepted steps;
``brownian="tree"`` or ``"memory"`` (a retried step sees the same Brownian path: a per-sample
:class:`~fastsde.brownian.BrownianTree`, a function of the seed only, or
:class:`~fastsde.brownian.BrownianMemory`, revealed lazily at one
draw per query; the default "fresh" is GGF's rule, which favours small noise draws among accepted steps and visibly biases the
samples in low dimension, see docs/benchmarks_adaptive.md); ``reuse_rejected`` (the score at the
unchanged (x, t) after a rejection is not evaluated again; off by default so that GGF costs exactly
2 NFE per attempt as specified); ``pi_beta`` (PI step control, Gustafsson's: after an accepted step
the factor θ·E^(−r) is multiplied by E_prev^β, E_prev the previous accepted step's error, which damps
the growth that follows a large error; 0, GGF's controller, by default).

Statistics in ctx.stats (per sample unless noted): accepted, rejected, nonfinite_rejections,
reused_evaluations, status ("done" | "budget" | "stopped"), t_final, nfe_solver_per_sample (denoise
excluded), iterations (batch loop count). The callback's StepInfo.h is the attempted step in the
controller's coordinate (t for GGF, λ for adaptive_sde_dpm), 0 for samples not attempting (finished
ones included, whose StepInfo.accepted is False: count rejections where h > 0 and not accepted).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from ..brownian import PATHS, BrownianMemory, BrownianTree
from ..sde import EDM, broadcast_to_rows
from .base import (
    Option,
    SolverContext,
    SolverSpec,
    boolean,
    nonnegative_float,
    one_of,
    optional,
    positive_float,
    positive_int,
    unit_interval,
)
from .controllers import Adaptive, Coordinate
from .correctors import Langevin
from .driver import BudgetError
from .stepper import Step, Stepper, StepResult, embedded

__all__ = [
    "ADAPTIVE",
    "AdaptiveBudgetError",
    "BrownianMemory",
    "BrownianTree",
    "GottaGoFastPair",
    "adaptive_options",
    "adaptive_plan",
]

#: Raised when some samples did not reach t_end within max_nfe (the driver's BudgetError).
AdaptiveBudgetError = BudgetError


def _growth_check(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 1:
        raise ValueError(f"{name} must be a number > 1 (math.inf for no limit), got {v!r}")


def _use_prev_check(name: str, v: Any) -> None:
    if v is not True and v is not False and v != "x":
        raise ValueError(f"{name} must be True, False or 'x', got {v!r}")


def adaptive_options(
    h_init: float,
    eps_rel: float,
    exponent: float | None,
    brownian: str,
    use_prev: bool | str = True,
    max_growth: float = math.inf,
    reuse: bool = False,
) -> dict[str, Option]:
    """The controller options shared by the adaptive SDE solvers."""
    return {
        "eps_rel": Option(eps_rel, positive_float, "relative tolerance ε_rel"),
        "eps_abs": Option(
            lambda sde: sde.data_range / 256.0, positive_float, "absolute tolerance (default data range / 256)"
        ),
        "h_init": Option(h_init, positive_float, "initial step"),
        "safety": Option(0.9, unit_interval, "safety factor θ"),
        "exponent": Option(
            exponent,
            optional(positive_float),
            "controller exponent r in h ← θ·h·E^(−r) (None: 1 / the stepper's declared error order)",
        ),
        "norm": Option("scaled_l2", one_of("scaled_l2", "l2", "linf"), "error norm per sample"),
        "extrapolate": Option(True, boolean, "keep the higher-order proposal (False: keep the lower)"),
        "use_prev": Option(
            use_prev,
            _use_prev_check,
            "tolerance uses the previous accepted proposal (True), "
            "the current state ('x', the JAX code's behaviour) or neither (False)",
        ),
        "compact": Option(True, boolean, "drop finished samples from the score calls"),
        "max_nfe": Option(10_000, positive_int(2), "per-sample budget of solver NFE (denoise excluded)"),
        "on_budget": Option("raise", one_of("raise", "partial"), "what happens when max_nfe is reached"),
        "corrector_steps": Option(0, positive_int(0), "Langevin corrector steps after each accepted step"),
        "snr": Option(0.16, positive_float, "signal-to-noise ratio of the Langevin corrector"),
        "max_growth": Option(max_growth, _growth_check, "largest factor by which h may grow per attempt (GGF: none)"),
        "pi_beta": Option(
            0.0,
            nonnegative_float,
            "PI control: after an accepted step h ← θ·h·E^(−r)·E_prev^β with E_prev the previous accepted "
            "step's error (0: GGF's controller; fewer rejections with β ≈ 0.3–0.4)",
        ),
        "reuse_rejected": Option(
            reuse,
            boolean,
            "after a rejection, reuse the score at the unchanged (x, t) "
            "instead of evaluating it again (saves 1 NFE per rejection)",
        ),
        "brownian": Option(
            brownian,
            one_of(*PATHS),
            "noise of a retried step: fresh draw (GGF), or the same Brownian path read off a per-sample "
            "tree (a function of the seed only) or revealed lazily with memory (one draw per query)",
        ),
    }


def adaptive_plan(
    ctx: SolverContext,
    stepper: Stepper,
    opts: dict[str, Any],
    coordinate: Coordinate,
    h_init: float,
    h_max: float = math.inf,
) -> dict[str, Any]:
    """The driver's arguments for an adaptive SDE solver: GGF's controller law on ``coordinate``,
    the Brownian path, the corrector and the budget named by the options."""
    exponent = opts["exponent"]
    if exponent is None:
        exponent = 1.0 / float(stepper.error_order)
    controller = Adaptive(
        rtol=opts["eps_rel"],
        atol=opts["eps_abs"],
        exponent=exponent,
        mixed="max",
        use_prev=opts["use_prev"],
        norm=opts["norm"],
        safety=opts["safety"],
        max_growth=opts["max_growth"],
        nonfinite_factor=0.1,
        pi_beta=opts["pi_beta"],
        h_init=h_init,
        h_max=h_max,
        stop_tol=1e-6,
    )
    corrector = None
    if opts.get("corrector_steps", 0):
        corrector = Langevin(opts["corrector_steps"], opts["snr"], per_sample_norm=True, at_end=True, key="attempt")
    return dict(
        stepper=stepper,
        controller=controller,
        coordinate=coordinate,
        brownian=opts["brownian"],
        corrector=corrector,
        compact=opts["compact"],
        max_nfe=opts["max_nfe"],
        on_budget=opts["on_budget"],
        reuse_rejected=opts.get("reuse_rejected", False),
        budget_hint="raise max_nfe, loosen eps_rel / eps_abs",
    )


class GottaGoFastPair(Stepper):
    """Euler–Maruyama / stochastic improved Euler with one shared z (2 NFE per attempt).

    The two members differ by ½(K₂ − K₁) = O(h·√h): the drift difference moves with the noise, so
    the error estimate's local error is of order 1.5 (the exponent 1/1.5 would follow); the paper
    tunes r = 0.9, which is the ``exponent`` option's default here.
    """

    order = 1.0
    error_order = 1.5
    nfe_per_step = 2
    stochastic = True

    def step(self, x: Tensor, s: Step) -> StepResult:
        sde = self.sde
        h = broadcast_to_rows(s.t - s.t_next, x)
        dw = s.brownian([s.c_next])[0].to(x.dtype)  # √h·z: one draw shared by both stages
        b1 = sde.reverse_drift(x, s.t, s.score0())
        noise1 = broadcast_to_rows(sde.diffusion(s.t), x) * dw
        extrapolate = self.options["extrapolate"]
        if self.options["improved_euler"]:
            k1 = -h * b1 + noise1
            x1 = x + k1
            b2 = sde.reverse_drift(x1, s.t_next, s.score(x1, s.t_next))
            k2 = -h * b2 + broadcast_to_rows(sde.diffusion(s.t_next), x) * dw
            return embedded(x1, x + 0.5 * (k1 + k2), extrapolate)
        # "Lamba" variant: Heun on the drift only, the noise g(t)·√h·z added once afterwards
        x_det = x - h * b1
        b2 = sde.reverse_drift(x_det, s.t_next, s.score(x_det, s.t_next))
        return embedded(x_det + noise1, x - 0.5 * h * (b1 + b2) + noise1, extrapolate)


def _build(ctx: SolverContext, opts: dict[str, Any]) -> dict[str, Any]:
    """Gotta Go Fast in c = −t. For σ-time processes (EDM) h_init is a fraction of T − t_end."""
    h_init = opts["h_init"]
    if isinstance(ctx.sde, EDM):
        h_init = h_init * (ctx.t_start - ctx.t_end)
    coord = Coordinate.time(ctx.t_start, ctx.t_end)
    return adaptive_plan(ctx, GottaGoFastPair(ctx, opts), opts, coord, h_init)


ADAPTIVE = SolverSpec(
    name="adaptive",
    build=_build,
    stepper=GottaGoFastPair,
    options={
        **adaptive_options(h_init=0.01, eps_rel=0.01, exponent=0.9, brownian="fresh"),
        "improved_euler": Option(True, boolean, "stochastic improved Euler (False: drift-only 'Lamba' variant)"),
    },
    summary="Gotta Go Fast: per-sample adaptive EM / stochastic improved Euler on the reverse SDE",
    adaptive=True,
    tolerance="eps_rel",
)

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
``solvers.core.controllers.Adaptive``), the Brownian paths (``fastsde.brownian``) and the corrector
(``solvers.core.correctors.Langevin``) are the driver's, shared with ``adaptive_sde_dpm`` and
``adaptive_sde_dpm_2m``; here the controller's coordinate is c = −t.

fastsde additions: finished samples leave the batch (``compact``); a per-sample NFE budget
(``max_nfe``) that raises :class:`~fastsde.solvers.core.driver.BudgetError` naming how many samples did not finish, or
returns partial results with a per-sample status (``on_budget="partial"``); per-sample accepted /
rejected counts in ``ctx.stats``; an optional Langevin corrector after accepted steps;
``brownian="tree"`` or ``"memory"`` (a retried step sees the same Brownian path: a per-sample
:class:`~fastsde.brownian.BrownianTree`, a function of the seed only, or
:class:`~fastsde.brownian.BrownianMemory`, revealed lazily at one
draw per query; the default "fresh" is GGF's rule, which favours small noise draws among accepted steps and visibly biases the
samples in low dimension, see docs/benchmarks/adaptive.md); ``reuse_rejected`` (the score at the
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

from typing import Any

from torch import Tensor

from ..brownian import BrownianMemory, BrownianTree
from ..sde import EDM, broadcast_to_rows
from .core.common import adaptive_options, adaptive_plan
from .core.context import SolverContext
from .core.controllers import Coordinate
from .core.options import Option, boolean
from .core.spec import SolverSpec
from .core.stepper import Step, Stepper, StepResult, embedded

__all__ = [
    "ADAPTIVE",
    "BrownianMemory",
    "BrownianTree",
    "GottaGoFastPair",
    "adaptive_options",
    "adaptive_plan",
]

#: Raised when some samples did not reach t_end within max_nfe (the driver's BudgetError).


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

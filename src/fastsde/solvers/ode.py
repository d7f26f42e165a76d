"""Adaptive RK45 on the probability-flow ODE (Song et al. 2021, §4.3; spec score_sde.md §6.8).

dx/dt = f(x, t) − ½ g(t)² s(x, t), integrated from T down to t_end by Dormand–Prince 5(4).

- method "rk45": fastsde's torch integrator with one time and step size per sample; finished
  samples leave the batch, so each sample pays only for its own steps
  (NFE = 2 + 6 × attempted steps, + 1 for the final denoise). Step control: scipy's rules per
  sample plus ``fastsde.integrate``'s start-up rule for repeated rejections of the first step,
  which matters little when sampling (the solve starts at T, where the field is smooth).
- method "scipy": scipy's ``solve_ivp`` RK45 on the whole batch flattened into one float64 vector,
  the reference code's procedure (the batch shares its steps; NFE = nfev, + 1 for the denoise).

Accepted/rejected step counts per sample go into ``ctx.stats``. A sample that spends ``max_steps``
attempts without reaching t_end is an IntegrationError naming how many did not finish, unless
``partial=True`` (then they are returned where they stopped and ``ctx.stats["status"]`` says so).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..integrate import Status, StepReport, dopri5, scipy_rk45
from .base import (
    Option,
    SolverContext,
    SolverSpec,
    StepInfo,
    boolean,
    one_of,
    positive_float,
    positive_int,
    progress_bar,
)

__all__ = ["ODE", "ode"]


def _optional_positive(name: str, v: Any) -> None:
    if v is not None:
        positive_float(name, v)


def ode(
    ctx: SolverContext,
    x: Tensor,
    *,
    rtol: float,
    atol: float,
    method: str,
    max_steps: int,
    h_init: float | None,
    partial: bool,
) -> Tensor:
    sde = ctx.sde
    dtype = x.dtype
    n = x.shape[0]

    if method == "scipy":

        def field(y: Tensor, t: Tensor, rows: Tensor | None) -> Tensor:
            # A non-finite drift makes scipy's error norm NaN: it rejects the step and shrinks it.
            tt = t.to(dtype)
            return sde.ode_drift(y, tt, ctx.score(y, tt, rows, check_finite=False))

        y, nfev, steps = scipy_rk45(field, x, ctx.t_start, ctx.t_end, rtol=rtol, atol=atol)
        ctx.stats.update(method="scipy", nfev=nfev, accepted=steps)
        ctx.report(StepInfo(step=steps, t=ctx.times(ctx.t_end, y), h=torch.zeros(n), x=y, nfe=ctx.score.nfe))
        return y

    def field(y: Tensor, t: Tensor, rows: Tensor | None) -> Tensor:
        # Non-finite scores are handled by the integrator (the step is rejected and shrunk).
        tt = t.to(dtype)
        return sde.ode_drift(y, tt, ctx.score(y, tt, rows, check_finite=False))

    span = abs(ctx.t_start - ctx.t_end)
    bar = progress_bar(ctx, 1000, "ode")
    shown = 0

    def on_step(rep: StepReport) -> bool:
        nonlocal shown
        h_full = torch.zeros(n, dtype=torch.float64, device=x.device)
        h_full[rep.rows] = rep.h
        acc = torch.zeros(n, dtype=torch.bool, device=x.device)
        acc[rep.rows] = rep.accepted
        if bar is not None:
            # progress of the slowest sample still running
            frac = float((ctx.t_start - rep.t).abs().min()) / span if span > 0 else 1.0
            k = int(1000 * min(frac, 1.0))
            if k > shown:
                bar.update(k - shown)
                shown = k
        info = StepInfo(step=rep.step, t=rep.t.to(dtype), h=h_full, x=rep.y, nfe=ctx.score.nfe, accepted=acc)
        return ctx.report(info)

    try:
        sol = dopri5(
            field, x, ctx.t_start, ctx.t_end, rtol=rtol, atol=atol, max_steps=max_steps, h_init=h_init, on_step=on_step
        )
    finally:
        if bar is not None:
            bar.close()
    ctx.stats.update(
        method="rk45",
        accepted=sol.accepted.cpu(),
        rejected=sol.rejected.cpu(),
        steps_per_sample=(sol.accepted + sol.rejected).cpu(),
        status=sol.status.cpu(),
        h_initial=sol.h_initial.cpu(),
        t_reached=sol.t.cpu(),
    )
    stopped = sol.status == Status.STOPPED
    if bool(stopped.any()):
        ctx.stopped = True
    elif not partial:
        sol.raise_if_unfinished()
    return sol.y


ODE = SolverSpec(
    name="ode",
    run=ode,
    options={
        "rtol": Option(1e-5, positive_float, "relative tolerance"),
        "atol": Option(1e-5, positive_float, "absolute tolerance"),
        "method": Option("rk45", one_of("rk45", "scipy"), "rk45: per-sample torch; scipy: solve_ivp on the batch"),
        "max_steps": Option(10_000, positive_int(1), "step attempts allowed per sample (rk45)"),
        "h_init": Option(None, _optional_positive, "first step size (default: scipy's selection, 1 NFE)"),
        "partial": Option(False, boolean, "return unfinished samples instead of raising"),
    },
    summary="adaptive Dormand–Prince RK45 on the probability-flow ODE, per-sample steps",
    stochastic=False,
)

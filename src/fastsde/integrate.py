"""Adaptive Dormand–Prince RK45 with one time and one step size per sample.

Solves dy/dt = F(y, t, rows) for a batch of independent initial-value problems, each row with its
own time t and step size h, so an easy sample takes few steps and never waits for a hard one:
finished (or failed) rows are dropped from the evaluation and ``rows`` tells F (and through it
CountingScore) which samples the evaluated rows belong to.

The step control follows scipy's ``solve_ivp(method="RK45")`` per row: the RMS error norm
err / (atol + rtol·max(|y|, |y_new|)), accept if it is below 1, safety 0.9, step factor limits
0.2..10, exponent −1/5, no growth on the step that follows a rejection, FSAL, and scipy's
initial-step selection (one extra evaluation). So per sample NFE = 2 + 6 × (accepted + rejected
steps), counted as scipy's ``nfev`` counts.

One addition (``measured_exponent``, on by default) concerns the start only. The first step is a
guess (Hairer's heuristic), and the shrink 0.9·err^(−1/5) after a rejection assumes the error scales
as h⁵. Near a singularity, such as a likelihood solve starting at t_end → 0 of a diffusion, the
error scales like a low power of h (h^1.65 for the shipped digits model) and scipy rejects the guess
three or four times in a row. So when a row that has not yet accepted a step is rejected a second
time and its error fell more slowly than h⁵, the exponent measured from the two attempts, p =
log(err₁/err₂)/log(h₁/h₂) clamped to [1, 5], gives the shrink 0.9·err^(−1/p) instead, if that is
smaller. The acceptance test is unchanged, so no step is accepted that scipy's rules would reject;
after the first accepted step the control is scipy's exactly (repeated rejections there are mostly
noise in the error estimate, not a wrong exponent). ``measured_exponent=False`` gives scipy's rules
throughout.

A proposal with a non-finite value (the score returned NaN or Inf, say) is rejected and the step
shrunk by the minimum factor. A step budget (``max_steps`` attempts per sample) or a step size
below the floating-point spacing ends a row with a status rather than an exception, so one bad
sample never discards the batch; callers decide whether to raise (``ODESolution.raise_if_unfinished``).

``scipy_rk45`` runs scipy's solver on the flattened batch in float64 (the batch shares its steps,
as in the Score-SDE reference code) for cross-checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor

from .solvers.controllers import _measured_shrink as measured_shrink
from .solvers.driver import IntegrationError

__all__ = [
    "Status",
    "ODESolution",
    "StepReport",
    "IntegrationError",
    "dopri5",
    "scipy_rk45",
]

#: F(y, t, rows) -> dy/dt for the rows of y; t holds one time per row (float64), rows the sample
#: indices.
Field = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]

SAFETY = 0.9
MIN_FACTOR = 0.2


class Status(IntEnum):
    """Per-sample outcome of a :func:`dopri5` solve."""

    SUCCESS = 0
    MAX_STEPS = 1  # step budget spent before reaching t1
    STEP_TOO_SMALL = 2  # step size fell below the floating-point spacing of t
    NONFINITE_START = 3  # F was not finite at the initial point
    STOPPED = 4  # the step callback asked to stop
    NONFINITE = 5  # F was NaN/Inf in ten attempts in a row, however small the step


_FROM_DRIVER = {
    "done": Status.SUCCESS,
    "budget": Status.MAX_STEPS,
    "step_too_small": Status.STEP_TOO_SMALL,
    "nonfinite_start": Status.NONFINITE_START,
    "nonfinite": Status.NONFINITE,
    "stopped": Status.STOPPED,
    "running": Status.STOPPED,
}


@dataclass
class ODESolution:
    """The state of every sample when the solve ended.

    ``y`` and ``t`` hold the last accepted state and time (t1 for finished rows); the counters are
    per sample. ``nfev`` counts evaluations of F each sample received.
    """

    y: Tensor
    t: Tensor
    status: Tensor
    accepted: Tensor
    rejected: Tensor
    nfev: Tensor
    h: Tensor
    h_initial: Tensor

    @property
    def finished(self) -> Tensor:
        return self.status == Status.SUCCESS

    def failure_message(self) -> str:
        """A one-line summary of the samples that did not finish ('' if all did)."""
        n = self.status.shape[0]
        parts = []
        for st in (Status.MAX_STEPS, Status.STEP_TOO_SMALL, Status.NONFINITE_START, Status.NONFINITE, Status.STOPPED):
            k = int((self.status == st).sum())
            if k:
                label = (
                    "NaN/Inf however small the step" if st == Status.NONFINITE else st.name.lower().replace("_", " ")
                )
                parts.append(f"{k} {label}")
        if not parts:
            return ""
        bad = int((~self.finished).sum())
        worst = self.t[~self.finished]
        return (
            f"{bad} of {n} samples did not reach the end time ({', '.join(parts)}); "
            f"they stopped at t in [{float(worst.min()):.6g}, {float(worst.max()):.6g}]. "
            "Raise max_steps, loosen rtol/atol, or ask for partial results"
        )

    def raise_if_unfinished(self) -> None:
        msg = self.failure_message()
        if msg:
            raise IntegrationError(msg)


@dataclass
class StepReport:
    """One batched step attempt: which rows tried a step, with what h, and which were accepted.

    ``t`` and ``y`` are the full-batch current times and states (after the step).
    """

    step: int
    rows: Tensor
    h: Tensor
    accepted: Tensor
    t: Tensor
    y: Tensor
    nfev: Tensor


def _measured_shrink(shrink: Tensor, err: Tensor, h: Tensor, prev_err: Tensor, prev_h: Tensor, again: Tensor) -> Tensor:
    """The start-up shrink of the measured-exponent rule (see the module docstring)."""
    return measured_shrink(shrink, err, h, prev_err, prev_h, again, SAFETY, MIN_FACTOR)


def dopri5(
    fun: Field,
    y0: Tensor,
    t0: float | Tensor,
    t1: float,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 10_000,
    h_init: float | None = None,
    on_step: Callable[[StepReport], bool | None] | None = None,
    measured_exponent: bool = True,
) -> ODESolution:
    """Integrate dy/dt = fun(y, t, rows) from t0 to t1 (forwards or backwards), each row on its own.

    Args:
        fun: the vector field; called on the unfinished rows only, with their float64 times and
            sample indices.
        y0: (n, ...) initial states; the solve runs in their dtype.
        t0, t1: start time (one number, or one per row) and end time.
        rtol, atol: tolerances of the scipy-style RMS error norm.
        max_steps: step attempts (accepted + rejected) allowed per sample.
        h_init: first step size (positive); default scipy's per-sample selection (1 extra NFE).
        on_step: called after each batched step attempt; returning False stops the solve.
        measured_exponent: after two rejections in a row before a row's first accepted step, shrink
            with the error exponent measured from them when it is below 5 (see the module
            docstring); False: scipy's rules exactly.
    """
    from .noise import NoiseSource
    from .score import CountingScore
    from .solvers.base import SolverContext, StepInfo
    from .solvers.controllers import Coordinate
    from .solvers.driver import integrate
    from .solvers.ode import DOPRI_NFE_START, DormandPrince, scipy_law

    n = y0.shape[0]
    t0 = t0 if isinstance(t0, Tensor) and t0.dim() > 0 else float(t0)
    t1 = float(t1)
    counter = CountingScore(fun, n, pass_rows=True)

    def field(y: Tensor, t: Tensor, rows: Tensor) -> Tensor:
        return counter(y, t, rows, check_finite=False)

    def report(info: StepInfo) -> bool | None:
        assert on_step is not None
        rows = (info.h > 0).nonzero().squeeze(1)
        rep = StepReport(
            step=info.step + 1,
            rows=rows,
            h=info.h[rows].to(torch.float64),
            accepted=info.accepted[rows],
            t=info.t.to(torch.float64),
            y=info.x,
            nfev=counter.nfe_per_sample.to(torch.int64),
        )
        return on_step(rep)

    ctx = SolverContext(
        sde=None,
        score=counter,
        noise=NoiseSource([0] * n),
        t_start=t0,
        t_end=t1,
        callback=report if on_step is not None else None,
    )
    if not isinstance(t0, Tensor) and t0 == t1:
        zeros = torch.zeros(n, dtype=torch.int64, device=y0.device)
        t = torch.full((n,), t1, dtype=torch.float64, device=y0.device)
        return ODESolution(y0.clone(), t, zeros.clone(), zeros, zeros, zeros, t * 0, t * 0)
    direction = -1.0 if bool((torch.as_tensor(t0) > t1).all()) else 1.0
    stepper = DormandPrince(ctx, {}, field, direction)
    y = integrate(
        ctx,
        y0,
        stepper,
        scipy_law(rtol, atol, h_init, measured_exponent),
        coordinate=Coordinate.time(t0, t1),
        compact=True,
        max_nfe=DOPRI_NFE_START + DormandPrince.nfe_per_step * max_steps,
        on_budget="partial",
    )
    st = ctx.stats
    status = torch.tensor([int(_FROM_DRIVER[s]) for s in st["status"]], dtype=torch.int64, device=y0.device)
    h_initial = st.get("h_initial", torch.full((n,), float(h_init or 0.0), dtype=torch.float64))
    return ODESolution(
        y=y,
        t=st["t_final"].to(y0.device),
        status=status,
        accepted=st["accepted"].to(y0.device),
        rejected=st["rejected"].to(y0.device),
        nfev=counter.nfe_per_sample.to(torch.int64).to(y0.device),
        h=torch.zeros(n, dtype=torch.float64, device=y0.device),
        h_initial=h_initial.to(y0.device),
    )


def scipy_rk45(
    fun: Field, y0: Tensor, t0: float, t1: float, *, rtol: float = 1e-5, atol: float = 1e-5
) -> tuple[Tensor, int, int]:
    """scipy's ``solve_ivp(method="RK45")`` on the whole batch flattened into one float64 vector.

    The batch shares one step size (the Score-SDE reference procedure). ``fun`` receives the state
    in y0's dtype and ``rows=None``. Returns (y at t1, nfev, number of accepted steps). Raises an
    IntegrationError if scipy fails.
    """
    import numpy as np
    from scipy.integrate import solve_ivp

    shape, dtype, device = y0.shape, y0.dtype, y0.device
    n = shape[0]

    def rhs(t: float, yflat: np.ndarray) -> np.ndarray:
        y = torch.from_numpy(yflat).reshape(shape).to(device=device, dtype=dtype)
        tt = torch.full((n,), float(t), dtype=torch.float64, device=device)
        out = fun(y, tt, None)
        return out.detach().to("cpu", torch.float64).reshape(-1).numpy()

    start = y0.detach().to("cpu", torch.float64).reshape(-1).numpy()
    sol = solve_ivp(rhs, (float(t0), float(t1)), start, method="RK45", rtol=rtol, atol=atol)
    if sol.status != 0:
        raise IntegrationError(f"scipy solve_ivp failed at t = {float(sol.t[-1]):.6g}: {sol.message}")
    y = torch.from_numpy(sol.y[:, -1].copy()).reshape(shape).to(device=device, dtype=dtype)
    steps = len(sol.t) - 1
    if not math.isfinite(float(sol.y[:, -1].sum())):
        raise IntegrationError("scipy solve_ivp returned non-finite values")
    return y, int(sol.nfev), steps

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

__all__ = [
    "Status",
    "ODESolution",
    "StepReport",
    "IntegrationError",
    "dopri5",
    "scipy_rk45",
    "select_initial_step",
]

#: F(y, t, rows) -> dy/dt for the rows of y; t holds one time per row (float64), rows the sample
#: indices (None: all samples, in order).
Field = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]

# Dormand–Prince 5(4) tableau (the coefficients of the published method).
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
# Error weights: 5th-order minus embedded 4th-order solution, over the 7 stages (FSAL stage last).
_E = (-71 / 57600, 0.0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40)

SAFETY = 0.9
MIN_FACTOR = 0.2
MAX_FACTOR = 10.0
EXPONENT = -1.0 / 5.0  # −1/(error estimator order + 1)


class Status(IntEnum):
    """Per-sample outcome of a solve."""

    SUCCESS = 0
    MAX_STEPS = 1  # step budget spent before reaching t1
    STEP_TOO_SMALL = 2  # step size fell below the floating-point spacing of t
    NONFINITE_START = 3  # F was not finite at the initial point
    STOPPED = 4  # the step callback asked to stop


class IntegrationError(RuntimeError):
    """Some samples did not reach the end time; the message says how many and why."""


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
        for st in (Status.MAX_STEPS, Status.STEP_TOO_SMALL, Status.NONFINITE_START, Status.STOPPED):
            k = int((self.status == st).sum())
            if k:
                parts.append(f"{k} {st.name.lower().replace('_', ' ')}")
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


def _rms(v: Tensor) -> Tensor:
    """Per-row RMS norm over all but the first dimension."""
    return v.reshape(v.shape[0], -1).pow(2).mean(dim=1).sqrt()


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.to(like.dtype).reshape(v.shape[0], *([1] * (like.dim() - 1)))


def _per_row(value: float | Tensor, n: int, device) -> Tensor:
    if isinstance(value, Tensor):
        v = value.to(device=device, dtype=torch.float64)
        return v.expand(n).clone() if v.dim() == 0 else v.clone()
    return torch.full((n,), float(value), dtype=torch.float64, device=device)


def select_initial_step(
    fun: Field, y0: Tensor, f0: Tensor, t0: Tensor, direction: Tensor, span: Tensor, rows: Tensor, rtol, atol
) -> Tensor:
    """scipy's starting step size, per row (Hairer, Nørsett & Wanner, II.4); one evaluation of F."""
    scale = atol + y0.abs() * rtol
    d0 = _rms(y0 / scale).to(torch.float64)
    d1 = _rms(f0 / scale).to(torch.float64)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    h0 = torch.minimum(h0, span)
    y1 = y0 + _bcast(h0 * direction, y0) * f0
    f1 = fun(y1, t0 + h0 * direction, rows)
    d2 = _rms((f1 - f0) / scale).to(torch.float64) / h0
    small = (d1 <= 1e-15) & (d2 <= 1e-15)
    h1 = torch.where(small, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / torch.maximum(d1, d2)) ** (1.0 / 5.0))
    h = torch.minimum(torch.minimum(100 * h0, h1), span)
    return torch.where(torch.isfinite(h) & (h > 0), h, h0)


def _measured_shrink(shrink: Tensor, err: Tensor, h: Tensor, prev_err: Tensor, prev_h: Tensor, again: Tensor) -> Tensor:
    """The shrink factor after a second rejection in a row at the start: 0.9·err^(−1/p) with the
    exponent p measured from the two attempts (clamped to [1, 5]) where it is smaller than scipy's
    ``shrink``.

    Only rows where ``again`` holds and the error fell as the step fell (prev_err > err > 1,
    prev_h > h, both finite) use the measurement; the others keep ``shrink``.
    """
    use = again & torch.isfinite(prev_err) & (prev_err > err) & (err > 1.0) & (prev_h > h)
    if not bool(use.any()):
        return shrink
    ratio_h = torch.where(use, prev_h / h, torch.full_like(h, 2.0))
    ratio_e = torch.where(use, prev_err / err, torch.full_like(err, 2.0))
    p = (torch.log(ratio_e) / torch.log(ratio_h)).clamp(1.0, 5.0)
    fitted = torch.clamp(SAFETY * err.clamp_min(1.0) ** (-1.0 / p), min=MIN_FACTOR)
    return torch.where(use, torch.minimum(shrink, fitted), shrink)


def dopri5(
    fun: Field,
    y0: Tensor,
    t0: float | Tensor,
    t1: float | Tensor,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 10_000,
    h_init: float | Tensor | None = None,
    on_step: Callable[[StepReport], bool | None] | None = None,
    measured_exponent: bool = True,
) -> ODESolution:
    """Integrate dy/dt = fun(y, t, rows) from t0 to t1 (forwards or backwards), each row on its own.

    Args:
        fun: the vector field; called on the unfinished rows only, with their float64 times and
            sample indices.
        y0: (n, ...) initial states; the solve runs in their dtype.
        t0, t1: start and end time, one number or one per row (all rows must run the same way).
        rtol, atol: tolerances of the scipy-style RMS error norm.
        max_steps: step attempts (accepted + rejected) allowed per sample.
        h_init: first step size (positive); default scipy's per-sample selection (1 extra NFE).
        on_step: called after each batched step attempt; returning False stops the solve.
        measured_exponent: after two rejections in a row before a row's first accepted step, shrink
            with the error exponent measured from them when it is below 5 (see the module
            docstring); False: scipy's rules exactly.
    """
    n = y0.shape[0]
    device = y0.device
    t = _per_row(t0, n, device)
    t_end = _per_row(t1, n, device)
    direction = torch.sign(t_end - t)
    if bool((direction > 0).any()) and bool((direction < 0).any()):
        raise ValueError("dopri5: all rows must integrate in the same direction (t1 − t0 of one sign)")
    span = (t_end - t).abs()

    y = y0.clone()
    f = torch.zeros_like(y)
    status = torch.full((n,), int(Status.SUCCESS), dtype=torch.int64, device=device)
    accepted = torch.zeros(n, dtype=torch.int64, device=device)
    rejected = torch.zeros(n, dtype=torch.int64, device=device)
    nfev = torch.zeros(n, dtype=torch.int64, device=device)
    h = torch.zeros(n, dtype=torch.float64, device=device)
    after_reject = torch.zeros(n, dtype=torch.bool, device=device)
    # error norm and step size of each row's last attempt if it was rejected (for measured_exponent)
    last_err = torch.zeros(n, dtype=torch.float64, device=device)
    last_h = torch.zeros(n, dtype=torch.float64, device=device)
    done = span == 0

    idx = torch.nonzero(~done).flatten()
    if idx.numel():
        f0 = fun(y[idx], t[idx], idx)
        nfev[idx] += 1
        f[idx] = f0
        bad = ~torch.isfinite(f0.reshape(idx.numel(), -1)).all(dim=1)
        status[idx[bad]] = int(Status.NONFINITE_START)
        done[idx[bad]] = True
        idx = idx[~bad]
    if idx.numel():
        if h_init is None:
            h[idx] = select_initial_step(fun, y[idx], f[idx], t[idx], direction[idx], span[idx], idx, rtol, atol)
            nfev[idx] += 1
        else:
            h[idx] = torch.minimum(_per_row(h_init, n, device)[idx], span[idx])
    h_initial = h.clone()

    step = 0
    while True:
        idx = torch.nonzero(~done).flatten()
        if idx.numel() == 0:
            break
        spent = (accepted[idx] + rejected[idx]) >= max_steps
        if bool(spent.any()):
            status[idx[spent]] = int(Status.MAX_STEPS)
            done[idx[spent]] = True
            idx = idx[~spent]
        ti, di, hi, te = t[idx], direction[idx], h[idx], t_end[idx]
        spacing = (torch.nextafter(ti, ti + di) - ti).abs()
        tiny = hi < 10 * spacing
        if bool(tiny.any()):
            status[idx[tiny]] = int(Status.STEP_TOO_SMALL)
            done[idx[tiny]] = True
            keep = ~tiny
            idx, ti, di, hi, te = idx[keep], ti[keep], di[keep], hi[keep], te[keep]
        if idx.numel() == 0:
            continue

        remaining = (te - ti).abs()
        last = hi >= remaining
        hi = torch.where(last, remaining, hi)
        hs = hi * di  # signed step, float64
        yi, fi = y[idx], f[idx]
        hy = _bcast(hs, yi)
        ks = [fi]
        for s in range(1, 6):
            acc = sum(a * k for a, k in zip(_A[s], ks))
            ks.append(fun(yi + hy * acc, ti + _C[s] * hs, idx))
        y_new = yi + hy * sum(b * k for b, k in zip(_B, ks) if b != 0.0)
        t_new = torch.where(last, te, ti + hs)
        f_new = fun(y_new, t_new, idx)
        ks.append(f_new)
        nfev[idx] += 6
        err = hy * sum(e * k for e, k in zip(_E, ks) if e != 0.0)
        scale = atol + rtol * torch.maximum(yi.abs(), y_new.abs())
        err_norm = _rms(err / scale).to(torch.float64)
        finite = torch.isfinite(err_norm) & torch.isfinite(f_new.reshape(idx.numel(), -1)).all(dim=1)
        ok = finite & (err_norm < 1.0)

        with torch.no_grad():
            grow = torch.where(
                err_norm == 0,
                torch.full_like(err_norm, MAX_FACTOR),
                torch.clamp(SAFETY * err_norm.clamp_min(1e-300) ** EXPONENT, max=MAX_FACTOR),
            )
            grow = torch.where(after_reject[idx], grow.clamp(max=1.0), grow)
            shrink = torch.clamp(SAFETY * err_norm.clamp_min(1e-300) ** EXPONENT, min=MIN_FACTOR)
            if measured_exponent:
                again = after_reject[idx] & finite & (accepted[idx] == 0)
                shrink = _measured_shrink(shrink, err_norm, hi, last_err[idx], last_h[idx], again)
            shrink = torch.where(finite, shrink, torch.full_like(shrink, MIN_FACTOR))
            factor = torch.where(ok, grow, shrink)

        acc_rows = idx[ok]
        y[acc_rows] = y_new[ok]
        f[acc_rows] = f_new[ok]
        t[acc_rows] = t_new[ok]
        accepted[acc_rows] += 1
        rejected[idx[~ok]] += 1
        after_reject[idx] = ~ok
        last_err[idx] = torch.where(ok, torch.zeros_like(err_norm), err_norm)
        last_h[idx] = hi
        h[idx] = hi * factor
        done[idx[ok & last]] = True
        step += 1

        if on_step is not None:
            report = StepReport(step=step, rows=idx, h=hi, accepted=ok, t=t, y=y, nfev=nfev)
            if on_step(report) is False:
                rest = ~done
                status[rest] = int(Status.STOPPED)
                done[rest] = True

    return ODESolution(
        y=y, t=t, status=status, accepted=accepted, rejected=rejected, nfev=nfev, h=h, h_initial=h_initial
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

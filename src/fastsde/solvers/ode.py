"""Adaptive RK45 on the probability-flow ODE (Song et al. 2021, §4.3).

Two coordinates (option ``coordinate``):

- "logsnr" (default): the PF-ODE in the half log-SNR λ = log(m/σ) on the data-scale state u = x/m,

      du/dλ = D(x, t) − u = (σ²/m)·s(x, t),      x = m·u, t = t(λ),

  with the error measured on u (scipy's rule atol + rtol·max(|u|, |u_new|), data units). Each step
  is written around its DDIM step, u = e^{−s}(u_i − D_i) + D_i + r(s), and Dormand–Prince
  integrates the remainder r (:class:`DormandPrinceLogSNR`): the exponential part, which limits a
  plain Runge–Kutta step in λ at high noise, is exact, and r moves only as D changes. First step
  and largest step 1.5 in λ (``h_init``, ``h_max``; see MAX_STEP for why a cap), no evaluation
  for the first step. One step in t near t_end spans orders of magnitude of σ; one step in λ a
  factor e^h. On EDM and VE (m = 1) u = x and λ = −log σ.
- "time": dx/dt = f(x, t) − ½ g(t)² s(x, t) in t on x (Score SDE's own formulation).

- method "rk45": fastsde's torch integrator with one time and step size per sample; finished
  samples leave the batch, so each sample pays only for its own steps (NFE = 1 + 6 × attempted
  steps, + 1 for scipy's first-step selection in t, + 1 for the final denoise). Step control:
  scipy's rules per sample plus ``dopri5``'s start-up rule for repeated rejections of
  the first step; in λ, a step within 25 % of the rest of the way takes the rest.
- method "scipy": scipy's ``solve_ivp`` RK45 on the whole batch flattened into one float64 vector,
  the reference code's procedure (the batch shares its steps; NFE = nfev, + 1 for the denoise); in
  λ it integrates du/dλ as it stands.

Accepted/rejected step counts per sample go into ``ctx.stats``. A sample that spends ``max_nfe``
evaluations without reaching t_end is a BudgetError naming how many did not finish, unless
``on_budget="partial"`` (then they are returned where they stopped and ``ctx.stats["status"]`` says
so). ``max_steps`` (attempts per sample) and ``partial`` are the older spellings of the same budget
and policy.

**dopri5** (the batched RK45 also used by the likelihood):

Adaptive Dormand–Prince RK45 with one time and one step size per sample.

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
from typing import Any

import torch
from torch import Tensor

from ..noise import NoiseSource
from ..score import CountingScore
from ..sde import per_row
from .core.context import SolverContext, StepInfo
from .core.controllers import Adaptive, Coordinate
from .core.controllers import _measured_shrink as measured_shrink
from .core.driver import IntegrationError, Status, first_time, integrate, take_first_move
from .core.options import Option, one_of, optional, positive_float, positive_int, positive_or_inf
from .core.spec import SolverSpec
from .core.stepper import State, Step, Stepper, StepResult, starts_at_zero_mean

__all__ = [
    "ODE",
    "DormandPrince",
    "DormandPrinceLogSNR",
    "select_initial_step",
    "scipy_law",
    "DOPRI_NFE_START",
    "ODESolution",
    "StepReport",
    "IntegrationError",
    "Status",
    "dopri5",
    "scipy_rk45",
    "scipy_measured_shrink",
]

#: F(y, t, rows) -> dy/dt for the rows of y; t holds one float64 time per row, rows the sample indices.
Field = Callable[[Tensor, Tensor, Tensor], Tensor]

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

#: coordinate="logsnr": a step that would leave less than this share of itself to go takes the rest
LAST_STEP_STRETCH = 0.25
#: coordinate="logsnr": the largest step in λ (a factor e^1.5 in σ/m). On the 64-D EDM mixture a
#: step of 2 across the mode-choice region (σ 1.5 -> 0.2) has a true error 5x (up to 40x) its
#: embedded estimate, so the controller alone would accept it at loose tolerances
MAX_STEP = 1.5
#: coordinate="logsnr": the first step in λ when h_init is None
FIRST_STEP = 1.5

#: Evaluations before the first step: the FSAL evaluation at the start and scipy's step selection.
DOPRI_NFE_START = 2


def _rms(v: Tensor) -> Tensor:
    """Per-row RMS norm over all but the first dimension."""
    return v.reshape(v.shape[0], -1).pow(2).mean(dim=1).sqrt()


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.to(like.dtype).reshape(v.shape[0], *([1] * (like.dim() - 1)))


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


class DormandPrince(Stepper):
    """Dormand–Prince 5(4) on dy/dt = F(y, t, rows): order 5, embedded error of order 5 (scipy's
    exponent 1/5), 6 evaluations per attempt with FSAL, one at the start."""

    order = 5.0
    error_order = 5.0
    nfe_per_step = 6
    first_nfe = 1
    initial_step_nfe = 1

    def __init__(self, ctx: SolverContext, options: dict[str, Any], field: Field, direction: float) -> None:
        super().__init__(ctx, options)
        self.field, self.direction = field, float(direction)

    def _rows(self, rows: Tensor | None, n: int, device) -> Tensor:
        return torch.arange(n, device=device) if rows is None else rows.to(device)

    def _t0(self, n: int, device) -> Tensor:
        return per_row(self.ctx.t_start, n, torch.float64, device)

    def init(self, x: Tensor) -> tuple[State, Tensor | None]:
        n = x.shape[0]
        t0 = self._t0(n, x.device)
        f0 = self.field(x, t0, torch.arange(n, device=x.device))
        bad = ~torch.isfinite(f0.reshape(n, -1)).all(dim=1)
        return {"f": f0, "stale": torch.zeros(n, dtype=torch.bool, device=x.device)}, bad

    #: a corrector has marked rows stale and the step has not yet seen them all cleared (a host flag: the
    #: stale mask is read only after a corrector moved samples, not on every step)
    maybe_stale: bool = False

    def reset(self, state: State, rows: Tensor) -> None:
        """A corrector moved these samples: their FSAL field value is re-evaluated at the next step."""
        state["stale"][rows.to(state["stale"].device)] = True
        self.maybe_stale = True

    def any_stale(self, stale: Tensor) -> bool:
        """Whether some row's field value is stale (one read of the device, only after a corrector)."""
        if not self.maybe_stale:
            return False
        self.maybe_stale = bool(stale.any())
        return self.maybe_stale

    def initial_step(self, x: Tensor, state: State, rows: Tensor, span: Tensor, rtol: float, atol: float) -> Tensor:
        rd = rows.to(x.device)
        t0 = self._t0(x.shape[0], x.device)[rd]
        direction = torch.full_like(t0, self.direction)
        return select_initial_step(self.field, x[rd], state["f"][rd], t0, direction, span, rd, rtol, atol)

    def step(self, x: Tensor, s: Step) -> StepResult:
        rows = self._rows(s.rows, x.shape[0], x.device)
        ti = s.t64
        hs = s.h * self.direction  # signed step in t, float64
        y_new, err, f_new, valid, fresh = self._dopri(
            x, ti, hs, s.t_next64, s, lambda y, t, r: self.field(y, t, r), rows
        )
        return StepResult(x=y_new, error=err, x_ref=y_new, valid=valid, state={"f": f_new, "stale": fresh})

    def _dopri(
        self, y: Tensor, ci: Tensor, hs: Tensor, c_next: Tensor, s: Step, fun: Field, rows: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One Dormand–Prince attempt of dy/dc = fun(y, c, rows) from c_i by hs (float64, per row):
        (y_new, error, fun at the end (FSAL), valid rows, fresh stale flags)."""
        hy = _bcast(hs, y)
        f0, stale = s.get("f"), s.get("stale")
        if self.any_stale(stale):  # moved by a corrector since f was evaluated (1 more NFE for those rows)
            idx = stale.nonzero().squeeze(1)
            f0 = f0.clone()
            f0[idx] = fun(y[idx], ci[idx], rows[idx])
        ks = [f0]
        for j in range(1, 6):
            acc = sum(a * k for a, k in zip(_A[j], ks))
            ks.append(fun(y + hy * acc, ci + _C[j] * hs, rows))
        y_new = y + hy * sum(b * k for b, k in zip(_B, ks) if b != 0.0)
        f_new = fun(y_new, c_next, rows)
        ks.append(f_new)
        err = hy * sum(e * k for e, k in zip(_E, ks) if e != 0.0)
        valid = torch.isfinite(f_new.reshape(y.shape[0], -1)).all(dim=1)
        return y_new, err, f_new, valid, torch.zeros_like(stale)


class DormandPrinceLogSNR(DormandPrince):
    """Dormand–Prince 5(4) on the PF-ODE in λ = log(m/σ) for the data-scale state u = x/m,
    du/dλ = D − u (see the module docstring), written around the DDIM step of each move.

    From (u_i, λ_i) with data prediction D_i, u(λ_i + s) = e^{−s}(u_i − D_i) + D_i + r(s), where the
    remainder obeys r' = D(u, λ) − D_i − r, r(0) = 0: an exact change of variables, so the step is
    Dormand–Prince's (order 5, embedded error of order 5) on r. The exponential part, which limits a
    plain Runge–Kutta step in λ at high noise, is exact, and r is driven only by how much D
    changes over the step; D barely changes at both ends of the solve. 6 evaluations per attempt;
    the last one is D at the new point, the next step's D_i (FSAL, state ``f``).

    The driver's state stays x (so correctors, callbacks and budgets see x); the stepper maps x ↔ u
    and returns its error rescaled so that the controller's rule on x is scipy's rule on u exactly:
    err_u / (atol + rtol·max(|u|, |u_new|)), tolerances on the data scale."""

    coordinate = "logsnr"
    initial_step_nfe = 0

    def __init__(self, ctx: SolverContext, options: dict[str, Any]) -> None:
        super().__init__(ctx, options, field=self.data_field, direction=1.0)
        self.rtol, self.atol = float(options["rtol"]), float(options["atol"])

    def data_field(self, u: Tensor, lam: Tensor, rows: Tensor | None, t: Tensor | None = None) -> Tensor:
        """du/dλ = (σ²/m)·s(m·u, t) at (u, λ); t (float64) overrides t(λ) where it is known exactly."""
        sde = self.sde
        t64 = sde.t_from_lambda(lam) if t is None else t
        m, sig = sde.mean_coeff(t64), sde.marginal_std(t64)
        x = _bcast(m, u) * u
        return _bcast(sig * sig / m, u) * self.ctx.score(x, t64.to(u.dtype), rows, check_finite=False)

    def _denoised(self, u: Tensor, lam: Tensor, rows: Tensor | None, t: Tensor | None = None) -> Tensor:
        """D = u + du/dλ, the data prediction at (u, λ)."""
        return u + self.data_field(u, lam, rows, t)

    def _m(self, t64: Tensor, like: Tensor) -> Tensor:
        return _bcast(self.sde.mean_coeff(t64), like)

    def init(self, x: Tensor) -> tuple[State, Tensor | None]:
        n = x.shape[0]
        t0 = self._t0(n, x.device)
        d0 = self._denoised(x / self._m(t0, x), self.sde.log_snr(t0), torch.arange(n, device=x.device), t0)
        bad = ~torch.isfinite(d0.reshape(n, -1)).all(dim=1)
        return {"f": d0, "stale": torch.zeros(n, dtype=torch.bool, device=x.device)}, bad

    def initial_step(self, x: Tensor, state: State, rows: Tensor, span: Tensor, rtol: float, atol: float) -> Tensor:
        """No evaluation: FIRST_STEP in λ (the exponential part is exact, so the first step is limited
        only by how fast D changes near T, which is slowly), at most the whole way."""
        return torch.minimum(torch.full_like(span, FIRST_STEP), span)

    def step(self, x: Tensor, s: Step) -> StepResult:
        rows = self._rows(s.rows, x.shape[0], x.device)
        t_i, t_n, lam_i, h = s.t64, s.t_next64, s.c, s.h  # the controller's coordinate is λ
        m_i, m_n = self._m(t_i, x), self._m(t_n, x)
        u = x / m_i
        d_i, stale = s.get("f"), s.get("stale")
        if self.any_stale(stale):  # moved by a corrector since D was evaluated (1 more NFE for those rows)
            idx = stale.nonzero().squeeze(1)
            d_i = d_i.clone()
            d_i[idx] = self._denoised(u[idx], lam_i[idx], rows[idx], t_i[idx])
        a = u - d_i
        hy = _bcast(h, x)
        ks = [torch.zeros_like(u)]  # r' = 0 at the start
        for j in range(1, 6):
            r_j = hy * sum(c * k for c, k in zip(_A[j], ks))
            sj = _C[j] * h
            u_j = _bcast(torch.exp(-sj), x) * a + d_i + r_j
            ks.append(self._denoised(u_j, lam_i + sj, rows) - d_i - r_j)
        r_new = hy * sum(b * k for b, k in zip(_B, ks) if b != 0.0)
        u_new = _bcast(torch.exp(-h), x) * a + d_i + r_new
        d_new = self._denoised(u_new, s.c_next, rows, t_n)  # t_end exactly on a final step
        ks.append(d_new - d_i - r_new)
        err_u = hy * sum(e * k for e, k in zip(_E, ks) if e != 0.0)
        valid = torch.isfinite(d_new.reshape(x.shape[0], -1)).all(dim=1)
        x_new = m_n * u_new
        # the controller divides by atol + rtol·max(|x|, |x_new|); make that the rule on u
        on_x = self.atol + self.rtol * torch.maximum(x.abs(), x_new.abs())
        on_u = self.atol + self.rtol * torch.maximum(u.abs(), u_new.abs())
        state = {"f": d_new, "stale": torch.zeros_like(stale)}
        return StepResult(x=x_new, error=err_u * (on_x / on_u), x_ref=x_new, valid=valid, state=state, x0_hat=d_i)


def scipy_law(
    rtol: float,
    atol: float,
    h_init: float | None,
    measured_exponent: bool = True,
    stretch: float = 0.0,
    h_max: float = math.inf,
) -> Adaptive:
    """scipy's RK45 step control per sample (RMS norm of err / (atol + rtol·max(|y|, |y_new|)),
    accept below 1, safety 0.9, factors 0.2..10, exponent 1/5, no growth after a rejection), plus
    the measured-exponent start-up rule of ``dopri5`` when ``measured_exponent``."""
    return Adaptive(
        rtol=rtol,
        atol=atol,
        exponent=1.0 / DormandPrince.error_order,
        mixed="sum",
        norm="rms",
        safety=0.9,
        max_growth=10.0,
        min_factor=0.2,
        nonfinite_factor=0.2,
        h_init=h_init,
        grow_after_reject=False,
        measured_exponent=measured_exponent,
        accept_equal=False,
        stop_tol=None,
        min_step=True,
        stretch=stretch,
        h_max=h_max,
    )


def pf_ode_field(ctx: SolverContext) -> Field:
    """The probability-flow drift f − ½g²·s as F(y, t, rows), t in float64. The score is not checked
    for NaN: a non-finite drift makes the error norm non-finite, and the step is rejected and shrunk
    (by the controller for rk45, by scipy for method="scipy")."""
    sde = ctx.sde

    def field(y: Tensor, t: Tensor, rows: Tensor | None) -> Tensor:
        tt = t.to(y.dtype)
        return sde.ode_drift(y, tt, ctx.score(y, tt, rows, check_finite=False))

    return field


def _build(ctx: SolverContext, opts: dict[str, Any]) -> dict[str, Any]:
    max_nfe, on_budget = opts["max_nfe"], opts["on_budget"]
    if opts.get("coordinate", "logsnr") == "logsnr":
        stepper: DormandPrince = DormandPrinceLogSNR(ctx, opts)
        coord = Coordinate.log_snr(ctx.sde, ctx.t_start, ctx.t_end)
        stretch, h_max = LAST_STEP_STRETCH, MAX_STEP if opts.get("h_max") is None else opts["h_max"]
    else:
        stepper = DormandPrince(ctx, opts, pf_ode_field(ctx), direction=-1.0)
        coord = Coordinate.time(ctx.t_start, ctx.t_end)
        stretch, h_max = 0.0, math.inf if opts.get("h_max") is None else opts["h_max"]
    return dict(
        stepper=stepper,
        controller=scipy_law(
            opts["rtol"], opts["atol"], opts["h_init"], measured_exponent=True, stretch=stretch, h_max=h_max
        ),
        coordinate=coord,
        max_nfe=max_nfe,
        on_budget=on_budget,
        budget_hint="raise max_nfe, loosen rtol/atol",
    )


def _run_scipy(ctx: SolverContext, x: Tensor, rtol: float, atol: float, coordinate: str = "time") -> Tensor:
    """scipy's solve_ivp on the flattened batch (the reference procedure; shared steps), in t on x
    or in λ on u = x/m."""

    dtype, n = x.dtype, x.shape[0]
    if coordinate == "logsnr":
        sde = ctx.sde
        ends = torch.tensor([ctx.t_start, ctx.t_end], dtype=torch.float64)
        lam0, lam1 = sde.log_snr(ends).tolist()
        m0, m1 = sde.mean_coeff(ends).tolist()
        field = DormandPrinceLogSNR(ctx, {"rtol": rtol, "atol": atol}).data_field
        u, nfev, steps = scipy_rk45(field, x / m0, lam0, lam1, rtol=rtol, atol=atol)
        y = u * m1
    else:
        y, nfev, steps = scipy_rk45(pf_ode_field(ctx), x, ctx.t_start, ctx.t_end, rtol=rtol, atol=atol)
    ctx.stats.update(method="scipy", nfev=nfev, accepted=steps)
    ctx.report(
        StepInfo(step=steps, t=torch.full((n,), ctx.t_end, dtype=dtype), h=torch.zeros(n), x=y, nfe=ctx.score.nfe)
    )
    return y


class _ODESpec(SolverSpec):
    """``ode``: the driver for rk45, scipy's own loop for method="scipy"."""

    def run(self, ctx: SolverContext, x: Tensor, **options: Any) -> Tensor:
        if options["method"] == "scipy":
            if not starts_at_zero_mean(ctx.sde, ctx.t_start):
                return _run_scipy(ctx, x, options["rtol"], options["atol"], options["coordinate"])
            # from m = 0 (pure noise): the driver's shared first move (η = 0), then scipy from there
            t_start = ctx.t_start
            t1 = first_time(ctx.sde, float(t_start), float(ctx.t_end), float(options["rtol"]), x.dtype)
            x = take_first_move(ctx, x, t1, 0.0)
            ctx.t_start = t1
            try:
                return _run_scipy(ctx, x, options["rtol"], options["atol"], options["coordinate"])
            finally:
                ctx.t_start = t_start
                ctx.stats["first_move"] = {"t": t1, "eta": 0.0, "nfe": 1}
        plan = self.build(ctx, dict(options))
        ctx.stats["method"] = "rk45"
        return integrate(ctx, x, desc=self.name, **plan)


ODE = _ODESpec(
    name="ode",
    build=_build,
    stepper=DormandPrinceLogSNR,
    options={
        "rtol": Option(1e-5, positive_float, "relative tolerance"),
        "atol": Option(1e-5, positive_float, "absolute tolerance"),
        "method": Option("rk45", one_of("rk45", "scipy"), "rk45: per-sample torch; scipy: solve_ivp on the batch"),
        "coordinate": Option(
            "logsnr",
            one_of("logsnr", "time"),
            "logsnr: steps in λ = log(m/σ) on x/m, error on the data scale; time: steps in t on x (Score SDE's)",
        ),
        "max_nfe": Option(
            DOPRI_NFE_START + 6 * 10_000, positive_int(8), "per-sample budget of solver NFE (rk45; 10 000 attempts)"
        ),
        "on_budget": Option("raise", one_of("raise", "partial"), "what happens when max_nfe is reached"),
        "h_init": Option(
            None,
            optional(positive_float),
            "first step (default: 1.5 in λ for logsnr, no NFE; scipy's selection, 1 NFE, for time)",
        ),
        "h_max": Option(None, optional(positive_or_inf), "largest step (default: 1.5 in λ for logsnr, none for time)"),
    },
    summary="adaptive Dormand–Prince RK45 on the probability-flow ODE in log-SNR (data scale), per-sample steps",
    adaptive=True,
    tolerance="rtol",
)


# -- dopri5: batched RK45 on any field (the likelihood's solver), per-sample steps ------------------

SAFETY = 0.9
MIN_FACTOR = 0.2


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
    h_initial: Tensor

    @property
    def finished(self) -> Tensor:
        return self.status == Status.DONE

    def failure_message(self) -> str:
        """A one-line summary of the samples that did not finish ('' if all did)."""
        n = self.status.shape[0]
        parts = []
        labels = {Status.BUDGET: "max steps"}  # dopri5's budget is max_steps attempts per sample
        for st in (Status.BUDGET, Status.STEP_TOO_SMALL, Status.NONFINITE_START, Status.NONFINITE, Status.STOPPED):
            k = int((self.status == st).sum())
            if k:
                label = (
                    "NaN/Inf however small the step"
                    if st == Status.NONFINITE
                    else labels.get(st, st.name.lower().replace("_", " "))
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


def scipy_measured_shrink(
    shrink: Tensor, err: Tensor, h: Tensor, prev_err: Tensor, prev_h: Tensor, again: Tensor
) -> Tensor:
    """The start-up shrink of :func:`dopri5`'s measured-exponent rule at scipy's safety and minimum factor."""
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
        done = torch.full((n,), int(Status.DONE), dtype=torch.int64, device=y0.device)
        return ODESolution(y0.clone(), t, done, zeros, zeros, zeros, t * 0)
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
    status = torch.tensor([int(Status[s.upper()]) for s in st["status"]], dtype=torch.int64, device=y0.device)
    h_initial = st.get("h_initial", torch.full((n,), float(h_init or 0.0), dtype=torch.float64))
    return ODESolution(
        y=y,
        t=st["t_final"].to(y0.device),
        status=status,
        accepted=st["accepted"].to(y0.device),
        rejected=st["rejected"].to(y0.device),
        nfev=counter.nfe_per_sample.to(torch.int64).to(y0.device),
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

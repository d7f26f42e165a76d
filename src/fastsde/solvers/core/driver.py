"""The driver: the loops every solver runs in.

``integrate(ctx, x, stepper, controller, ...)`` steps every sample from the coordinate's start to its
end, in one of two loops. A fixed grid (the controller that always accepts) runs
:func:`_integrate_fixed`: every sample steps together, so it has no per-sample status or masks and never
reads the device inside the loop. An adaptive controller runs
:class:`~fastsde.solvers.core.adaptive_loop.AdaptiveSolve`, with one read of the device per attempt.
Together they own per-sample time, step size and status (:class:`Status`), compaction (finished samples
leave the score calls), the per-sample NFE budget with one policy for running out (``on_budget``:
raise :class:`BudgetError`, or return partial results with a per-sample status), the score-reuse
cache after a rejection, the Brownian path, the corrector after accepted steps, progress (driven by
t), the callback (a :class:`~fastsde.solvers.core.context.StepInfo` after each batched attempt; returning
False stops) and one stats schema for every solver:

    accepted, rejected, nonfinite_rejections (per sample), status (per-sample names),
    t_final (per sample), nfe_solver_per_sample (denoise excluded), iterations (batched attempts)

A solve that starts where m = 0 (a rectified flow's u = 1: pure noise, log-SNR −∞) with a method that
has no exact first move of its own (``Stepper.singular_start``) takes its first move through
:func:`first_move`, exact in the score's data prediction x̂0: on a fixed grid as move 0 (to the second
grid point; the method's state is untouched, so multistep histories start there, as at any start), for
an adaptive controller to the time :func:`first_time` picks, from where the controller starts.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ...noise import Stream
from ...sde import SDE, per_row
from .adaptive_loop import AdaptiveSettings, AdaptiveSolve
from .common import posterior_step
from .context import StepInfo, progress_bar
from .controllers import Adaptive, FixedGrid
from .status import MAX_NONFINITE, BudgetError, IntegrationError, NonFiniteSolveError, Status
from .stepper import State, Step, Stepper, StepResult

__all__ = [
    "Status",
    "IntegrationError",
    "BudgetError",
    "NonFiniteSolveError",
    "MAX_NONFINITE",
    "integrate",
    "first_move",
    "first_time",
    "take_first_move",
    "FIRST_MEAN_MAX",
]


#: the largest m(t1) of the adaptive solvers' shared first move from m = 0 (see :func:`first_time`)
FIRST_MEAN_MAX = 0.1


def first_move(sde: SDE, x: Tensor, x0: Tensor, t: Tensor, t_next: Tensor, eta: float, z: Tensor | None) -> Tensor:
    """The shared first move from m(t) = 0 (a rectified flow's pure noise), exact in the data
    prediction x̂0 = ``x0``: DDIM's posterior move x_s = m_s·x̂0 + σ_s·(√(1 − η²)·ε̂ + η·z), ε̂ = x/σ_t.

    At m = 0 the score is −x whatever the data, so x̂0 must come from the score's data prediction, and
    x_T ~ N(0, I) is independent of the data: with the exact x̂0 = E[x0] the law of x_s, N(m_s·E[x0],
    σ_s²·I), is the same for every η, which only sets the coupling to x_T. A deterministic method takes
    η = 0 (its samples stay a function of x_T: the DDIM / Euler move, first order in the step); a
    stochastic one η = 1, the h → ∞ limit of its own first-order move (SDE-DPM-Solver++ with any η > 0:
    (σ_s/σ_t)·e^{−ηh} → 0, noise std σ_s·√(1 − e^{−2ηh}) → σ_s), i.e. the reverse SDE's DDPM posterior
    q(x_s | x_T, x0 = x̂0). See ``Stepper.singular_eta``."""
    return posterior_step(sde, x, x0, t, t_next, eta, z)


def first_time(sde: SDE, t_start: float, t_end: float, rtol: float, dtype: torch.dtype) -> float:
    """Where an adaptive solve's shared first move from m(t_start) = 0 ends: the time t1 with
    m(t1) = clamp(√rtol, √eps(dtype), FIRST_MEAN_MAX), by bisection (m decreases in t).

    The move is first order with x̂0 frozen at its start, so its local error is O(m(t1)²) (the flow
    velocity (x − x̂0)/σ changes at a finite rate in m near pure noise): m(t1) = √rtol keeps it at the
    controller's per-step tolerance, so it vanishes as the tolerance tightens, and λ(t1) = log(m/σ) is
    finite for a controller in log-SNR. The cap keeps the move short at loose tolerances, the floor above
    the dtype's resolution. A t1 at or past t_end is moved to the middle of [t_end, t_start]."""
    eps = torch.finfo(dtype).eps
    target = min(max(math.sqrt(rtol), math.sqrt(eps)), FIRST_MEAN_MAX)

    def m(t: float) -> float:
        return float(sde.mean_coeff(torch.tensor([t], dtype=torch.float64))[0])

    lo, hi = float(t_end), float(t_start)
    if m(lo) <= target:
        return 0.5 * (lo + hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if m(mid) > target:
            lo = mid
        else:
            hi = mid
    return lo  # m(lo) >= target > 0: λ(t1) finite


def take_first_move(ctx, x: Tensor, t1: float, eta: float, check_finite: bool = True) -> Tensor:
    """Every sample of x from ctx.t_start (m = 0) to t1 by :func:`first_move`: one counted data
    prediction per sample; η > 0 draws Stream.FIRST_MOVE (counter 0), keyed per sample."""
    score = ctx.score
    if not getattr(score, "has_data_prediction", False):
        raise _no_data_prediction(ctx.t_start)
    n, dt, dev = x.shape[0], x.dtype, x.device
    t = per_row(float(ctx.t_start), n, dt, dev)
    tn = per_row(float(t1), n, dt, dev)
    x0 = score.data_prediction(x, t, check_finite=check_finite)
    z = ctx.noise.normal(x.shape[1:], Stream.FIRST_MOVE, 0, dtype=dt, device=dev) if eta > 0.0 else None
    return first_move(ctx.sde, x, x0, t, tn, eta, z)


def _no_data_prediction(t_start: float) -> ValueError:
    return ValueError(
        f"a solve from t = {float(t_start):g}, where m = 0, needs the score's data prediction x̂0 there (the "
        "score is −x whatever the data): use fastsde.VelocityScore for a velocity network, or start below it"
    )


def integrate(ctx, x: Tensor, stepper: Stepper, controller: FixedGrid | Adaptive, **options: Any) -> Tensor:
    """Step x from the coordinate's start to its end; returns x at the end (partial rows where they
    stopped). ``options``: on a fixed grid ``corrector`` and ``desc`` (:func:`_integrate_fixed`);
    adaptive, the fields of :class:`~fastsde.solvers.core.adaptive_loop.AdaptiveSettings` (coordinate,
    brownian, corrector, compact, max_nfe, on_budget, reuse_rejected, desc, budget_hint, max_nonfinite),
    run by :class:`~fastsde.solvers.core.adaptive_loop.AdaptiveSolve`. Statistics go to ``ctx.stats``. An adaptive sample with ``max_nonfinite`` attempts in a row whose error was not
    finite, or whose step shrank below ten floating-point spacings of its coordinate after a non-finite
    attempt, stops with status "nonfinite" (None: never).

    From m = 0 with a method without its own exact first move (``stepper.shared_first_move``): on a
    fixed grid move 0 is :func:`first_move` (1 evaluation instead of the method's move); an adaptive
    solve first moves every sample to :func:`first_time` (1 evaluation, counted in the budget and the
    statistics, ``ctx.stats["first_move"]``), then runs from there (``ctx.t_start`` is t1 meanwhile, so
    the method's state starts there)."""
    if not controller.adaptive:
        return _integrate_fixed(ctx, x, stepper, controller, **options)
    settings = AdaptiveSettings(**options)
    if not stepper.shared_first_move:
        return AdaptiveSolve(ctx, x, stepper, controller, settings, None).run()
    coordinate = settings.coordinate
    t_start = ctx.t_start
    eta = stepper.singular_eta()
    t1 = first_time(ctx.sde, float(t_start), float(coordinate.t_end), float(controller.rtol), x.dtype)
    nfe0 = ctx.score.nfe_per_sample.clone()
    x = take_first_move(ctx, x, t1, eta, check_finite=False)
    ctx.t_start = t1
    stepper.from_zero_mean = False
    settings.coordinate = coordinate.restarted(t1)
    try:
        out = AdaptiveSolve(ctx, x, stepper, controller, settings, nfe0).run()
    finally:
        ctx.t_start = t_start
    ctx.stats["accepted"] = ctx.stats["accepted"] + 1
    ctx.stats["first_move"] = {"t": t1, "eta": eta, "nfe": 1}
    return out


def _integrate_fixed(ctx, x: Tensor, stepper: Stepper, grid: FixedGrid, **options: Any) -> Tensor:
    """The fixed-grid loop: every sample steps together from grid point k to k + 1, so there is no
    per-sample status, mask or compaction, and the loop itself never reads the device: each step's times
    are made on the host from the grid, decisions that depend on the step (first order, the corrector's
    placement) are made on the host, and the stepper's state is replaced, not merged. The score's NaN/Inf
    check is the counting wrapper's (one reduction per evaluation; read at once on the CPU, where it costs
    nothing, and every ``CountingScore.FLUSH_EVERY`` evaluations and at the end on an accelerator).
    The NFE, the noise keys (the grid index) and the samples are those of the per-row arithmetic."""
    corrector, desc = options.get("corrector"), options.get("desc", "")
    n, dt, dev = x.shape[0], x.dtype, x.device
    moves = grid.moves
    points = _GridPoints(grid.grid, n, dt, dev)
    times = points.times  # float64 on the host: each step's times without reading the device
    # σ at every grid point, on the host, for the corrector's placement (below sigma_max)
    sigmas = ctx.sde.marginal_std(grid.grid).tolist() if corrector is not None else []
    nfe0 = ctx.score.nfe_per_sample.clone()
    state, bad_start = stepper.init(x)
    if bad_start is not None and bool(bad_start.any()):  # once, before the loop
        raise NonFiniteSolveError(
            f"the score returned NaN or Inf at the start, t = {times[0]:g}, for {int(bad_start.sum())} of {n} samples"
        )
    if corrector is not None and corrector.at_start:
        x = corrector(ctx, x, points.t(0), None, torch.zeros(n, dtype=torch.int64), points.t(1))
        stepper.reset(state, torch.arange(n))
    bar = progress_bar(desc) if ctx.progress else None
    pending_first = stepper.shared_first_move
    history = 0  # the stepper's own moves since the start or the last corrector reset
    it = 0
    try:
        for k in range(moves):
            step = points.step(ctx, k, moves, state, x, history)
            if pending_first:
                pending_first = False
                res = _shared_first_step(ctx, stepper, x, step)
            else:
                res = stepper.step(x, step)
                history += 1
            x = res.x
            for name, new in res.state.items():
                old = state[name]
                state[name] = new if new.dtype == old.dtype and new.is_contiguous() else new.to(old.dtype).contiguous()
            it += 1
            if bar is not None:
                bar.update(int(100 * (k + 1) / moves) - bar.n)
            if ctx.callback is not None and not _report_fixed(ctx, it - 1, step, x, res):
                break
            if corrector is not None and _corrects(corrector, k, moves, sigmas):
                key = k + 1 if corrector.key == "point" else k
                keys = torch.full((n,), key, dtype=torch.int64)
                nxt = points.t(min(k + 2, moves))
                x = corrector.correct(ctx, x, points.t(k + 1), None, keys, nxt)
                stepper.reset(state, torch.arange(n))
                history = 0
    finally:
        if bar is not None:
            bar.close()
    stopped = ctx.stopped
    t_final = torch.full((n,), times[it] if stopped else times[-1], dtype=torch.float64)
    ctx.stats.update(
        iterations=it,
        accepted=torch.full((n,), it, dtype=torch.int64),
        rejected=torch.zeros(n, dtype=torch.int64),
        nonfinite_rejections=torch.zeros(n, dtype=torch.int64),
        status=[(Status.STOPPED if stopped and it < moves else Status.DONE).label] * n,
        t_final=t_final,
        nfe_solver_per_sample=ctx.score.nfe_per_sample - nfe0,
        reused_evaluations=torch.zeros(n, dtype=torch.int64),
    )
    return x


class _GridPoints:
    """The per-row tensors of a fixed grid's points, from the grid's times on the host (float64), and
    each move's :class:`Step`. Up to ``TABLE_ENTRIES`` rows × points they are made once per run as rows
    of one table each (no tensor op per step); beyond that as the loop reaches them."""

    #: rows × points up to which the per-point tensors are tabulated at the start (8 MB per float64 table)
    TABLE_ENTRIES = 1 << 20

    def __init__(self, grid: Tensor, n: int, dtype: torch.dtype, device: torch.device) -> None:
        self.grid = grid
        self.times, self.n, self.dtype, self.device = grid.tolist(), n, dtype, device
        self._last: tuple[int, tuple[Tensor, Tensor, Tensor, Tensor]] | None = None
        self.h = torch.ones(n, dtype=torch.float64, device=device)
        self.not_final = torch.zeros(n, dtype=torch.bool, device=device)
        self.final = torch.ones(n, dtype=torch.bool, device=device)
        self._table: list[tuple[Tensor, Tensor, Tensor, Tensor]] | None = None
        if n * len(self.times) <= self.TABLE_ENTRIES:
            g = grid.to(device)
            rows = lambda v: v.unsqueeze(1).expand(-1, n).contiguous().unbind(0)  # noqa: E731
            c = torch.arange(len(self.times), dtype=torch.float64)
            self._table = list(
                zip(rows(g.to(dtype)), rows(g), rows(c.to(device)), rows(c.to(torch.int64)), strict=True)
            )

    def point(self, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(t in the solve's dtype, t in float64, c = k in float64, k as int64 on the host) of grid point k,
        one per row."""
        if self._table is not None:
            return self._table[k]
        if self._last is not None and self._last[0] == k:
            return self._last[1]
        v, n, dev = self.times[k], self.n, self.device
        made = (
            torch.full((n,), v, dtype=self.dtype, device=dev),
            torch.full((n,), v, dtype=torch.float64, device=dev),
            torch.full((n,), float(k), dtype=torch.float64, device=dev),
            torch.full((n,), k, dtype=torch.int64),
        )
        self._last = (k, made)
        return made

    def t(self, k: int) -> Tensor:
        return self.point(k)[0]

    def step(self, ctx, k: int, moves: int, state: State, x: Tensor, history: int) -> Step:
        """The Step of move k (grid point k to k + 1) for every row, ``history`` moves of the method behind it."""
        t, t64, c, index = self.point(k)
        t_next, t_next64, c_next, _ = self.point(k + 1)
        last = k + 1 == moves and not ctx.denoise_is_final_move
        score = ctx.score
        return Step(
            t=t,
            t_next=t_next,
            t64=t64,
            t_next64=t_next64,
            c=c,
            c_next=c_next,
            h=self.h,
            index=index,
            attempt=index,
            final=self.final if last else self.not_final,
            moves=moves + int(ctx.denoise_is_final_move),  # lower-order rules count the denoise when it is a move
            rows=None,
            score=score,
            score0=partial(score, x, t),
            brownian=_no_brownian,
            normal_fn=partial(_keyed_normal, ctx.noise, k),
            state=state,
            data_prediction=score.data_prediction if getattr(score, "has_data_prediction", False) else None,
            k=k,
            history=history,
            is_final=last,
            grid=self.grid,
        )


def _keyed_normal(noise, counter: int, like: Tensor, stream: int) -> Tensor:
    """Every row's standard normal draw of ``stream`` keyed by ``counter`` (a fixed grid's index)."""
    return noise.normal(like.shape[1:], stream, counter, None, dtype=like.dtype, device=like.device)


def _no_brownian(points: list[Tensor]) -> list[Tensor]:
    raise ValueError("this method needs a Brownian path: run it adaptively")


def _shared_first_step(ctx, stepper: Stepper, x: Tensor, step: Step) -> StepResult:
    """Move 0 from m = 0 by :func:`first_move` (the method has no exact first move of its own)."""
    if step.data_prediction is None:
        raise _no_data_prediction(ctx.t_start)
    x0 = step.data_prediction(x, step.t)
    eta = stepper.singular_eta()
    z = step.normal(x, Stream.FIRST_MOVE) if eta > 0.0 else None
    return StepResult(x=first_move(ctx.sde, x, x0, step.t, step.t_next, eta, z), x0_hat=x0)


def _corrects(corrector, k: int, moves: int, sigmas: list[float]) -> bool:
    """Whether the corrector runs after move k (decided on the host: every row is at the same point)."""
    if k + 1 == moves and not corrector.at_end:
        return False
    key = k + 1 if corrector.key == "point" else k
    return key % corrector.every == 0 and sigmas[k + 1] <= corrector.sigma_max


def _report_fixed(ctx, it: int, step: Step, x: Tensor, res: StepResult) -> bool:
    """Hand the callback move ``it`` of a fixed grid; False when it asked to stop."""
    info = StepInfo(
        step=it,
        t=step.t_next,
        h=(step.t64 - step.t_next64).to(x.dtype),
        x=x,
        nfe=ctx.score.nfe,
        accepted=None,
        x0_hat=res.x0_hat,
    )
    return ctx.report(info)

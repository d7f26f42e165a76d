"""The driver: the one loop that every solver runs in.

``integrate(ctx, x, stepper, controller, ...)`` steps every sample from the coordinate's start to its
end. It owns per-sample time, step size and status (:class:`Status`), compaction (finished samples
leave the score calls), the per-sample NFE budget with one policy for running out (``on_budget``:
raise :class:`BudgetError`, or return partial results with a per-sample status), the score-reuse
cache after a rejection, the Brownian path, the corrector after accepted steps, progress (driven by
t), the callback (a :class:`~fastsde.solvers.core.context.StepInfo` after each batched attempt; returning
False stops) and one stats schema for every solver:

    accepted, rejected, nonfinite_rejections (per sample), status (per-sample names),
    t_final (per sample), nfe_solver_per_sample (denoise excluded), iterations (batched attempts)

A fixed grid is the controller that always accepts; then every sample steps together.

A solve that starts where m = 0 (a rectified flow's u = 1: pure noise, log-SNR −∞) with a method that
has no exact first move of its own (``Stepper.singular_start``) takes its first move through
:func:`first_move`, exact in the score's data prediction x̂0: on a fixed grid as move 0 (to the second
grid point; the method's state is untouched, so multistep histories start there, as at any start), for
an adaptive controller to the time :func:`first_time` picks, from where the controller starts.
"""

from __future__ import annotations

import math
from enum import IntEnum
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ...brownian import make_path
from ...noise import Stream
from ...score import NonFiniteScoreError
from ...sde import SDE, broadcast_to_rows, per_row
from .common import posterior_step
from .context import StepInfo
from .controllers import Adaptive, Coordinate, FixedGrid
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


class Status(IntEnum):
    """Per-sample status of a solve."""

    RUNNING = 0
    DONE = 1
    BUDGET = 2  # the NFE budget ran out before t_end
    STOPPED = 3  # the callback asked to stop
    STEP_TOO_SMALL = 4  # the step fell below the floating-point spacing of the coordinate
    NONFINITE_START = 5  # the first evaluation was not finite
    NONFINITE = 6  # MAX_NONFINITE attempts in a row had a non-finite error (the score returned NaN/Inf)

    @property
    def label(self) -> str:
        return self.name.lower()


class IntegrationError(RuntimeError):
    """Some samples did not reach the end time; the message says how many and why."""


class BudgetError(IntegrationError):
    """Some samples did not reach t_end within the per-sample NFE budget ``max_nfe``."""


class NonFiniteSolveError(IntegrationError, NonFiniteScoreError):
    """Adaptive samples stopped because every attempt in a row gave NaN/Inf (a broken score, not a
    tolerance problem); also a :class:`~fastsde.score.NonFiniteScoreError`, as fixed-step solvers raise."""


#: Non-finite attempts in a run after which an adaptive sample stops (status "nonfinite"): each
#: shrinks h by the controller's nonfinite factor (0.1 or 0.2), so after ten the score is NaN/Inf
#: however small the step, and more attempts only burn the budget. A run ends with a finite attempt
#: at a step within a factor 100 of the one that first failed, so a sample creeping up to a NaN region
#: with ever smaller accepted steps in between stays in its run; one whose step falls below ten
#: floating-point spacings of its coordinate after a non-finite attempt stops with the same status.
MAX_NONFINITE = 10


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
    stopped). ``options``: the keywords of :func:`_integrate` (coordinate, brownian, corrector, compact,
    max_nfe, on_budget, reuse_rejected, desc, budget_hint, max_nonfinite). Statistics go to
    ``ctx.stats``. An adaptive sample with ``max_nonfinite`` attempts in a row whose error was not
    finite, or whose step shrank below ten floating-point spacings of its coordinate after a non-finite
    attempt, stops with status "nonfinite" (None: never).

    From m = 0 with a method without its own exact first move (``stepper.shared_first_move``): on a
    fixed grid move 0 is :func:`first_move` (1 evaluation instead of the method's move); an adaptive
    solve first moves every sample to :func:`first_time` (1 evaluation, counted in the budget and the
    statistics, ``ctx.stats["first_move"]``), then runs from there (``ctx.t_start`` is t1 meanwhile, so
    the method's state starts there)."""
    if not controller.adaptive:
        return _integrate_fixed(ctx, x, stepper, controller, **options)
    if not stepper.shared_first_move:
        return _integrate(ctx, x, stepper, controller, **options)
    coordinate = options.get("coordinate")
    assert coordinate is not None, "an adaptive solve needs its coordinate"
    t_start = ctx.t_start
    eta = stepper.singular_eta()
    t1 = first_time(ctx.sde, float(t_start), float(coordinate.t_end), float(controller.rtol), x.dtype)
    nfe0 = ctx.score.nfe_per_sample.clone()
    x = take_first_move(ctx, x, t1, eta, check_finite=False)
    ctx.t_start = t1
    stepper.from_zero_mean = False
    try:
        out = _integrate(ctx, x, stepper, controller, nfe0=nfe0, **{**options, "coordinate": coordinate.restarted(t1)})
    finally:
        ctx.t_start = t_start
    ctx.stats["accepted"] = ctx.stats["accepted"] + 1
    ctx.stats["first_move"] = {"t": t1, "eta": eta, "nfe": 1}
    return out


def _integrate_fixed(ctx, x: Tensor, stepper: Stepper, grid: FixedGrid, **options: Any) -> Tensor:
    """The fixed-grid loop: every sample steps together from grid point k to k + 1, so there is no
    per-sample status, mask or compaction, and the loop never waits for the device: each step's times
    are made on the host from the grid, the score's NaN/Inf checks are deferred to the end of the solve
    (one reduction per evaluation, looked at once; the same error), and the stepper's state is replaced,
    not merged. The NFE, the noise keys (the grid index) and the results are those of the general loop."""
    corrector, desc = options.get("corrector"), options.get("desc", "")
    n, dt, dev = x.shape[0], x.dtype, x.device
    moves = grid.moves
    times = grid.grid.tolist()  # float64 on the host: each step's times without reading the device
    points = _GridPoints(grid.grid, n, dt, dev)
    nfe0 = ctx.score.nfe_per_sample.clone()
    state, bad_start = stepper.init(x)
    if bad_start is not None and bool(bad_start.any()):  # once, before the loop
        raise NonFiniteSolveError(
            f"the score returned NaN or Inf at the start, t = {times[0]:g}, for {int(bad_start.sum())} of {n} samples"
        )
    if corrector is not None and corrector.at_start:
        x = corrector(ctx, x, points.t(0), None, torch.zeros(n, dtype=torch.int64), points.t(1))
        stepper.reset(state, torch.arange(n))
    bar = _progress_bar(desc) if ctx.progress else None
    pending_first = stepper.shared_first_move
    history = 0  # the stepper's own moves since the start or the last corrector reset
    it = 0
    try:
        with ctx.score.deferring():
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
                    state[name] = (
                        new if new.dtype == old.dtype and new.is_contiguous() else new.to(old.dtype).contiguous()
                    )
                it += 1
                if bar is not None:
                    bar.update(int(100 * (k + 1) / moves) - bar.n)
                if ctx.callback is not None and not _report_fixed(ctx, it - 1, step, x, res):
                    break
                if corrector is not None and _corrects(ctx, corrector, k, moves, times):
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
    """The per-row tensors of a fixed grid's points, made on the host from the grid's times (float64)
    as the loop reaches them (a move's end point is the next move's start), and each move's :class:`Step`."""

    def __init__(self, grid: Tensor, n: int, dtype: torch.dtype, device: torch.device) -> None:
        self.grid = grid
        self.times, self.n, self.dtype, self.device = grid.tolist(), n, dtype, device
        self._last: tuple[int, tuple[Tensor, Tensor, Tensor]] | None = None
        self.h = torch.ones(n, dtype=torch.float64, device=device)
        self.not_final = torch.zeros(n, dtype=torch.bool, device=device)
        self.final = torch.ones(n, dtype=torch.bool, device=device)

    def point(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """(t in the solve's dtype, t in float64, c = k in float64) of grid point k, one time per row."""
        if self._last is not None and self._last[0] == k:
            return self._last[1]
        v, n, dev = self.times[k], self.n, self.device
        made = (
            torch.full((n,), v, dtype=self.dtype, device=dev),
            torch.full((n,), v, dtype=torch.float64, device=dev),
            torch.full((n,), float(k), dtype=torch.float64, device=dev),
        )
        self._last = (k, made)
        return made

    def t(self, k: int) -> Tensor:
        return self.point(k)[0]

    def step(self, ctx, k: int, moves: int, state: State, x: Tensor, history: int) -> Step:
        """The Step of move k (grid point k to k + 1) for every row, ``history`` moves of the method behind it."""
        t, t64, c = self.point(k)
        t_next, t_next64, c_next = self.point(k + 1)
        index = torch.full((self.n,), k, dtype=torch.int64)
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
            moves=moves,
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


def _corrects(ctx, corrector, k: int, moves: int, times: list[float]) -> bool:
    """Whether the corrector runs after move k (decided on the host: every row is at the same point)."""
    if k + 1 == moves and not corrector.at_end:
        return False
    key = k + 1 if corrector.key == "point" else k
    if key % corrector.every:
        return False
    if math.isfinite(corrector.sigma_max):
        sigma = float(ctx.sde.marginal_std(torch.tensor([times[k + 1]], dtype=torch.float64))[0])
        return sigma <= corrector.sigma_max
    return True


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


def _progress_bar(desc: str):
    """A tqdm bar of the share of the way from start to end in percent (an attempt count or a rate in
    "it/s" would mislead for adaptive solvers)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=100, desc=desc, leave=False, bar_format="{desc}: {n_fmt}/{total_fmt} % |{bar}| {elapsed}<{remaining}"
    )


def _integrate(
    ctx,
    x: Tensor,
    stepper: Stepper,
    controller: FixedGrid | Adaptive,
    *,
    coordinate: Coordinate | None = None,
    brownian: str = "fresh",
    corrector=None,
    compact: bool = True,
    max_nfe: int | None = None,
    on_budget: str = "raise",
    reuse_rejected: bool = False,
    desc: str = "",
    budget_hint: str = "raise max_nfe, loosen the tolerances",
    max_nonfinite: int | None = MAX_NONFINITE,
    nfe0: Tensor | None = None,
) -> Tensor:
    """:func:`integrate`'s loop; ``nfe0``: the per-sample evaluations before the solve (default now)."""
    n, dt, dev = x.shape[0], x.dtype, x.device
    f64 = torch.float64
    adaptive = controller.adaptive
    coord = controller.coordinate if not adaptive else coordinate
    assert coord is not None
    c_start, c_end, t_end = coord.c_start, coord.c_end, float(coord.t_end)
    moves = None if adaptive else controller.moves
    stop_tol = controller.stop_tol if adaptive else 0.0

    x = x.clone()
    x_prev = x.clone() if adaptive else None
    t = per_row(coord.t_start, n, f64, dev)
    c = per_row(c_start, n, f64, dev)
    c0 = c.clone()
    status = torch.full((n,), int(Status.RUNNING), dtype=torch.int64)
    attempts = torch.zeros(n, dtype=torch.int64)
    accepted = torch.zeros(n, dtype=torch.int64)
    rejected = torch.zeros(n, dtype=torch.int64)
    nonfinite = torch.zeros(n, dtype=torch.int64)
    nonfinite_run = torch.zeros(n, dtype=torch.int64)  # non-finite attempts in the current run
    run_h0 = torch.zeros(n, dtype=f64)  # the step of the run's first non-finite attempt
    reused = torch.zeros(n, dtype=torch.int64)
    nfe0 = ctx.score.nfe_per_sample.clone() if nfe0 is None else nfe0
    # a fixed grid's move 0 from m = 0 for a method without its own exact one (a host flag: no synchronisation)
    pending_first = not adaptive and stepper.shared_first_move

    state, bad_start = stepper.init(x)
    if bad_start is not None and bool(bad_start.any()):
        status[bad_start.cpu()] = int(Status.NONFINITE_START)
    if adaptive:
        if controller.h_init is None:
            rows0 = (status == Status.RUNNING).nonzero().squeeze(1)
            h = torch.zeros(n, dtype=f64, device=dev)
            if rows0.numel():
                span = c_end - c0[rows0.to(dev)]
                h[rows0.to(dev)] = stepper.initial_step(x, state, rows0, span, controller.rtol, controller.atol)
        else:
            h = torch.full((n,), float(controller.h_init), dtype=f64, device=dev)
    else:
        h = torch.ones(n, dtype=f64, device=dev)
    h_initial = h.clone()
    s_cache = torch.zeros_like(x) if reuse_rejected else None
    s_valid = torch.zeros(n, dtype=torch.bool, device=dev)
    err_prev = torch.ones(n, dtype=f64, device=dev)
    after_reject = torch.zeros(n, dtype=torch.bool, device=dev)
    last_err = torch.zeros(n, dtype=f64, device=dev)
    last_h = torch.zeros(n, dtype=f64, device=dev)
    cost = stepper.nfe_per_step + (corrector.nfe if corrector is not None else 0)
    span_c = c_end - c0
    path = make_path(brownian, ctx.noise, x, c_start, c_end, coord.variance) if adaptive else None
    check_finite = not adaptive
    has_dp = bool(getattr(ctx.score, "has_data_prediction", False))
    # the full batch's rows and mask, kept on the device: a fixed grid steps every sample together, and
    # copying them from the host each step would wait for the device
    all_rows, all_act = torch.arange(n), torch.ones(n, dtype=torch.bool)
    all_rows_d, all_act_d = all_rows.to(dev), all_act.to(dev)

    if corrector is not None and corrector.at_start:
        nxt = controller.next_time(accepted) if not adaptive else None
        x = corrector(ctx, x, t.to(dt), None, accepted, nxt.to(dt) if nxt is not None else None)
        stepper.reset(state, torch.arange(n))

    bar = None
    if ctx.progress:
        from tqdm.auto import tqdm

        # the share of the way from start to end (of the coordinate, averaged over samples) in
        # percent: an attempt count or a rate in "it/s" would mislead for adaptive solvers
        bar = tqdm(
            total=100, desc=desc, leave=False, bar_format="{desc}: {n_fmt}/{total_fmt} % |{bar}| {elapsed}<{remaining}"
        )
    shown = 0
    it = 0
    try:
        while True:
            if max_nfe is not None:
                used = (ctx.score.nfe_per_sample - nfe0).to(status.device)
                over = (status == Status.RUNNING) & (used + cost > max_nfe)
                status[over] = int(Status.BUDGET)
            if adaptive and max_nonfinite is not None:
                stuck = (status == Status.RUNNING) & (nonfinite_run >= max_nonfinite)
                status[stuck] = int(Status.NONFINITE)
            running = status == Status.RUNNING
            if controller.min_step or (adaptive and max_nonfinite is not None and bool((nonfinite > 0).any())):
                run_d = running.to(dev)
                if not controller.min_step:  # only the rows that met a NaN/Inf: they may be creeping
                    run_d = run_d & (nonfinite > 0).to(dev)
                cc = c
                spacing = torch.nextafter(cc, cc + 1.0) - cc
                tiny = run_d & (h < 10 * spacing)
                if bool(tiny.any()):
                    tiny = tiny.cpu()  # shrunk to nothing after non-finite errors: the score's fault
                    status[tiny] = int(Status.STEP_TOO_SMALL)
                    status[tiny & (nonfinite > 0)] = int(Status.NONFINITE)
                    running = status == Status.RUNNING
            if not bool(running.any()):
                break
            everyone = bool(running.all())
            if everyone:
                rows, act = all_rows, all_act
            elif compact:
                rows = running.nonzero().squeeze(1)
                act = torch.ones(rows.shape[0], dtype=torch.bool)
            else:
                rows, act = torch.arange(n), running
            full = rows.shape[0] == n  # rows are 0..n-1 in order: no gather needed
            charge = rows[act]
            rows_d, act_d = (all_rows_d, all_act_d) if everyone else (rows.to(dev), act.to(dev))
            if full:
                xs, ts, cs, hs0 = x, t, c, h
            else:
                xs, ts, cs, hs0 = x[rows_d], t[rows_d], c[rows_d], h[rows_d]
            rem = c_end - cs
            if adaptive:
                hs = torch.where(act_d, torch.minimum(hs0.clamp_max(controller.h_max), rem), torch.zeros_like(cs))
                if controller.stretch > 0:  # no sliver of a last step (not right after a rejection)
                    near = (hs * (1.0 + controller.stretch) >= rem) & (rem <= controller.h_max)
                    hs = torch.where(act_d & near & ~after_reject[rows_d], rem, hs)
                last = act_d & (hs >= rem)
                cn = torch.where(last, torch.full_like(cs, c_end), cs + hs)
                tn = torch.where(last, torch.full_like(ts, t_end), coord.to_t(cn))
                tn = torch.where(act_d, tn, ts)
            else:
                hs = torch.ones_like(cs)
                cn = cs + hs
                last = cn >= c_end
                tn = coord.to_t(cn)
            counter = attempts[rows]
            index = accepted[rows]
            score_rows = None if (full and everyone) else charge
            ids = None if full else rows  # the samples of xs's rows: their conditioning follows them
            ts_d = ts.to(dt)

            def score(xx: Tensor, tt: Tensor, _r=score_rows, _ids=ids) -> Tensor:
                return ctx.score(xx, tt, rows=_r, check_finite=check_finite, ids=_ids)

            def data_prediction(xx: Tensor, tt: Tensor, _r=score_rows, _ids=ids) -> Tensor:
                return ctx.score.data_prediction(xx, tt, rows=_r, check_finite=check_finite, ids=_ids)

            def score0(_rows=rows_d, _act=act_d, _r=score_rows, _xs=xs, _ts=ts_d, _ids=ids) -> Tensor:
                if s_cache is None:
                    return ctx.score(_xs, _ts, rows=_r, check_finite=check_finite, ids=_ids)
                valid = s_valid[_rows] & _act
                need = ~valid
                out = s_cache[_rows].clone()
                if bool(need.any()):
                    out[need] = ctx.score(
                        _xs[need], _ts[need], rows=_rows[_act & need].cpu(), check_finite=False, ids=_rows[need].cpu()
                    )
                reused[_rows[valid].cpu()] += 1
                s_cache[_rows] = out
                s_valid[_rows] = _act & torch.isfinite(out.reshape(out.shape[0], -1)).all(dim=1)
                return out

            def increments(points: list[Tensor], _rows=rows, _counter=counter, _cs=cs) -> list[Tensor]:
                if path is None:
                    raise ValueError(f"{type(stepper).__name__} needs a Brownian path: run it adaptively")
                return path.increments(points, _rows, _counter, _cs)

            noise_rows = None if full else rows
            noise_counter = counter if adaptive else index

            def normal(like: Tensor, stream: int, _r=noise_rows, _k=noise_counter) -> Tensor:
                return ctx.noise.normal(like.shape[1:], stream, _k, _r, dtype=like.dtype, device=like.device)

            step = Step(
                t=ts_d,
                t_next=tn.to(dt),
                t64=ts,
                t_next64=tn,
                c=cs,
                c_next=cn,
                h=hs,
                index=index,
                attempt=counter,
                final=last if not ctx.denoise_is_final_move else torch.zeros_like(last),
                moves=moves,
                rows=None if full else rows,
                score=score,
                score0=score0,
                brownian=increments,
                normal_fn=normal,
                state=state,
                data_prediction=data_prediction if has_dp else None,
            )
            if pending_first:
                pending_first = False
                if step.data_prediction is None:
                    raise _no_data_prediction(ctx.t_start)
                x0 = step.data_prediction(xs, step.t)
                eta = stepper.singular_eta()
                z = step.normal(xs, Stream.FIRST_MOVE) if eta > 0.0 else None
                res = StepResult(x=first_move(ctx.sde, xs, x0, step.t, step.t_next, eta, z), x0_hat=x0)
            else:
                res = stepper.step(xs, step)

            if adaptive:
                prev = None if x_prev is None else (x_prev if full else x_prev[rows_d])
                err = controller.error(xs, res, prev)
                finite = torch.isfinite(err)
                if res.valid is not None:
                    finite = finite & res.valid
                ok = act_d & finite & controller.accepts(err)
            else:
                err = torch.zeros(rows.shape[0], dtype=f64, device=dev)
                finite = torch.ones(rows.shape[0], dtype=torch.bool, device=dev)
                ok = act_d
            if path is not None:
                path.advance(rows, ok, cn)
            merged = {}  # every new value first: a result may alias the state it replaces
            for name, new in res.state.items():
                old = state[name] if full else state[name][rows_d]
                merged[name] = torch.where(broadcast_to_rows(ok, old), new.to(old.dtype), old)
            for name, value in merged.items():
                state[name][rows_d] = value

            okx = broadcast_to_rows(ok, xs)
            if full:
                x = torch.where(okx, res.x, xs)
            else:
                x[rows_d] = torch.where(okx, res.x, xs)
            if adaptive:
                s_valid[rows_d] = s_valid[rows_d] & ~ok  # a moved state needs a new evaluation
                x_prev[rows_d] = torch.where(okx, res.x_ref, x_prev[rows_d])
            t_new = torch.where(ok, tn, ts)
            c_new = torch.where(ok, cn, cs)
            rem_new = torch.clamp_min(c_end - c_new, 0.0)
            done = ok & (last | (rem_new <= stop_tol)) if stop_tol is not None else ok & last
            t_new = torch.where(done, torch.full_like(t_new, t_end), t_new)
            c_new = torch.where(done, torch.full_like(c_new, c_end), c_new)
            if adaptive:
                fac = controller.factor(
                    err,
                    ok,
                    finite,
                    hs,
                    err_prev[rows_d],
                    after_reject[rows_d],
                    last_err[rows_d],
                    last_h[rows_d],
                    (accepted[rows] == 0).to(dev),
                )
                if controller.pi_beta > 0:
                    err_prev[rows_d] = torch.where(ok, err.clamp_min(1e-4), err_prev[rows_d])
                after_reject[rows_d] = torch.where(act_d, ~ok, after_reject[rows_d])
                last_err[rows_d] = torch.where(ok, torch.zeros_like(err), err)
                last_h[rows_d] = hs
                h[rows_d] = torch.where(act_d, hs * fac, hs0)
            t[rows_d] = torch.where(act_d, t_new, ts)
            c[rows_d] = torch.where(act_d, c_new, cs)

            act_c = act
            if adaptive:
                ok_c, done_c = ok.cpu(), done.cpu()
                bad_c = act_c & ~finite.cpu()
            else:  # known on the host without waiting for the device: a fixed grid accepts every active
                # row (its error is zero, so finite) and a row is done after its last move
                ok_c, done_c = act_c, act_c & (index + 1 >= moves)
                bad_c = torch.zeros_like(act_c)
            attempts[rows[act_c]] += 1
            accepted[rows[ok_c]] += 1
            rejected[rows[act_c & ~ok_c]] += 1
            nonfinite[rows[bad_c]] += 1
            if adaptive:
                # a run of non-finite attempts ends only with a finite attempt at a step within a
                # factor 100 of the one that first failed: a sample creeping up to a NaN region
                # with ever smaller accepted steps stays in its run
                h_c = hs.detach().to("cpu", f64)
                fresh = bad_c & (nonfinite_run[rows] == 0)
                run_h0[rows[fresh]] = h_c[fresh]
                recovered = act_c & ~bad_c & (h_c >= 0.01 * run_h0[rows])
                nonfinite_run[rows[recovered]] = 0
                nonfinite_run[rows[bad_c]] += 1
            status[rows[done_c]] = int(Status.DONE)

            if bar is not None:
                frac = float(((c - c0) / span_c.clamp_min(1e-300)).clamp(0.0, 1.0).mean())
                now = int(100 * frac)
                bar.update(now - shown)
                shown = now
            if ctx.callback is not None:
                full_ok = torch.zeros(n, dtype=torch.bool, device=dev)
                full_ok[rows_d] = ok
                h_used = torch.zeros(n, dtype=f64, device=dev)
                if adaptive:
                    h_used[rows_d] = hs
                    h_info = h_used.to(dt)
                else:
                    h_info = (ts - tn).to(dt) if full else None
                x0_hat = None
                if res.x0_hat is not None and full:
                    x0_hat = res.x0_hat
                info = StepInfo(
                    step=it,
                    t=t.to(dt),
                    h=h_info,
                    x=x,
                    nfe=ctx.score.nfe,
                    accepted=full_ok if adaptive else None,
                    x0_hat=x0_hat,
                )
                it += 1
                if not ctx.report(info):
                    status[status == Status.RUNNING] = int(Status.STOPPED)
                    break
            else:
                it += 1
            if corrector is not None:
                sel = rows[ok_c] if corrector.at_end else rows[ok_c & ~done_c]
                keys = accepted if corrector.key == "point" else attempts - 1
                if sel.numel():  # only the points the corrector's placement names (every c-th, below σ)
                    sel = sel[corrector.selects(ctx.sde.marginal_std(t[sel.to(dev)]), keys[sel])]
                if sel.numel():
                    sd, every = sel.to(dev), sel.shape[0] == n
                    nxt = controller.next_time(accepted[sel]) if not adaptive else None
                    x_new = corrector(
                        ctx,
                        x if every else x[sd],
                        t[sd].to(dt),
                        None if every else sel,
                        keys[sel],
                        nxt.to(dt) if nxt is not None else None,
                    )
                    if every:
                        x = x_new
                    else:
                        x[sd] = x_new
                    stepper.reset(state, sel)
    finally:
        if bar is not None:
            bar.close()

    used = ctx.score.nfe_per_sample - nfe0
    ctx.stats.update(
        iterations=it,
        accepted=accepted,
        rejected=rejected,
        nonfinite_rejections=nonfinite,
        status=[Status(int(s)).label for s in status],
        t_final=t.cpu(),
        nfe_solver_per_sample=used.clone(),
    )
    ctx.stats["reused_evaluations"] = reused
    if adaptive and controller.h_init is None:
        ctx.stats["h_initial"] = h_initial.cpu()
    unfinished = (status != Status.DONE) & (status != Status.STOPPED)
    if bool(unfinished.any()) and on_budget == "raise":
        raise _unfinished_error(status, t, n, t_end, max_nfe, budget_hint)
    return x


def _unfinished_error(status: Tensor, t: Tensor, n: int, t_end: float, max_nfe: int | None, hint: str) -> Exception:
    """One message naming how many samples did not finish, why, and where they stopped."""
    bad = (status != Status.DONE) & (status != Status.STOPPED)
    where = t[bad.to(t.device)]
    k_budget = int((status == Status.BUDGET).sum())
    head = f"{int(bad.sum())} of {n} samples did not reach t_end = {t_end:g}"
    if k_budget:
        head += f" within max_nfe = {max_nfe} score evaluations per sample"
    broken = (status == Status.NONFINITE) | (status == Status.NONFINITE_START)
    if bool(broken.any()):
        k = int(broken.sum())
        times = sorted({round(float(v), 6) for v in t[broken.to(t.device)].tolist()})
        shown = ", ".join(f"{v:.6g}" for v in times[:5]) + (", ..." if len(times) > 5 else "")
        msg = (
            f"the score returned NaN or Inf: {k} of {n} samples stopped at t = [{shown}] (non-finite at "
            f"the start, or in {MAX_NONFINITE} attempts in a row with ever smaller steps: a larger max_nfe or "
            "a looser tolerance would not help); check the score near these times"
        )
        if k_budget:
            msg += f"; {k_budget} more did not finish within max_nfe = {max_nfe}"
        return NonFiniteSolveError(msg)
    others = [
        f"{int((status == st).sum())} {st.label.replace('_', ' ')}"
        for st in (Status.STEP_TOO_SMALL,)
        if bool((status == st).any())
    ]
    if others:
        head += f" ({', '.join(others)})"
    msg = (
        f"{head}; they stopped at t in [{float(where.min()):.6g}, {float(where.max()):.6g}]. {hint}, "
        "or pass on_budget='partial' to get partial results"
    )
    return BudgetError(msg) if k_budget else IntegrationError(msg)

"""The adaptive loop: per-sample step sizes under an error controller, run by
:func:`~fastsde.solvers.core.driver.integrate`.

Each iteration is one batched attempt in named phases: :meth:`AdaptiveSolve.select` (which samples
still run, on the host), :meth:`AdaptiveSolve.attempt` (their step sizes, the :class:`Step` and the
stepper's proposal), :meth:`AdaptiveSolve.judge` (error, acceptance), :meth:`AdaptiveSolve.commit`
(state, time, the controller's next step and memory, all on the device), :meth:`AdaptiveSolve.tally`
(the one read of the device per attempt: acceptance, completion, finiteness, the step used and
whether the next step is below the floating-point spacing, copied to the host together), then the
callback and the corrector. Per-sample memory of the controller lives in its
:class:`~fastsde.solvers.core.controllers.ControllerState`.

Reads beyond that one: a Brownian tree or memory path reads its own per query (``brownian="fresh"``,
GGF's, reads none), ``reuse_rejected`` one to find the rows it must evaluate, a progress bar none
extra (its share rides on the same copy), and a stepper's own (documented with the stepper).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...brownian import make_path
from ...sde import broadcast_to_rows, per_row
from .context import StepInfo, progress_bar
from .controllers import Adaptive, Coordinate
from .status import MAX_NONFINITE, Status, unfinished_error
from .stepper import Step, Stepper, StepResult

__all__ = ["AdaptiveSolve", "AdaptiveSettings"]


@dataclass
class AdaptiveSettings:
    """The driver's settings of an adaptive solve (the keywords of ``integrate``)."""

    coordinate: Coordinate
    brownian: str = "fresh"
    corrector: Any = None
    compact: bool = True
    max_nfe: int | None = None
    on_budget: str = "raise"
    reuse_rejected: bool = False
    desc: str = ""
    budget_hint: str = "raise max_nfe, loosen the tolerances"
    max_nonfinite: int | None = MAX_NONFINITE


@dataclass
class _Rows:
    """The samples of one attempt: ``rows`` (host), ``act`` (host mask of the ones that move), their
    device copies, and whether they are the whole batch in order."""

    rows: Tensor
    act: Tensor
    rows_d: Tensor
    act_d: Tensor
    full: bool
    everyone: bool

    def take(self, v: Tensor) -> Tensor:
        return v if self.full else v[self.rows_d]


class AdaptiveSolve:
    """One adaptive solve of x from the coordinate's start to its end (see the module docstring)."""

    def __init__(
        self, ctx, x: Tensor, stepper: Stepper, controller: Adaptive, settings: AdaptiveSettings, nfe0: Tensor | None
    ) -> None:
        self.ctx, self.stepper, self.controller, self.settings = ctx, stepper, controller, settings
        n, dev, f64 = x.shape[0], x.device, torch.float64
        coord = settings.coordinate
        self.n, self.dev, self.coord = n, dev, coord
        self.c_end, self.t_end = coord.c_end, float(coord.t_end)
        self.x, self.x_prev = x.clone(), x.clone()
        self.t = per_row(coord.t_start, n, f64, dev)
        self.c = per_row(coord.c_start, n, f64, dev)
        self.c0 = self.c.clone()
        self.status = torch.full((n,), int(Status.RUNNING), dtype=torch.int64)
        zeros = lambda: torch.zeros(n, dtype=torch.int64)  # noqa: E731
        self.attempts, self.accepted, self.rejected, self.nonfinite = zeros(), zeros(), zeros(), zeros()
        self.nonfinite_run, self.reused = zeros(), zeros()  # non-finite attempts in the current run
        self.run_h0 = torch.zeros(n, dtype=f64)  # the step of the run's first non-finite attempt
        self.tiny = torch.zeros(n, dtype=torch.bool)  # the step fell below 10 spacings of c (host copy)
        self.nfe0 = ctx.score.nfe_per_sample.clone() if nfe0 is None else nfe0
        self.memory = controller.init_state(n, dev)
        self.cost = stepper.nfe_per_step + (settings.corrector.nfe if settings.corrector is not None else 0)
        self.path = make_path(settings.brownian, ctx.noise, x, coord.c_start, self.c_end, coord.variance)
        self.s_cache = torch.zeros_like(x) if settings.reuse_rejected else None
        self.s_valid = torch.zeros(n, dtype=torch.bool, device=dev)
        self.has_dp = bool(getattr(ctx.score, "has_data_prediction", False))
        self.all_rows, self.all_act = torch.arange(n), torch.ones(n, dtype=torch.bool)
        self.all_rows_d, self.all_act_d = self.all_rows.to(dev), self.all_act.to(dev)
        self.iterations, self.progress = 0, 0.0

    # -- phases ------------------------------------------------------------------------------

    def start(self) -> None:
        """The stepper's state, the first step sizes and the corrector at the start."""
        ctx, n, dev, controller = self.ctx, self.n, self.dev, self.controller
        self.state, bad_start = self.stepper.init(self.x)
        if bad_start is not None and bool(bad_start.any()):
            self.status[bad_start.cpu()] = int(Status.NONFINITE_START)
        if controller.h_init is None:
            rows0 = (self.status == Status.RUNNING).nonzero().squeeze(1)
            self.h = torch.zeros(n, dtype=torch.float64, device=dev)
            if rows0.numel():
                span = self.c_end - self.c0[rows0.to(dev)]
                self.h[rows0.to(dev)] = self.stepper.initial_step(
                    self.x, self.state, rows0, span, controller.rtol, controller.atol
                )
        else:
            self.h = torch.full((n,), float(controller.h_init), dtype=torch.float64, device=dev)
        self.h_initial = self.h.clone()
        self.tiny = self._below_spacing(self.h, self.c).cpu()
        corrector = self.settings.corrector
        if corrector is not None and corrector.at_start:
            self.x = corrector(ctx, self.x, self.t.to(self.x.dtype), None, self.accepted, None)
            self.stepper.reset(self.state, torch.arange(n))

    def select(self) -> _Rows | None:
        """The samples that attempt a step now (host bookkeeping only); None when none runs."""
        status, settings = self.status, self.settings
        if settings.max_nfe is not None:
            used = self.ctx.score.nfe_per_sample - self.nfe0
            status[(status == Status.RUNNING) & (used + self.cost > settings.max_nfe)] = int(Status.BUDGET)
        if settings.max_nonfinite is not None:
            status[(status == Status.RUNNING) & (self.nonfinite_run >= settings.max_nonfinite)] = int(Status.NONFINITE)
        watch = self.controller.min_step or (settings.max_nonfinite is not None)
        if watch:  # a step below the coordinate's spacing: only rows that met a NaN/Inf, unless min_step
            tiny = self.tiny & (status == Status.RUNNING)
            if not self.controller.min_step:
                tiny = tiny & (self.nonfinite > 0)
            status[tiny] = int(Status.STEP_TOO_SMALL)
            status[tiny & (self.nonfinite > 0)] = int(Status.NONFINITE)
        running = status == Status.RUNNING
        if not bool(running.any()):
            return None
        if bool(running.all()):
            return _Rows(self.all_rows, self.all_act, self.all_rows_d, self.all_act_d, True, True)
        if settings.compact:
            rows = running.nonzero().squeeze(1)
            act = torch.ones(rows.shape[0], dtype=torch.bool)
        else:
            rows, act = torch.arange(self.n), running
        return _Rows(rows, act, rows.to(self.dev), act.to(self.dev), rows.shape[0] == self.n, False)

    def attempt(self, sel: _Rows) -> tuple[Step, StepResult]:
        """The rows' step sizes (clipped to the end, stretched over a sliver) and the stepper's proposal."""
        controller, coord, c_end = self.controller, self.coord, self.c_end
        xs, ts, cs, hs0 = sel.take(self.x), sel.take(self.t), sel.take(self.c), sel.take(self.h)
        rem = c_end - cs
        act_d = sel.act_d
        hs = torch.where(act_d, torch.minimum(hs0.clamp_max(controller.h_max), rem), torch.zeros_like(cs))
        if controller.stretch > 0:  # no sliver of a last step (not right after a rejection)
            near = (hs * (1.0 + controller.stretch) >= rem) & (rem <= controller.h_max)
            hs = torch.where(act_d & near & ~sel.take(self.memory.after_reject), rem, hs)
        last = act_d & (hs >= rem)
        cn = torch.where(last, torch.full_like(cs, c_end), cs + hs)
        tn = torch.where(last, torch.full_like(ts, self.t_end), coord.to_t(cn))
        tn = torch.where(act_d, tn, ts)
        self.xs, self.ts, self.cs, self.hs0, self.hs, self.cn, self.tn, self.last = xs, ts, cs, hs0, hs, cn, tn, last
        step = self._step(sel, xs, ts, cs, cn, tn, hs, last)
        return step, self.stepper.step(xs, step)

    def judge(self, sel: _Rows, res: StepResult) -> tuple[Tensor, Tensor, Tensor]:
        """(error, finite, ok) of the proposal per row, on the device."""
        prev = sel.take(self.x_prev)
        err = self.controller.error(self.xs, res, prev)
        finite = torch.isfinite(err)
        if res.valid is not None:
            finite = finite & res.valid
        ok = sel.act_d & finite & self.controller.accepts(err)
        return err, finite, ok

    def commit(self, sel: _Rows, res: StepResult, err: Tensor, finite: Tensor, ok: Tensor) -> Tensor:
        """Keep accepted proposals (state, x, time) and set the next step sizes; returns ``done``."""
        rows_d, act_d, full = sel.rows_d, sel.act_d, sel.full
        self.path.advance(sel.rows, ok, self.cn)
        merged = {}  # every new value first: a result may alias the state it replaces
        for name, new in res.state.items():
            old = sel.take(self.state[name])
            merged[name] = torch.where(broadcast_to_rows(ok, old), new.to(old.dtype), old)
        for name, value in merged.items():
            self.state[name][rows_d] = value
        okx = broadcast_to_rows(ok, self.xs)
        if full:
            self.x = torch.where(okx, res.x, self.xs)
        else:
            self.x[rows_d] = torch.where(okx, res.x, self.xs)
        self.s_valid[rows_d] = self.s_valid[rows_d] & ~ok  # a moved state needs a new evaluation
        self.x_prev[rows_d] = torch.where(okx, res.x_ref, self.x_prev[rows_d])
        ts, cs, stop_tol = self.ts, self.cs, self.controller.stop_tol
        t_new = torch.where(ok, self.tn, ts)
        c_new = torch.where(ok, self.cn, cs)
        rem_new = torch.clamp_min(self.c_end - c_new, 0.0)
        done = ok & (self.last | (rem_new <= stop_tol)) if stop_tol is not None else ok & self.last
        t_new = torch.where(done, torch.full_like(t_new, self.t_end), t_new)
        c_new = torch.where(done, torch.full_like(c_new, self.c_end), c_new)
        idx = None if full else rows_d
        before_first = (self.accepted[sel.rows] == 0).to(self.dev)
        fac, memory = self.controller.adapt(self.memory.rows(idx), err, ok, finite, self.hs, act_d, before_first)
        self.memory = self.memory.put(idx, memory)
        self.h[rows_d] = torch.where(act_d, self.hs * fac, self.hs0)
        self.t[rows_d] = torch.where(act_d, t_new, ts)
        self.c[rows_d] = torch.where(act_d, c_new, cs)
        return done

    def tally(self, sel: _Rows, ok: Tensor, done: Tensor, finite: Tensor) -> tuple[Tensor, Tensor]:
        """The attempt's counts and statuses on the host, from one copy of the device's flags (acceptance,
        completion, finiteness, the step used, and whether each row's next step is below 10 spacings of
        its coordinate); returns (ok, done) on the host."""
        rows, act = sel.rows, sel.act
        parts = [ok, done, finite, self.hs, self._below_spacing(self.h, self.c)[sel.rows_d]]
        if self.ctx.progress:
            share = ((self.c - self.c0) / (self.c_end - self.c0).clamp_min(1e-300)).clamp(0.0, 1.0).mean()
            parts.append(share.expand(ok.shape[0]))
        flags = torch.stack([v.to(torch.float64) for v in parts]).cpu()  # the one read per attempt
        ok_c, done_c, finite_c, h_c = flags[0] > 0, flags[1] > 0, flags[2] > 0, flags[3]
        self.tiny[rows] = flags[4] > 0
        if self.ctx.progress:
            self.progress = float(flags[5, 0]) if flags.shape[1] else self.progress
        bad_c = act & ~finite_c
        self.attempts[rows[act]] += 1
        self.accepted[rows[ok_c]] += 1
        self.rejected[rows[act & ~ok_c]] += 1
        self.nonfinite[rows[bad_c]] += 1
        # a run of non-finite attempts ends only with a finite attempt at a step within a factor 100 of the
        # one that first failed: a sample creeping up to a NaN region with ever smaller steps stays in its run
        fresh = bad_c & (self.nonfinite_run[rows] == 0)
        self.run_h0[rows[fresh]] = h_c[fresh]
        recovered = act & ~bad_c & (h_c >= 0.01 * self.run_h0[rows])
        self.nonfinite_run[rows[recovered]] = 0
        self.nonfinite_run[rows[bad_c]] += 1
        self.status[rows[done_c]] = int(Status.DONE)
        return ok_c, done_c

    def report(self, sel: _Rows, ok: Tensor, res: StepResult) -> bool:
        """Hand the callback this attempt; False when it asked to stop."""
        ctx, n, dev, dt = self.ctx, self.n, self.dev, self.x.dtype
        full_ok = torch.zeros(n, dtype=torch.bool, device=dev)
        full_ok[sel.rows_d] = ok
        h_used = torch.zeros(n, dtype=torch.float64, device=dev)
        h_used[sel.rows_d] = self.hs
        info = StepInfo(
            step=self.iterations - 1,
            t=self.t.to(dt),
            h=h_used.to(dt),
            x=self.x,
            nfe=ctx.score.nfe,
            accepted=full_ok,
            x0_hat=res.x0_hat if sel.full else None,
        )
        if ctx.report(info):
            return True
        self.status[self.status == Status.RUNNING] = int(Status.STOPPED)
        return False

    def correct(self, sel: _Rows, ok_c: Tensor, done_c: Tensor) -> None:
        """The corrector on the rows just accepted (and at the points its placement names)."""
        corrector, ctx, dev, dt = self.settings.corrector, self.ctx, self.dev, self.x.dtype
        rows = sel.rows
        picked = rows[ok_c] if corrector.at_end else rows[ok_c & ~done_c]
        keys = self.accepted if corrector.key == "point" else self.attempts - 1
        if picked.numel():  # only the points the corrector's placement names (every c-th, below σ)
            picked = picked[corrector.selects(ctx.sde.marginal_std(self.t[picked.to(dev)]), keys[picked])]
        if not picked.numel():
            return
        pd, every = picked.to(dev), picked.shape[0] == self.n
        x_new = corrector(
            ctx, self.x if every else self.x[pd], self.t[pd].to(dt), None if every else picked, keys[picked], None
        )
        if every:
            self.x = x_new
        else:
            self.x[pd] = x_new
        self.stepper.reset(self.state, picked)

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> Tensor:
        """Attempt steps until every sample is done, stopped or out of budget; returns x at the end."""
        self.start()
        bar = progress_bar(self.settings.desc) if self.ctx.progress else None
        try:
            while (sel := self.select()) is not None:
                _, res = self.attempt(sel)
                err, finite, ok = self.judge(sel, res)
                done = self.commit(sel, res, err, finite, ok)
                ok_c, done_c = self.tally(sel, ok, done, finite)
                self.iterations += 1
                if bar is not None:
                    bar.update(int(100 * self.progress) - bar.n)
                if self.ctx.callback is not None and not self.report(sel, ok, res):
                    break
                if self.settings.corrector is not None:
                    self.correct(sel, ok_c, done_c)
        finally:
            if bar is not None:
                bar.close()
        return self.finish()

    def finish(self) -> Tensor:
        """The statistics (one schema for every solver) and the error of unfinished samples."""
        ctx, settings = self.ctx, self.settings
        ctx.stats.update(
            iterations=self.iterations,
            accepted=self.accepted,
            rejected=self.rejected,
            nonfinite_rejections=self.nonfinite,
            status=[Status(int(s)).label for s in self.status],
            t_final=self.t.cpu(),
            nfe_solver_per_sample=(ctx.score.nfe_per_sample - self.nfe0).clone(),
            reused_evaluations=self.reused,
        )
        if self.controller.h_init is None:
            ctx.stats["h_initial"] = self.h_initial.cpu()
        unfinished = (self.status != Status.DONE) & (self.status != Status.STOPPED)
        if bool(unfinished.any()) and settings.on_budget == "raise":
            raise unfinished_error(self.status, self.t, self.n, self.t_end, settings.max_nfe, settings.budget_hint)
        return self.x

    # -- helpers -------------------------------------------------------------------------------

    def _below_spacing(self, h: Tensor, c: Tensor) -> Tensor:
        """Rows whose step is below ten floating-point spacings of their coordinate."""
        return h < 10 * (torch.nextafter(c, c + 1.0) - c)

    def _step(self, sel: _Rows, xs, ts, cs, cn, tn, hs, last) -> Step:
        """The Step of this attempt: times, the rows' score, noise and Brownian increments."""
        ctx, dt = self.ctx, xs.dtype
        rows, full = sel.rows, sel.full
        counter, index = self.attempts[rows], self.accepted[rows]
        score_rows = None if (full and sel.everyone) else rows[sel.act]
        ids = None if full else rows  # the samples of xs's rows: their conditioning follows them
        ts_d = ts.to(dt)
        score = _RowScore(ctx.score, score_rows, ids)
        return Step(
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
            moves=None,
            rows=None if full else rows,
            score=score,
            score0=lambda: self._score0(sel, score, xs, ts_d, score_rows, ids),
            brownian=lambda points: self.path.increments(points, rows, counter, cs),
            normal_fn=lambda like, stream: ctx.noise.normal(
                like.shape[1:], stream, counter, None if full else rows, dtype=like.dtype, device=like.device
            ),
            state=self.state,
            data_prediction=score.data_prediction if self.has_dp else None,
        )

    def _score0(self, sel: _Rows, score: _RowScore, xs: Tensor, ts: Tensor, score_rows, ids) -> Tensor:
        """The score at the rows' current (x, t), reused after a rejection with ``reuse_rejected``."""
        if self.s_cache is None:
            return score(xs, ts)
        rows_d, act_d = sel.rows_d, sel.act_d
        valid = self.s_valid[rows_d] & act_d
        need = ~valid
        out = self.s_cache[rows_d].clone()
        if bool(need.any()):
            out[need] = self.ctx.score(
                xs[need], ts[need], rows=rows_d[act_d & need].cpu(), check_finite=False, ids=rows_d[need].cpu()
            )
        self.reused[rows_d[valid].cpu()] += 1
        self.s_cache[rows_d] = out
        self.s_valid[rows_d] = act_d & torch.isfinite(out.reshape(out.shape[0], -1)).all(dim=1)
        return out


class _RowScore:
    """The counted score (and data prediction) of an attempt's rows, unchecked: the error estimate's
    finiteness is the adaptive loop's check."""

    def __init__(self, counter, rows: Tensor | None, ids: Tensor | None) -> None:
        self.counter, self.rows, self.ids = counter, rows, ids

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return self.counter(x, t, rows=self.rows, check_finite=False, ids=self.ids)

    def data_prediction(self, x: Tensor, t: Tensor) -> Tensor:
        return self.counter.data_prediction(x, t, rows=self.rows, check_finite=False, ids=self.ids)

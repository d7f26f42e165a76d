"""Gotta Go Fast (Jolicoeur-Martineau et al. 2021): adaptive-step SDE solver with per-sample steps.

Spec: ``shared/algorithms/gotta_go_fast.md``. One iteration per active sample (state x, time t,
step h), with one z ~ N(0, I) shared by both stages:

- stage 1 (1 NFE): K₁ = −h·b(x, t) + g(t)·√h·z, EM proposal x′ = x + K₁;
- stage 2 (1 NFE): K₂ = −h·b(x′, t − h) + g(t − h)·√h·z, stochastic-Heun proposal x″ = x + ½(K₁ + K₂);
- error E = ‖(x″ − x′)/δ‖ with δ = max(ε_abs, ε_rel·max(|x′|, |x′_prev|)) (scaled L2 by default);
- accept iff E ≤ 1 (x ← x″, x′_prev ← x′); then h ← min(t − t_end, θ·h·E^(−r)) for every sample.

A non-finite E is a rejection with h ← h/10 (not in the paper). The last step lands exactly on
t_end. b = f − g²·s is the forward-time drift of the reverse SDE.

The per-sample controller (:func:`run_adaptive`) is shared with the exponential-integrator pair in
``adaptive_exp``; it works on a coordinate c that increases from c_start to c_end (here c = −t)
and a ``pair`` function that returns the low- and high-order proposals of one attempted step.

fastsde additions: finished samples leave the batch (``compact``); a per-sample NFE budget
(``max_nfe``) that raises :class:`AdaptiveBudgetError` naming how many samples did not finish, or
returns partial results with a per-sample status (``on_budget="partial"``); per-sample accepted /
rejected counts in ``ctx.stats``; an optional Langevin corrector after accepted steps;
``brownian="tree"`` or ``"memory"`` (a retried step sees the same Brownian path: a per-sample
:class:`BrownianTree`, a function of the seed only, or :class:`BrownianMemory`, revealed lazily at one
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..noise import Stream
from ..sde import EDM, SDE, broadcast_to_rows
from .base import (
    Option,
    SolverContext,
    SolverSpec,
    StepInfo,
    boolean,
    nonnegative_float,
    one_of,
    positive_float,
    positive_int,
    progress_bar,
    unit_interval,
)

__all__ = [
    "ADAPTIVE",
    "AdaptiveBudgetError",
    "Attempt",
    "BrownianMemory",
    "BrownianTree",
    "adaptive",
    "adaptive_options",
    "run_adaptive",
]

#: Per-sample status codes recorded in ctx.stats["status"].
STATUS = ("running", "done", "budget", "stopped")
_TREE_STREAM = Stream.USER + 1
_RUNNING, _DONE, _BUDGET, _STOPPED = range(4)


class AdaptiveBudgetError(RuntimeError):
    """Some samples did not reach t_end within the per-sample NFE budget ``max_nfe``."""


@dataclass
class Attempt:
    """One attempted step for the rows of a sub-batch, as seen by a ``pair`` function.

    ``t``/``t_next`` are per-row times in x's dtype (t_next is t_end exactly on a final step),
    ``c``/``c_next`` the controller coordinates (float64). ``score(x, t)`` evaluates and charges
    the active samples. ``brownian(points)`` returns W(p) − W(c) for increasing coordinates
    p ≥ c (float64 per-row tensors), where W is the solver's Brownian process in c (a Gaussian
    process with independent increments and variance function v(c)); see :class:`BrownianTree`.
    """

    t: Tensor
    t_next: Tensor
    c: Tensor
    c_next: Tensor
    score: Callable[[Tensor, Tensor], Tensor]
    brownian: Callable[[list[Tensor]], list[Tensor]]
    #: score at (x, t), the first evaluation of every pair (reused after a rejection if enabled)
    score0: Callable[[], Tensor]
    #: the sample index of every row (CPU int64), for pairs that keep per-sample history
    rows: Tensor | None = None


class BrownianTree:
    """A per-sample Brownian path on [c0, c1], fixed by the sample's seed, queried at any point.

    W has independent Gaussian increments with Var(W(b) − W(a)) = v(b) − v(a) for an increasing
    variance function v (v(c) = c: Brownian motion; v(λ) = e^{2λ}: the time-changed noise of the
    exponential integrators). W(c0) = 0, W(c1) is drawn at the root, and W at the midpoint of
    every dyadic interval is drawn from the Brownian bridge with keyed noise whose counter is the
    node's heap index, so W(p) is a pure function of (seed, p): a rejected step that is retried
    with a smaller h sees the same path (no selection bias from rejecting large noise draws; Rackauckas
    & Nie's "rejection sampling with memory" in effect). ``levels`` bisections leave an interval of
    (c1 − c0)·2^−levels, inside which W is interpolated by the bridge mean.
    """

    def __init__(
        self,
        ctx: SolverContext,
        like: Tensor,
        c0: float,
        c1: float,
        variance: Callable[[Tensor], Tensor],
        levels: int = 32,
    ) -> None:
        self.ctx, self.c0, self.c1, self.v, self.levels = ctx, c0, c1, variance, levels
        self.dtype, self.device, self.shape = like.dtype, like.device, like.shape[1:]

    def _normal(self, counter: Tensor, rows: Tensor) -> Tensor:
        z = self.ctx.noise.normal(self.shape, _TREE_STREAM, counter, rows, dtype=torch.float64, device=self.device)
        return z

    def __call__(self, p: Tensor, rows: Tensor) -> Tensor:
        """W(p) for per-row coordinates p (float64), rows = sample indices; float64 result."""
        m = p.shape[0]
        f64 = torch.float64
        lo = torch.full((m,), self.c0, dtype=f64, device=self.device)
        hi = torch.full((m,), self.c1, dtype=f64, device=self.device)
        v_lo, v_hi = self.v(lo), self.v(hi)
        w_lo = torch.zeros((m, *self.shape), dtype=f64, device=self.device)
        root = torch.zeros(m, dtype=torch.int64)
        w_hi = broadcast_to_rows((v_hi - v_lo).sqrt(), w_lo) * self._normal(root, rows)
        node = torch.ones(m, dtype=torch.int64)
        tiny = torch.finfo(f64).tiny
        for _ in range(self.levels):
            mid = 0.5 * (lo + hi)
            v_mid = self.v(mid)
            span = (v_hi - v_lo).clamp_min(tiny)
            frac = ((v_mid - v_lo) / span).clamp(0.0, 1.0)
            std = ((v_mid - v_lo).clamp_min(0) * (v_hi - v_mid).clamp_min(0) / span).sqrt()
            w_mid = (
                w_lo
                + broadcast_to_rows(frac, w_lo) * (w_hi - w_lo)
                + broadcast_to_rows(std, w_lo) * self._normal(node, rows)
            )
            right = p >= mid
            rd = broadcast_to_rows(right, w_lo)
            lo, v_lo, w_lo = torch.where(right, mid, lo), torch.where(right, v_mid, v_lo), torch.where(rd, w_mid, w_lo)
            hi, v_hi, w_hi = torch.where(right, hi, mid), torch.where(right, v_hi, v_mid), torch.where(rd, w_hi, w_mid)
            node = 2 * node + right.cpu().to(torch.int64)
        frac = ((self.v(p) - v_lo) / (v_hi - v_lo).clamp_min(tiny)).clamp(0.0, 1.0)
        return w_lo + broadcast_to_rows(frac, w_lo) * (w_hi - w_lo)


class BrownianMemory:
    """A per-sample Brownian path revealed lazily: rejection sampling with memory (Rackauckas & Nie 2017).

    Each sample keeps its current point (c, W(c)) and every point of its path already revealed
    beyond c (by attempts that were rejected, or by the earlier queries of the same attempt). A new
    query p is drawn from the exact conditional law given those points, which by the Markov property
    is the Brownian bridge between its nearest revealed neighbours (or a free increment past the last
    one), with variance function v as for :class:`BrownianTree`. So a retried step sees the same
    path as the rejected one (no selection bias), at the cost of one keyed normal draw per query
    instead of one per tree level. Unlike the tree, the path is a function of the seed *and* of the
    sequence of queries, so different tolerances see different paths.
    """

    def __init__(self, ctx: SolverContext, like: Tensor, c0: float, variance: Callable[[Tensor], Tensor]) -> None:
        n, self.shape = like.shape[0], like.shape[1:]
        self.ctx, self.v, self.device = ctx, variance, like.device
        f64 = torch.float64
        self.c = torch.full((n,), float(c0), dtype=f64, device=like.device)
        self.w = torch.zeros((n, *self.shape), dtype=f64, device=like.device)
        self.ahead_c = torch.full((n, 2), math.inf, dtype=f64, device=like.device)  # +inf: empty slot
        self.ahead_w = torch.zeros((n, 2, *self.shape), dtype=f64, device=like.device)
        self.queries = torch.zeros(n, dtype=torch.int64)

    def __call__(self, p: Tensor, rows: Tensor) -> Tensor:
        """W(p) for per-row coordinates p ≥ c (float64), rows = sample indices; the point is remembered."""
        rd = rows.to(self.device)
        m, f64, tiny = rows.shape[0], torch.float64, torch.finfo(torch.float64).tiny
        fc, fw = self.ahead_c[rd], self.ahead_w[rd]
        ar = torch.arange(m, device=self.device)
        below = fc <= p[:, None]
        left = torch.where(below, fc, torch.full_like(fc, -math.inf))
        li = left.argmax(dim=1)
        has_left = torch.isfinite(left[ar, li])
        a = torch.where(has_left, left[ar, li], self.c[rd])
        wa = torch.where(broadcast_to_rows(has_left, self.w[rd]), fw[ar, li], self.w[rd])
        right = torch.where(fc >= p[:, None], fc, torch.full_like(fc, math.inf))  # empty slots are +inf
        ri = right.argmin(dim=1)
        has_right = torch.isfinite(right[ar, ri])
        b = torch.where(has_right, right[ar, ri], p)
        wb = fw[ar, ri]
        va, vp, vb = self.v(a), self.v(p), self.v(b)
        span = (vb - va).clamp_min(tiny)
        frac = torch.where(has_right, ((vp - va) / span).clamp(0.0, 1.0), torch.zeros_like(p))
        var = torch.where(has_right, (vp - va).clamp_min(0) * (vb - vp).clamp_min(0) / span, (vp - va).clamp_min(0))
        z = self.ctx.noise.normal(self.shape, _TREE_STREAM, self.queries[rows], rows, dtype=f64, device=self.device)
        self.queries[rows] += 1
        w = wa + broadcast_to_rows(frac, wa) * (wb - wa) + broadcast_to_rows(var.sqrt(), wa) * z
        self._remember(rd, p, w)
        return w

    def _remember(self, rd: Tensor, p: Tensor, w: Tensor) -> None:
        new = p > self.c[rd]  # queries at the current point (idle rows) add nothing
        if not bool(new.any()):
            return
        fc = self.ahead_c[rd]
        free = torch.isinf(fc)
        if not bool(free[new].any(dim=1).all()):  # some row has no empty slot: widen for everyone
            n, k = self.ahead_c.shape
            self.ahead_c = torch.cat([self.ahead_c, torch.full_like(self.ahead_c, math.inf)], dim=1)
            self.ahead_w = torch.cat([self.ahead_w, torch.zeros_like(self.ahead_w)], dim=1)
            fc = self.ahead_c[rd]
            free = torch.isinf(fc)
        slot = free.to(torch.int64).argmax(dim=1)  # first empty slot
        sel = rd[new]
        self.ahead_c[sel, slot[new]] = p[new]
        self.ahead_w[sel, slot[new]] = w[new]

    def advance(self, rows: Tensor, c_new: Tensor, w_new: Tensor) -> None:
        """Rows moved to c_new with W(c_new) = w_new: forget the revealed points at or before it."""
        rd = rows.to(self.device)
        self.c[rd], self.w[rd] = c_new, w_new
        fc = self.ahead_c[rd]
        self.ahead_c[rd] = torch.where(fc <= c_new[:, None], torch.full_like(fc, math.inf), fc)


#: pair(ctx, x, attempt) -> (low, high): the two proposals of the embedded pair.
PairFn = Callable[[SolverContext, Tensor, Attempt], tuple[Tensor, Tensor]]
#: commit(rows, ok): called after every attempt with the sub-batch's sample indices (CPU) and which of
#: its rows were accepted (on x's device), so that a pair with per-sample history can advance it.
CommitFn = Callable[[Tensor, Tensor], None]


def _growth_check(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 1:
        raise ValueError(f"{name} must be a number > 1 (math.inf for no limit), got {v!r}")


def _use_prev_check(name: str, v: Any) -> None:
    if v is not True and v is not False and v != "x":
        raise ValueError(f"{name} must be True, False or 'x', got {v!r}")


def adaptive_options(
    h_init: float,
    eps_rel: float,
    exponent: float,
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
        "exponent": Option(exponent, positive_float, "controller exponent r in h ← θ·h·E^(−r)"),
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
            one_of("fresh", "tree", "memory"),
            "noise of a retried step: fresh draw (GGF), or the same Brownian path read off a per-sample "
            "tree (a function of the seed only) or revealed lazily with memory (one draw per query)",
        ),
    }


def _error_norm(ratio: Tensor, norm: str) -> Tensor:
    r = ratio.reshape(ratio.shape[0], -1)
    if norm == "linf":
        return r.abs().amax(dim=1)
    sq = (r * r).sum(dim=1)
    return (sq / r.shape[1]).sqrt() if norm == "scaled_l2" else sq.sqrt()


def run_adaptive(
    ctx: SolverContext,
    x: Tensor,
    *,
    pair: PairFn,
    nfe_per_attempt: int,
    c_start: float,
    c_end: float,
    to_t: Callable[[Tensor], Tensor],
    variance: Callable[[Tensor], Tensor],
    stop_tol: float,
    desc: str,
    h_init: float,
    eps_rel: float,
    eps_abs: float,
    safety: float,
    exponent: float,
    norm: str,
    extrapolate: bool,
    use_prev: bool | str,
    compact: bool,
    max_nfe: int,
    on_budget: str,
    corrector_steps: int,
    snr: float,
    brownian: str,
    max_growth: float,
    reuse_rejected: bool,
    pi_beta: float = 0.0,
    h_max: float = math.inf,
    commit: CommitFn | None = None,
) -> Tensor:
    """Per-sample error-controlled stepping of an embedded pair from c_start up to c_end.

    Every sample has its own coordinate c, time t = to_t(c) (t_end exactly at the end), step h,
    previous proposal and attempt counter. ``brownian="fresh"`` draws new noise for every attempt
    (keyed by sample and attempt: GGF's rule); ``"tree"`` reads the increments off a per-sample
    :class:`BrownianTree` and ``"memory"`` off a lazily revealed :class:`BrownianMemory`, so that
    retries after a rejection see the same path. ``h_max`` caps every attempted step; ``commit`` is
    told after each attempt which rows were accepted. ``nfe_per_attempt`` is what the budget check
    charges per attempt. Returns x at t_end; per-sample statistics go to ctx.stats.
    """
    n, dt, dev = x.shape[0], x.dtype, x.device
    f64 = torch.float64
    x = x.clone()
    x_prev = x.clone()
    t = torch.full((n,), float(ctx.t_start), dtype=f64, device=dev)
    c = torch.full((n,), float(c_start), dtype=f64, device=dev)
    h = torch.full((n,), min(float(h_init), c_end - c_start), dtype=f64, device=dev)
    status = torch.full((n,), _RUNNING, dtype=torch.int64)
    attempts = torch.zeros(n, dtype=torch.int64)
    accepted = torch.zeros(n, dtype=torch.int64)
    rejected = torch.zeros(n, dtype=torch.int64)
    nonfinite = torch.zeros(n, dtype=torch.int64)
    reused = torch.zeros(n, dtype=torch.int64)
    s_cache = torch.zeros_like(x) if reuse_rejected else None
    s_valid = torch.zeros(n, dtype=torch.bool, device=dev)
    err_prev = torch.ones(n, dtype=f64, device=dev)  # PI control: the last accepted step's error
    nfe0 = ctx.score.nfe_per_sample.clone()
    cost = nfe_per_attempt + corrector_steps
    span = c_end - c_start
    tree = BrownianTree(ctx, x, c_start, c_end, variance) if brownian == "tree" else None
    w_cur = torch.zeros((n, *x.shape[1:]), dtype=f64, device=dev) if tree is not None else None
    path = BrownianMemory(ctx, x, c_start, variance) if brownian == "memory" else None
    bar = progress_bar(ctx, 1000, desc)
    shown = 0
    it = 0
    try:
        while True:
            used = (ctx.score.nfe_per_sample - nfe0).to(status.device)
            over = (status == _RUNNING) & (used + cost > max_nfe)
            status[over] = _BUDGET
            running = status == _RUNNING
            if not bool(running.any()):
                break
            rows = running.nonzero().squeeze(1) if compact else torch.arange(n)
            act = running[rows]
            charge = rows[act]
            rows_d = rows.to(dev)
            act_d = act.to(dev)
            xs, ts, cs = x[rows_d], t[rows_d], c[rows_d]
            hs = torch.where(act_d, h[rows_d].clamp_max(h_max), torch.zeros_like(cs))
            last = act_d & (hs >= c_end - cs)
            cn = torch.where(last, torch.full_like(cs, c_end), cs + hs)
            tn = torch.where(last, torch.full_like(ts, ctx.t_end), to_t(cn))
            tn = torch.where(act_d, tn, ts)
            counter = attempts[rows]

            def score(xx: Tensor, tt: Tensor, _charge=charge) -> Tensor:
                return ctx.score(xx, tt, rows=_charge, check_finite=False)

            memo: dict[str, Tensor] = {}

            def increments(points: list[Tensor], _rows=rows, _counter=counter, _cs=cs, _memo=memo) -> list[Tensor]:
                out = []
                if path is not None:
                    w0 = path.w[_rows.to(dev)]
                    for p in points:
                        _memo["w"] = path(p, _rows)
                        out.append(_memo["w"] - w0)
                    return out
                if tree is None:
                    w, c_prev = torch.zeros((_cs.shape[0], *x.shape[1:]), dtype=f64, device=dev), _cs
                    for j, p in enumerate(points):
                        z = ctx.noise.normal(x.shape[1:], Stream.STEP, _counter * 4 + j, _rows, dtype=f64, device=dev)
                        w = w + broadcast_to_rows((variance(p) - variance(c_prev)).clamp_min(0).sqrt(), w) * z
                        out.append(w)
                        c_prev = p
                    return out
                w0 = w_cur[_rows.to(dev)]
                for p in points:
                    _memo["w"] = tree(p, _rows)
                    out.append(_memo["w"] - w0)
                return out

            ts_d = ts.to(dt)

            def score0(_rows=rows_d, _act=act_d, _charge=charge, _xs=xs, _ts=ts_d) -> Tensor:
                if s_cache is None:
                    return ctx.score(_xs, _ts, rows=_charge, check_finite=False)
                valid = s_valid[_rows] & _act
                need = ~valid
                out = s_cache[_rows].clone()
                if bool(need.any()):
                    out[need] = ctx.score(_xs[need], _ts[need], rows=_rows[_act & need].cpu(), check_finite=False)
                reused[_rows[valid].cpu()] += 1
                s_cache[_rows] = out
                s_valid[_rows] = _act & torch.isfinite(out.reshape(out.shape[0], -1)).all(dim=1)
                return out

            low, high = pair(ctx, xs, Attempt(ts_d, tn.to(dt), cs, cn, score, increments, score0, rows))
            keep, ref = (high, low) if extrapolate else (low, high)
            scale = ref.abs()
            if use_prev is True:
                scale = torch.maximum(scale, x_prev[rows_d].abs())
            elif use_prev == "x":
                scale = torch.maximum(scale, xs.abs())
            delta = torch.clamp_min(torch.clamp_min(eps_rel * scale, eps_abs), torch.finfo(dt).tiny)
            err = _error_norm((high - low) / delta, norm).to(f64)
            finite = torch.isfinite(err)
            ok = act_d & finite & (err <= 1.0)
            if commit is not None:
                commit(rows, ok)

            # state update for accepted rows
            x[rows_d] = torch.where(broadcast_to_rows(ok, xs), keep, xs)
            s_valid[rows_d] = s_valid[rows_d] & ~ok  # a moved state needs a new evaluation
            x_prev[rows_d] = torch.where(broadcast_to_rows(ok, xs), ref, x_prev[rows_d])
            if w_cur is not None:
                w_cur[rows_d] = torch.where(broadcast_to_rows(ok, xs), memo["w"], w_cur[rows_d])
            if path is not None and bool(ok.any()):
                path.advance(rows[ok.cpu()], cn[ok], memo["w"][ok])
            t_new = torch.where(ok, tn, ts)
            c_new = torch.where(ok, cn, cs)
            rem = torch.clamp_min(c_end - c_new, 0.0)
            done = ok & (rem <= stop_tol)
            t_new = torch.where(done, torch.full_like(t_new, ctx.t_end), t_new)
            c_new = torch.where(done, torch.full_like(c_new, c_end), c_new)
            rem = torch.where(done, torch.zeros_like(rem), rem)
            # step update for every attempted row; E = 0 gives an infinite factor, clipped by rem
            fac = safety * torch.where(err > 0, err, torch.zeros_like(err)).pow(-exponent)
            if pi_beta > 0:  # PI control (Gustafsson): damp growth after a large accepted error
                e_prev = err_prev[rows_d]
                fac = torch.where(ok, fac * e_prev.pow(pi_beta), fac)
                err_prev[rows_d] = torch.where(ok, err.clamp_min(1e-4), e_prev)
            grown = torch.minimum(rem, hs * fac.clamp_max(max_growth))
            shrunk = torch.minimum(rem, 0.1 * hs)
            h_new = torch.where(finite, grown, shrunk)
            t[rows_d] = torch.where(act_d, t_new, ts)
            c[rows_d] = torch.where(act_d, c_new, cs)
            h[rows_d] = torch.where(act_d, h_new, h[rows_d])

            ok_c, act_c, done_c = ok.cpu(), act.cpu(), done.cpu()
            attempts[rows[act_c]] += 1
            accepted[rows[ok_c]] += 1
            rejected[rows[act_c & ~ok_c]] += 1
            nonfinite[rows[act_c & ~finite.cpu()]] += 1
            status[rows[done_c]] = _DONE

            if corrector_steps and bool(ok_c.any()):
                sel = rows[ok_c]
                x[sel.to(dev)] = _langevin(
                    ctx, x[sel.to(dev)], t[sel.to(dev)].to(dt), sel, attempts[sel] - 1, corrector_steps, snr
                )

            if bar is not None:
                frac = float(((c - c_start) / span).clamp(0.0, 1.0).mean())
                now = int(1000 * frac)
                bar.update(now - shown)
                shown = now
            full_ok = torch.zeros(n, dtype=torch.bool, device=dev)
            full_ok[rows_d] = ok
            h_used = torch.zeros(n, dtype=f64, device=dev)
            h_used[rows_d] = hs
            info = StepInfo(step=it, t=t.to(dt), h=h_used.to(dt), x=x, nfe=ctx.score.nfe, accepted=full_ok)
            it += 1
            if not ctx.report(info):
                status[status == _RUNNING] = _STOPPED
                break
    finally:
        if bar is not None:
            bar.close()

    used = ctx.score.nfe_per_sample - nfe0
    ctx.stats.update(
        iterations=it,
        accepted=accepted,
        rejected=rejected,
        nonfinite_rejections=nonfinite,
        reused_evaluations=reused,
        status=[STATUS[int(s)] for s in status],
        t_final=t.cpu(),
        nfe_solver_per_sample=used.clone(),
    )
    n_budget = int((status == _BUDGET).sum())
    if n_budget and on_budget == "raise":
        worst = float(t[status.to(dev) == _BUDGET].max())
        raise AdaptiveBudgetError(
            f"{n_budget} of {n} samples did not reach t_end = {ctx.t_end:g} within max_nfe = {max_nfe} "
            f"score evaluations per sample (the furthest behind is at t = {worst:.6g}); raise max_nfe, "
            f"loosen eps_rel / eps_abs, or pass on_budget='partial' to get partial results"
        )
    return x


def _langevin(
    ctx: SolverContext, x: Tensor, t: Tensor, rows: Tensor, counter: Tensor, steps: int, snr: float
) -> Tensor:
    """Langevin corrector at fixed t with per-sample norms: ε = 2(snr·‖z‖/‖s‖)², x ← x + ε s + √(2ε) z."""
    for j in range(steps):
        s = ctx.score(x, t, rows=rows)
        z = ctx.normal(x, Stream.CORRECTOR, counter * steps + j, rows=rows)
        zn = z.reshape(z.shape[0], -1).norm(dim=1)
        sn = s.reshape(s.shape[0], -1).norm(dim=1).clamp_min(torch.finfo(x.dtype).tiny)
        eps = broadcast_to_rows(2.0 * (snr * zn / sn) ** 2, x)
        x = x + eps * s + (2.0 * eps).sqrt() * z
    return x


# ---------------------------------------------------------------------------------------------
# Gotta Go Fast: Euler–Maruyama / stochastic improved Euler pair in t
# ---------------------------------------------------------------------------------------------


def _ggf_pair(improved_euler: bool) -> PairFn:
    def pair(ctx: SolverContext, x: Tensor, a: Attempt) -> tuple[Tensor, Tensor]:
        sde = ctx.sde
        h = broadcast_to_rows(a.t - a.t_next, x)
        dw = a.brownian([a.c_next])[0].to(x.dtype)  # √h·z: one draw shared by both stages
        b1 = sde.reverse_drift(x, a.t, a.score0())
        noise1 = broadcast_to_rows(sde.diffusion(a.t), x) * dw
        if improved_euler:
            k1 = -h * b1 + noise1
            x1 = x + k1
            b2 = sde.reverse_drift(x1, a.t_next, a.score(x1, a.t_next))
            k2 = -h * b2 + broadcast_to_rows(sde.diffusion(a.t_next), x) * dw
            return x1, x + 0.5 * (k1 + k2)
        # "Lamba" variant: Heun on the drift only, the noise g(t)·√h·z added once afterwards
        x_det = x - h * b1
        b2 = sde.reverse_drift(x_det, a.t_next, a.score(x_det, a.t_next))
        return x_det + noise1, x - 0.5 * h * (b1 + b2) + noise1

    return pair


def adaptive(ctx: SolverContext, x: Tensor, *, improved_euler: bool, h_init: float, **opts: Any) -> Tensor:
    """Gotta Go Fast. For σ-time processes (EDM) h_init is a fraction of the interval T − t_end."""
    sde: SDE = ctx.sde
    if isinstance(sde, EDM):
        h_init = h_init * (ctx.t_start - ctx.t_end)
    return run_adaptive(
        ctx,
        x,
        pair=_ggf_pair(improved_euler),
        nfe_per_attempt=2,
        c_start=-float(ctx.t_start),
        c_end=-float(ctx.t_end),
        to_t=lambda c: -c,
        variance=lambda c: c,
        stop_tol=1e-6,
        desc="adaptive",
        h_init=h_init,
        **opts,
    )


ADAPTIVE = SolverSpec(
    name="adaptive",
    run=adaptive,
    options={
        **adaptive_options(h_init=0.01, eps_rel=0.01, exponent=0.9, brownian="fresh"),
        "improved_euler": Option(True, boolean, "stochastic improved Euler (False: drift-only 'Lamba' variant)"),
    },
    summary="Gotta Go Fast: per-sample adaptive EM / stochastic improved Euler on the reverse SDE",
    stochastic=True,
)

"""Fitting time grids (``fit_grid``): the N times that minimise a solver's error against a fine
teacher solve from the same noise, keyed to the run (a :class:`~fastsde.artifacts.grid.FittedGrid`).

The fit (after GITS, Chen et al. 2024, with fastsde's choices):

1. x_T: ``n`` prior draws of ``seed`` (the same x_T that ``fastsde.sample(seed=seed)`` starts from).
2. Teacher: the same x_T solved ODE-only by a high-order solver (``lms``, fourth-order Adams in EDM
   coordinates) on a fine grid of M intervals of the solver's grid family with the same ends; every
   x_j and its data prediction D_j are kept (n·M evaluations).
3. Cost of a move i → j of the fine grid (``metric="l2"``): the mean over the batch of
   ‖(DDIM(x_i, D_i; t_i → t_j) − x_j)/m_j‖, the first-order step from the teacher's state against
   the teacher's state, on the data scale (the DDIM step is the EDM Euler step on EDM).
4. Dynamic programme over the N − 1 moves from node 0 to node M: V_1(i) = C[i, M],
   V_k(i) = min_{i<j<M} C[i, j] + γ·V_{k−1}(j), γ = 1.15 weighting later (low-noise) moves more; the
   argmins are stored and read back (no float comparisons).
5. Refinement (``refine=True``): coordinate descent on the interior times in λ = log(m/σ),
   golden-section search between the neighbours, ``sweeps`` sweeps, minimising the solver's own
   L(g) = mean_b ‖(solver(x_T; g) − teacher(x_T))/m‖² at t_end; a move is kept only if L falls.
   It starts from the DP grid, or from the solver's default grid when L is lower there (the DP's
   cost is the first-order step's and blind to the solver: for dpmpp_2m on a 16-D EDM mixture at
   6 points the DP grid alone had 2.6x the default grid's L).
   Stochastic solvers are fitted with their deterministic member (η = 0, s_churn = 0).

The result is a :class:`FittedGrid`: its ``times`` go into any fixed-grid solver's ``grid=``
option; its key (process, solver, the solver's other options, steps, t_end, model fingerprint) is
checked when it is used, and a mismatch is a ValueError naming the field. Files are safetensors
with the key and the fitting record as JSON metadata; never pickle.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor

from ..artifacts.artifact import data_shape, model_fingerprint
from ..artifacts.grid import FittedGrid
from ..grids import GRIDS, default_grid, explicit_times, time_grid
from ..noise import NoiseSource, Stream
from ..score import CountingScore, ScoreFn, check_score_and_process, data_prediction_of
from ..sde import SDE, broadcast_to_rows
from ..solvers import get_solver
from ..solvers.core.context import SolverContext

__all__ = ["fit_grid", "gits_dp", "path_cost", "move_costs"]

#: Options set to their deterministic member for the refinement (fastsde's stochastic fixed-grid solvers).
DETERMINISTIC = {"eta": 0.0, "s_churn": 0.0}
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


# ---------------------------------------------------------------------------------------------
# Costs and the dynamic programme
# ---------------------------------------------------------------------------------------------


def move_costs(sde: SDE, times: Tensor, states: Tensor, denoised: Tensor) -> Tensor:
    """C[i, j] (i < j; +inf elsewhere): mean over the batch of the data-scale L2 distance between
    the DDIM step from the teacher's (x_i, D_i) at t_i to t_j and the teacher's x_j.

    ``times`` (M + 1,), ``states`` (M + 1, n, ...) and ``denoised`` (M, n, ...) in float64."""
    m1 = times.numel()
    lam, sig, mc = sde.log_snr(times), sde.marginal_std(times), sde.mean_coeff(times)
    cost = torch.full((m1, m1), math.inf, dtype=torch.float64)
    for i in range(m1 - 1):
        j = torch.arange(i + 1, m1)
        a = sig[j] / sig[i]
        b = -mc[j] * torch.expm1(-(lam[j] - lam[i]))
        x, d = states[i], denoised[i]
        y = broadcast_to_rows(a, states[j]) * x.unsqueeze(0) + broadcast_to_rows(b, states[j]) * d.unsqueeze(0)
        err = (y - states[j]) / broadcast_to_rows(mc[j], states[j])
        cost[i, i + 1 :] = err.reshape(j.numel(), x.shape[0], -1).pow(2).sum(-1).sqrt().mean(-1)
    return cost


def gits_dp(cost: Tensor, moves: int, gamma: float = 1.15) -> tuple[list[int], float]:
    """The path 0 = p_0 < … < p_K = M (K = ``moves``) minimising Σ_l γ^l·C[p_l, p_{l+1}], by dynamic
    programming with stored argmins. Returns (path, its weighted cost)."""
    m = cost.shape[0] - 1
    if not 1 <= moves <= m:
        raise ValueError(f"moves must be in [1, {m}] for a fine grid of {m} intervals, got {moves}")
    c = cost.to(torch.float64)
    value = c[:, m].clone()  # V_1(i) = C[i, M]
    choice: list[Tensor] = []
    for _ in range(2, moves + 1):
        # V_k(i) = min over i < j < M of C[i, j] + γ V_{k-1}(j)
        cand = c[:, :m] + gamma * value[:m].unsqueeze(0)
        cand = torch.where(torch.triu(torch.ones(m + 1, m, dtype=torch.bool), diagonal=1), cand, math.inf)
        value, arg = cand.min(dim=1)
        choice.append(arg)
    path, node = [0], 0
    for arg in reversed(choice):
        node = int(arg[node])
        path.append(node)
    path.append(m)
    return path, float(value[0])


def path_cost(cost: Tensor, path: list[int], gamma: float = 1.15) -> float:
    """Σ_l γ^l·C[p_l, p_{l+1}] of a path (what :func:`gits_dp` minimises)."""
    return float(sum(gamma**k * float(cost[a, b]) for k, (a, b) in enumerate(zip(path[:-1], path[1:]))))


# ---------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------


class _Recorder:
    """A score that remembers its full-batch calls (t, x, output) so the teacher's own evaluations
    give the data predictions at its grid points."""

    def __init__(self, score: ScoreFn, n: int) -> None:
        self.score, self.n = score, n
        self.calls: list[tuple[float, Tensor, Tensor]] = []

    def __call__(self, x: Tensor, t: Tensor, **kw: Any) -> Tensor:
        out = self.score(x, t, **kw)
        if x.shape[0] == self.n and bool((t == t[0]).all()):
            self.calls.append((float(t[0]), x, out))
        return out

    @property
    def data_prediction(self) -> Any:
        """The wrapped score's data prediction (what a teacher needs from m = 0), or None."""
        return data_prediction_of(self.score)


def _run(spec, sde: SDE, score: CountingScore, x: Tensor, t_end: float, opts: dict[str, Any], callback=None) -> Tensor:
    ctx = SolverContext(
        sde=sde,
        score=score,
        noise=NoiseSource.from_seed(0, x.shape[0]),
        t_start=sde.T,
        t_end=float(t_end),
        callback=callback,
    )
    return spec.run(ctx, x, **opts)


def _teacher(score: ScoreFn, sde: SDE, x_T: Tensor, fine: Tensor, teacher: str) -> tuple[Tensor, Tensor, CountingScore]:
    """The teacher's states at every fine grid point and data predictions at all but the last."""
    n = x_T.shape[0]
    spec = get_solver(teacher)
    rec = _Recorder(score, n)
    counted = CountingScore(rec, n)
    opts = spec.resolve(sde, {"steps": fine.numel(), "grid": fine}, float(fine[-1]))
    states = [x_T]

    def keep(info) -> None:
        states.append(info.x.clone())

    with torch.no_grad():
        _run(spec, sde, counted, x_T, float(fine[-1]), opts, keep)
    if len(states) != fine.numel():
        raise RuntimeError(f"teacher {teacher!r} reported {len(states) - 1} moves, expected {fine.numel() - 1}")
    den = []
    for i in range(fine.numel() - 1):
        ti, xi = float(fine[i].to(x_T.dtype)), states[i]
        tt = torch.full((n,), ti, dtype=x_T.dtype, device=x_T.device)
        if float(sde.mean_coeff(tt[:1].to(torch.float64))[0]) == 0.0:  # m = 0 (a rectified flow's u = 1)
            den.append(counted.data_prediction(xi, tt))  # the score is −x there: x̂0 only from the model
            continue
        hit = next((out for t, x, out in rec.calls if t == ti and torch.equal(x, xi)), None)
        if hit is None:  # a teacher that did not evaluate at its own grid point: one more evaluation
            hit = counted(xi, tt)
        den.append(sde.denoise(xi, tt, hit))
    return torch.stack(states), torch.stack(den), counted


def _loss(
    spec, sde: SDE, score: CountingScore, x_T: Tensor, target: Tensor, times: Tensor, opts: dict[str, Any]
) -> float:
    """mean_b ‖(solver(x_T; times) − teacher)/m(t_end)‖²."""
    t_end = float(times[-1])
    with torch.no_grad():
        out = _run(spec, sde, score, x_T, t_end, dict(opts, grid=times))
    m = float(sde.mean_coeff(torch.tensor(t_end, dtype=torch.float64)))
    d = (out - target).to(torch.float64) / m
    val = float(d.reshape(d.shape[0], -1).pow(2).sum(-1).mean())
    return val if math.isfinite(val) else math.inf


def _refine(
    spec, sde: SDE, score: CountingScore, x_T: Tensor, target: Tensor, times: Tensor, opts, sweeps: int, iters: int
) -> tuple[Tensor, float, float]:
    """Coordinate descent on the interior times in λ, golden-section search between the neighbours;
    returns (times, loss before, loss after)."""
    lam = sde.log_snr(times)
    t_end, t0 = float(times[-1]), float(times[0])

    def grid_of(lv: Tensor) -> Tensor:
        g = sde.t_from_lambda(lv)
        g[0], g[-1] = t0, t_end
        return g

    best = _loss(spec, sde, score, x_T, target, times, opts)
    start = best
    for _ in range(sweeps):
        for k in range(1, lam.numel() - 1):
            lo, hi = float(lam[k - 1]), float(lam[k + 1])
            pad = 1e-6 * (hi - lo)
            a, b = lo + pad, hi - pad

            def f(v: float, k: int = k) -> float:
                trial = lam.clone()
                trial[k] = v
                g = grid_of(trial)
                if not bool((g[:-1] > g[1:]).all()):
                    return math.inf
                return _loss(spec, sde, score, x_T, target, g, opts)

            c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
            fc, fd = f(c), f(d)
            for _ in range(iters):
                if fc <= fd:
                    b, d, fd = d, c, fc
                    c = b - GOLDEN * (b - a)
                    fc = f(c)
                else:
                    a, c, fc = c, d, fd
                    d = a + GOLDEN * (b - a)
                    fd = f(d)
            v, fv = (c, fc) if fc <= fd else (d, fd)
            if fv < best:
                lam[k], best = v, fv
    return grid_of(lam), start, best


def _check(score: Any, sde: Any, n: Any, seed: Any, M: Any, gamma: Any, sweeps: Any, iters: Any, metric: Any) -> None:
    check_score_and_process(score, sde)
    for name, v, lo in (("n", n, 1), ("M", M, 2), ("sweeps", sweeps, 0), ("refine_iters", iters, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
    if metric != "l2":
        raise ValueError(f"metric must be 'l2', got {metric!r}")


def fit_grid(
    score: ScoreFn,
    sde: SDE,
    solver: str = "dpmpp_2m",
    steps: int = 8,
    n: int = 256,
    seed: int = 0,
    *,
    M: int = 60,
    gamma: float = 1.15,
    metric: str = "l2",
    refine: bool = True,
    sweeps: int = 2,
    refine_iters: int = 8,
    teacher: str = "lms",
    shape: tuple[int, ...] | None = None,
    t_end: float | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    **options: Any,
) -> FittedGrid:
    """Fit the ``steps`` grid points of a fixed-grid solver for this model and process.

    Args:
        score, sde: the model and its process.
        solver: a fixed-grid solver (one with a ``grid`` option).
        steps: grid points from T to t_end, both included (as the solver's ``steps``).
        n, seed: prior draws fitted on (evaluate on other seeds).
        M: intervals of the teacher's fine grid (the solver's grid family, same ends).
        gamma: the DP's weight of later moves; metric: the DP's move cost ("l2").
        refine, sweeps, refine_iters: the solver-aware coordinate descent (golden-section steps per node).
        teacher: the high-order solver of the fine solve.
        shape: dims of one sample (read off the score when it has ``.shape``).
        t_end: end time (default: the process's).
        **options: the solver's other options (they enter the key).
    """
    _check(score, sde, n, seed, M, gamma, sweeps, refine_iters, metric)
    spec = get_solver(solver)
    if spec.adaptive or "grid" not in spec.options or "steps" not in spec.options:
        raise ValueError(f"fit_grid needs a fixed-grid solver (one with steps and grid), got {spec.name!r}")
    if not isinstance(refine, bool):
        raise ValueError(f"refine must be True or False, got {refine!r}")
    t_end = sde.default_t_end if t_end is None else float(t_end)
    sde.check_time("t_end", t_end)
    if "grid" in options and explicit_times(options["grid"]) is not None:
        raise ValueError("fit_grid takes a grid name (the family of the fine teacher grid), not explicit times")
    opts = spec.resolve(sde, {**options, "steps": steps}, t_end)
    if steps - 1 > M:
        raise ValueError(f"steps = {steps} needs a fine grid of at least {steps - 1} intervals, got M = {M}")
    family = opts["grid"] if opts["grid"] in GRIDS else default_grid(sde)
    dims = data_shape(score, shape)
    start = time.perf_counter()

    noise = NoiseSource.from_seed(seed, n)
    x_T = sde.prior_sample(noise.normal(dims, Stream.PRIOR, 0, dtype=dtype, device=device))
    fine = time_grid(sde, family, M + 1, sde.T, t_end, opts["rho"])
    states, den, t_count = _teacher(score, sde, x_T, fine, teacher)
    cost = move_costs(sde, fine, states.to(torch.float64), den.to(torch.float64))
    path, dp_value = gits_dp(cost, steps - 1, gamma)
    times = fine[path].clone()

    det = {k: v for k, v in DETERMINISTIC.items() if k in opts}
    run_opts = {**opts, **det, "steps": steps}
    deterministic = not spec.is_stochastic(run_opts)
    counted = CountingScore(score, n)
    target = states[-1]
    default_times = time_grid(sde, family, steps, sde.T, t_end, opts["rho"])
    loss_default = loss_dp = loss_refined = None
    start_from = "dp"
    if deterministic:
        loss_default = _loss(spec, sde, counted, x_T, target, default_times, run_opts)
        loss_dp = _loss(spec, sde, counted, x_T, target, times, run_opts)
        loss_refined = loss_dp
        if refine:
            # the DP's cost is the first-order step's, blind to the solver: refine from whichever of
            # the DP grid and the solver's default grid the solver itself does better on
            if loss_default < loss_dp:
                times, start_from = default_times.clone(), "default"
            times, _, loss_refined = _refine(spec, sde, counted, x_T, target, times, run_opts, sweeps, refine_iters)
    seconds = time.perf_counter() - start
    fingerprint, probe = model_fingerprint(score, sde, dims, t_end, dtype, device)
    key = {**FittedGrid.run_key(sde, spec.name, opts, t_end), "model": fingerprint}
    evaluations = float(t_count.nfe_per_sample.sum() + counted.nfe_per_sample.sum())
    record = {
        "teacher": teacher,
        "M": M,
        "family": family,
        "n": n,
        "seed": seed,
        "metric": metric,
        "gamma": gamma,
        "dp_path": path,
        "dp_value": dp_value,
        "refined": bool(refine and deterministic),
        "refined_from": start_from if refine and deterministic else None,
        "refine_skipped": None if deterministic else "the solver has no deterministic member to fit with",
        "sweeps": sweeps if refine else 0,
        "loss_default": loss_default,
        "loss_dp": loss_dp,
        "loss_refined": loss_refined,
        "fit_nfe_per_sample": evaluations / n,
        "teacher_nfe_per_sample": float(t_count.nfe_per_sample.mean()),
        "seconds": seconds,
        "dtype": str(dtype).replace("torch.", ""),
    }
    return FittedGrid(times.to(torch.float64), key, record, probe)

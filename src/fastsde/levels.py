"""A hierarchy of score functions for multilevel Euler–Maruyama (``solver="mlem"``).

``Levels([f1, ..., fK], costs=[c1, ..., cK])`` holds score functions of one model family ordered
coarse to fine, with the compute of one evaluation of each. ``fastsde.sample`` counts each level
with its own :class:`~fastsde.score.CountingScore` (:class:`LevelScores`), so ``res.cost`` and
``res.nfe_per_level`` come from the counters. This module also holds what the ``mlem`` stepper
needs before any compute: the probe that refuses levels disagreeing in shape or time convention,
the probability schedule (constants, a callable p(t), or ``"auto"`` from a calibration pass), and
the expected cost of a schedule.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .noise import NoiseSource, Stream
from .score import CountingScore, ScoreFn
from .sde import SDE, broadcast_to_rows, per_row

__all__ = [
    "Levels",
    "LevelScores",
    "check_p",
    "resolve_schedule",
    "expected_cost",
    "auto_schedule",
    "forward_flops",
]

#: Seed of the probe and of the calibration pass: fixed, so that the schedule (and so sample i)
#: does not depend on the batch or on the samples' seeds.
CALIBRATION_SEED = 0x5EED


def _positive_cost(i: int, c: Any) -> float:
    if isinstance(c, bool) or not isinstance(c, numbers.Real) or not math.isfinite(float(c)) or float(c) <= 0:
        raise ValueError(f"costs[{i}] must be a positive finite number, got {c!r}")
    return float(c)


class Levels:
    """Score functions ordered coarse to fine, each with its cost per evaluation.

    Args:
        scores: at least two callables score(x, t), coarse to fine, of one model family (one
            parameterisation, one time convention); f_K is the level ML-EM is unbiased for.
        costs: compute of one evaluation of one row of each level (FLOPs, seconds or any unit:
            ``res.cost`` is in the same unit); positive and finite.
        agree_tol: the probe before compute refuses a level whose score differs from the finest by
            more than this relative amount (‖f_k − f_K‖ / ‖f_K‖) at t = T or halfway to t_end: the
            sign of another time convention (t against 999·t or σ) or parameterisation; None skips
            that check (shapes and finiteness are still probed).
    """

    #: set by :meth:`from_models`: the model names, loaded models, FLOPs per sample and how measured
    names: list[str] | None = None
    models: list[Any] | None = None
    flops: list[float] | None = None
    flops_method: list[str] | None = None

    def __init__(self, scores: Sequence[ScoreFn], costs: Sequence[float], *, agree_tol: float | None = 1.0) -> None:
        if isinstance(scores, (str, bytes)) or not isinstance(scores, Sequence) or callable(scores):
            raise ValueError(f"Levels takes a list of score functions (coarse to fine), got {scores!r}")
        scores = list(scores)
        if len(scores) < 2:
            raise ValueError(
                f"Levels needs at least 2 score functions, got {len(scores)} (a single score is plain EM: pass it as the score)"
            )
        for i, f in enumerate(scores):
            if not callable(f):
                raise ValueError(f"levels[{i}] must be callable as score(x, t), got {f!r}")
        if isinstance(costs, (str, bytes)) or not isinstance(costs, Sequence):
            raise ValueError(f"costs must be a list of {len(scores)} positive numbers, got {costs!r}")
        if len(costs) != len(scores):
            raise ValueError(f"costs must give one cost per level: {len(scores)} levels, got {len(costs)} costs")
        self.costs = [_positive_cost(i, c) for i, c in enumerate(costs)]
        if agree_tol is not None and (
            isinstance(agree_tol, bool) or not isinstance(agree_tol, numbers.Real) or not float(agree_tol) > 0
        ):
            raise ValueError(f"agree_tol must be a number > 0 or None, got {agree_tol!r}")
        self.agree_tol = None if agree_tol is None else float(agree_tol)
        self.scores = scores
        from .api import score_process

        procs = [(i, score_process(f)) for i, f in enumerate(scores)]
        procs = [(i, p) for i, p in procs if p is not None]
        for i, p in procs[1:]:
            j, q = procs[0]
            if type(p) is not type(q) or p.config() != q.config():
                raise ValueError(
                    f"levels[{i}] was built for {p!r} but levels[{j}] for {q!r}: one process for all levels"
                )
        #: the process the levels that carry one were built for (None: plain functions)
        self.sde: SDE | None = procs[0][1] if procs else None

    @classmethod
    def from_models(cls, names: Sequence[str], *, agree_tol: float | None = 1.0, **load: Any) -> Levels:
        """Levels of shipped models or model folders, coarse to fine (e.g. ``["digits-small", "digits",
        "digits-large"]``), with costs = each network's forward FLOPs per sample (measured now,
        :func:`forward_flops`) relative to the cheapest; ``load`` goes to :func:`fastsde.load_model` (e.g. ``dtype``).
        ``self.models`` holds the loaded models and ``self.flops`` the FLOPs. Unknown names, fewer
        than two, or models of different processes are a ValueError before any sampling."""
        from .models import list_models, load_model

        if isinstance(names, str):
            names = [s.strip() for s in names.split(",") if s.strip()]
        names = list(names)
        if len(names) < 2:
            raise ValueError(f"Levels.from_models needs at least 2 models (coarse to fine), got {names!r}")
        from pathlib import Path

        unknown = [n for n in names if n not in list_models() and not Path(n).is_dir()]
        if unknown:
            raise ValueError(
                f"unknown model(s) {unknown}; shipped models are {list_models()}, or give model folders "
                "(fastsde train --out DIR)"
            )
        models = [load_model(n, **load) for n in names]
        for n, m in zip(names[1:], models[1:]):
            if type(m.sde) is not type(models[0].sde) or m.sde.config() != models[0].sde.config():
                raise ValueError(
                    f"model {n!r} uses {m.sde!r} but {names[0]!r} uses {models[0].sde!r}: one process for all levels"
                )
            if tuple(m.shape) != tuple(models[0].shape):
                raise ValueError(f"model {n!r} samples shape {m.shape} but {names[0]!r} {models[0].shape}")
        measured = [forward_flops(m.network, m.shape) for m in models]
        flops = [f for f, _ in measured]
        cheapest = min(flops)
        out = cls([m.score for m in models], [f / cheapest for f in flops], agree_tol=agree_tol)
        out.models = models
        out.names = names
        out.flops = flops
        out.flops_method = [how for _, how in measured]
        return out

    def __len__(self) -> int:
        return len(self.scores)

    def __repr__(self) -> str:
        return f"Levels({len(self)} levels, costs={self.costs})"

    def check(self, sde: SDE, solver: str) -> None:
        """The front door's checks: each level's process is ``sde``, and the solver takes levels."""
        from .api import check_score_and_process

        if solver != "mlem":
            raise ValueError(
                f"Levels need solver='mlem'; {solver!r} takes one score (pass levels.scores[-1] for the finest)"
            )
        for i, f in enumerate(self.scores):
            try:
                check_score_and_process(f, sde)
            except ValueError as err:
                raise ValueError(f"levels[{i}]: {err}") from None

    def counting(self, n: int, cond: dict[str, Tensor] | None = None) -> LevelScores:
        """One counter per level for a batch of n samples (with their per-sample conditioning)."""
        return LevelScores(self, n, cond)

    def probe(self, sde: SDE, like: Tensor, t_end: float, cond: dict[str, Tensor] | None = None) -> int:
        """Evaluate every level on two rows shaped like ``like`` (at T and halfway to t_end) and refuse,
        before any compute on the samples, a level that returns the wrong shape, NaN/Inf, or (with
        ``agree_tol``) a score far from the finest one. Returns the rows evaluated per level."""
        times = per_row(0.0, 2, like.dtype, like.device)
        times[0], times[1] = sde.T, 0.5 * (sde.T + t_end)
        src = NoiseSource.from_seed(CALIBRATION_SEED, 2)
        x = sde.prior_sample(src.normal(like.shape[1:], Stream.PROBE, 0, dtype=like.dtype, device=like.device))
        kw = {} if not cond else {k: v[:1].expand(2, *v.shape[1:]) for k, v in cond.items()}  # sample 0's rows
        outs = []
        for i, f in enumerate(self.scores):
            out = f(x, times, **kw)
            if not isinstance(out, Tensor) or out.shape != x.shape:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"levels[{i}](x, t) must return a tensor shaped like x {tuple(x.shape)}, got {got}")
            if not bool(torch.isfinite(out).all()):
                raise ValueError(f"levels[{i}] returned NaN or Inf at t = {times.tolist()} (probe before compute)")
            outs.append(out.reshape(2, -1).to(torch.float64))
        if self.agree_tol is not None:
            fine = outs[-1].norm(dim=1).clamp_min(1e-300)
            for i, out in enumerate(outs[:-1]):
                rel = (out - outs[-1]).norm(dim=1) / fine
                worst = int(rel.argmax())
                if float(rel[worst]) > self.agree_tol:
                    raise ValueError(
                        f"levels[{i}] differs from the finest level by {float(rel[worst]):.3g} (relative) at "
                        f"t = {float(times[worst]):.6g}, more than agree_tol = {self.agree_tol:g}: the levels "
                        "must share one parameterisation and time convention (Levels(..., agree_tol=None) skips this)"
                    )
        return 2


class LevelScores:
    """The counters of a :class:`Levels` for one solve: one :class:`CountingScore` per level, with the
    level's cost. Called as a score it evaluates the finest level (the final denoise, and any
    caller that wants one score); the totals (``nfe_per_sample``, ``cost_per_sample``, ``calls``)
    sum over levels, so the driver and the front door read them as they read one counter."""

    def __init__(self, levels: Levels, n: int, cond: dict[str, Tensor] | None = None) -> None:
        self.spec = levels
        self.n = n
        self.levels = [CountingScore(f, n, cost=c, cond=cond) for f, c in zip(levels.scores, levels.costs)]
        #: what the mlem stepper records for res.config(): schedule, expected cost, calibration
        self.record: dict[str, Any] = {}

    def __call__(
        self, x: Tensor, t: Tensor, rows: Tensor | None = None, *, check_finite: bool = True, ids: Tensor | None = None
    ) -> Tensor:
        return self.levels[-1](x, t, rows, check_finite=check_finite, ids=ids)

    @property
    def has_data_prediction(self) -> bool:
        """Whether the finest level gives the data prediction x̂0 (what a solve from m = 0 needs)."""
        return self.levels[-1].has_data_prediction

    def data_prediction(
        self, x: Tensor, t: Tensor, rows: Tensor | None = None, *, check_finite: bool = True, ids: Tensor | None = None
    ) -> Tensor:
        """The finest level's data prediction, counted on its counter: the first move from m = 0 (pure
        noise) takes x̂0 from the most accurate model, as the final denoise takes its score."""
        return self.levels[-1].data_prediction(x, t, rows, check_finite=check_finite, ids=ids)

    @property
    def network_evals(self) -> float:
        """Mean network evaluations per sample, all levels together."""
        return sum(c.network_evals for c in self.levels)

    @property
    def nfe_per_sample(self) -> Tensor:
        return sum(c.nfe_per_sample for c in self.levels)

    @property
    def cost_per_sample(self) -> Tensor:
        return sum(c.cost_per_sample for c in self.levels)

    @property
    def calls(self) -> int:
        return sum(c.calls for c in self.levels)

    @property
    def rows_evaluated(self) -> int:
        return sum(c.rows_evaluated for c in self.levels)

    @property
    def nfe(self) -> float:
        """Mean evaluations per sample, all levels together."""
        return float(self.nfe_per_sample.mean())

    @property
    def compute(self) -> float:
        """Mean compute per sample: Σ over levels of evaluations × cost."""
        return float(self.cost_per_sample.mean())

    @property
    def nfe_per_level(self) -> Tensor:
        """(K,) mean evaluations per sample of each level."""
        return torch.stack([c.nfe_per_sample.mean() for c in self.levels])

    @property
    def nfe_per_level_per_sample(self) -> Tensor:
        """(n, K) evaluations of each level for each sample."""
        return torch.stack([c.nfe_per_sample for c in self.levels], dim=1)

    def accounting(self, denoised: bool) -> dict[str, Any]:
        """The JSON-ready record for res.config(): the stepper's record (schedule, expected cost,
        calibration) with the realised cost and counts; the expected cost includes the denoise
        (one evaluation of the finest level) when it ran."""
        out = {"levels": len(self.levels), "costs": list(self.spec.costs), **self.record}
        if "expected_cost" in out and denoised:
            out["expected_cost"] = float(out["expected_cost"]) + self.spec.costs[-1]
        out["realised_cost"] = self.compute
        out["nfe_per_level"] = [float(v) for v in self.nfe_per_level]
        return out


def forward_flops(network: torch.nn.Module, shape: Sequence[int], label: float = 500.0) -> tuple[float, str]:
    """Forward FLOPs of ``network(x, label)`` for one sample: torch's FlopCounterMode on one forward
    at batch 1 (matmuls, convolutions and attention; elementwise ops and norms are not counted).
    Returns (flops, "flop_counter"); if counting fails, (2 × parameter count, "parameters"), a
    rough stand-in, and a warning says so."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        param = next(network.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        device = param.device if param is not None else torch.device("cpu")
        x = torch.zeros(1, *shape, dtype=dtype, device=device)
        t = torch.full((1,), float(label), dtype=dtype, device=device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            network(x, t)
        flops = float(counter.get_total_flops())
        if flops > 0:
            return flops, "flop_counter"
        reason = "the counter found no FLOPs"
    except Exception as exc:  # any failure of the counter falls back to the parameter count
        reason = f"{type(exc).__name__}: {exc}"
    import warnings

    params = sum(p.numel() for p in network.parameters())
    if params == 0:
        raise ValueError(f"cannot measure the FLOPs of {type(network).__name__} ({reason}) and it has no parameters")
    warnings.warn(f"FLOP counting failed ({reason}); using 2 x parameter count as the cost", stacklevel=2)
    return 2.0 * params, "parameters"


# ---------------------------------------------------------------------------------------------
# Probabilities
# ---------------------------------------------------------------------------------------------


def _probability(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)) or not 0 < float(v) <= 1:
        raise ValueError(f"{name} must lie in (0, 1], got {v!r}")
    return float(v)


def check_p(name: str, v: Any) -> None:
    """The option check of ``p``: "auto", a callable p(t), a probability in (0, 1] for every
    correction, or one probability in (0, 1] per correction (its length is checked against the
    levels when the solver is built, still before compute)."""
    if (isinstance(v, str) and v == "auto") or callable(v):
        return
    if isinstance(v, str):
        raise ValueError(f"{name} must be 'auto', a callable p(t), or probabilities in (0, 1], got {v!r}")
    if isinstance(v, Tensor):
        if v.dim() > 1:
            raise ValueError(f"{name} must be a 1-D list of probabilities, got a tensor of shape {tuple(v.shape)}")
        v = v.reshape(-1).tolist()
    if isinstance(v, Sequence):
        for i, p in enumerate(v):
            _probability(f"{name}[{i}]", p)
        return
    _probability(name, v)


def resolve_schedule(p: Any, corrections: int, times: Tensor) -> Tensor:
    """The per-move probabilities (moves, K−1), float64, of constants or a callable p(t) evaluated
    at each move's start time (a Python float); every value checked to lie in (0, 1]."""
    moves = times.shape[0]
    if callable(p):
        rows = []
        for t in times.tolist():
            got = p(t) if corrections else ()
            val = torch.as_tensor(got, dtype=torch.float64).reshape(-1) if corrections else torch.zeros(0)
            if val.shape != (corrections,) or not bool(((val > 0) & (val <= 1)).all()):
                raise ValueError(
                    f"p(t) must return {corrections} probabilities in (0, 1] (one per correction), "
                    f"got {got!r} at t = {t:.6g}"
                )
            rows.append(val.to(torch.float64))
        return torch.stack(rows) if rows else torch.zeros(0, corrections, dtype=torch.float64)
    if isinstance(p, Tensor):
        p = p.reshape(-1).tolist() if p.dim() else float(p)
    if isinstance(p, Sequence):
        if len(p) != corrections:
            raise ValueError(
                f"p must give one probability per correction: {corrections + 1} level(s) have {corrections} "
                f"correction(s) (p[k] is that of f_(k+2) − f_(k+1)), got {len(p)}: {list(p)!r}"
            )
        vals = [_probability(f"p[{i}]", v) for i, v in enumerate(p)]
    else:
        vals = [_probability("p", p)] * corrections
    return torch.tensor(vals, dtype=torch.float64).reshape(1, corrections).expand(moves, corrections).clone()


def expected_cost(schedule: Tensor, costs: Sequence[float]) -> float:
    """Expected compute per sample of the moves (denoise excluded): per move
    c_1 + Σ_{k≥2} c_k·(1 − (1 − p_{k−1})(1 − p_k)) with p_K := 0."""
    c = torch.tensor(costs, dtype=torch.float64)
    moves = schedule.shape[0]
    if len(costs) == 1:
        return float(c[0]) * moves
    pad = torch.zeros(moves, 1, dtype=torch.float64)
    below = schedule  # p_{k−1} for k = 2..K
    above = torch.cat([schedule[:, 1:], pad], dim=1)  # p_k for k = 2..K (p_K = 0)
    need = 1.0 - (1.0 - below) * (1.0 - above)
    return float(c[0] * moves + (need * c[1:]).sum())


def step_gain(sde: SDE, base: str, eta: float, t: Tensor, t_next: Tensor) -> Tensor:
    """a_i per move (moves,): the change of the base step's result per unit change of the score
    (both steps are affine in the score), so a score error e moves x by a_i·e."""
    from .solvers.ddim import posterior_step

    x = torch.zeros(t.shape[0], 1, dtype=torch.float64)
    one = torch.ones_like(x)
    if base == "em":
        h = broadcast_to_rows(t - t_next, x)
        return (-h * (sde.reverse_drift(x, t, one) - sde.reverse_drift(x, t, x))).reshape(-1)
    hi = posterior_step(sde, x, sde.denoise(x, t, one), t, t_next, eta, torch.zeros_like(x))
    lo = posterior_step(sde, x, sde.denoise(x, t, x), t, t_next, eta, torch.zeros_like(x))
    return (hi - lo).reshape(-1)


def allocate(weight: Tensor, marginal: Tensor, budget: float, p_min: float) -> Tensor:
    """The theory rule with a variance budget: minimise Σ p·c̄ subject to Σ w²(1/p − 1) ≤ budget,
    i.e. p = min(1, w/(μ·√c̄)) with μ set by the budget over the uncapped entries (water-filling),
    floored at p_min. ``weight`` (moves, K−1): the std w = a_i·D_k(t_i) of one correction's
    contribution; ``marginal`` (K−1,): the cost c̄_k of drawing correction k."""
    sq = marginal.sqrt().expand_as(weight)
    free = weight > 0
    p = torch.zeros_like(weight)  # a correction that is always 0 adds no variance: p_min
    for _ in range(64):
        if not bool(free.any()):
            break
        mu = (budget + (weight[free] ** 2).sum()) / (weight[free] * sq[free]).sum()
        p = torch.where(free, weight / (mu * sq), torch.where(weight > 0, 1.0, 0.0).to(weight))
        capped = free & (p >= 1.0)
        if not bool(capped.any()):
            break
        free = free & ~capped
    return p.clamp(min=p_min, max=1.0)


def flow_gain(sde: SDE, grid: Tensor, var: float, kappa: float) -> Tensor:
    """(moves,) the gain from each move's start to t_end of the reverse flow (kappa = 1: the reverse
    SDE; ½: the PF-ODE) for Gaussian data of variance ``var`` per dimension, whose score has slope
    −1/v(t), v = m²·var + σ²: exp(−∫ (f′ + kappa·g²/v) du) from t_end to t, with f′ the drift's slope."""
    t_end, t_top = float(grid[-1]), float(grid[0])
    u = torch.linspace(t_end, t_top, 4001, dtype=torch.float64)
    one = torch.ones(u.shape[0], 1, dtype=torch.float64)
    slope = sde.drift(one, u).reshape(-1)
    v = sde.mean_coeff(u) ** 2 * var + sde.marginal_std(u) ** 2
    rate = slope + kappa * sde.diffusion(u) ** 2 / v
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(0.5 * (rate[1:] + rate[:-1]) * u.diff(), 0)])
    t = grid[:-1].to(torch.float64).clamp(t_end, t_top)
    j = torch.searchsorted(u, t).clamp(1, u.shape[0] - 1)
    w = (t - u[j - 1]) / (u[j] - u[j - 1])
    return torch.exp(-(cum[j - 1] + w * (cum[j] - cum[j - 1])))


def auto_schedule(
    levels: Levels,
    sde: SDE,
    like: Tensor,
    grid: Tensor,
    *,
    base: str,
    eta: float,
    budget: float,
    p_min: float,
    buckets: int,
    samples: int,
) -> tuple[Tensor, dict[str, Any]]:
    """``p="auto"``: a calibration pass, then the theory rule.

    The pass runs ``samples`` pilot trajectories (fixed seed) with the coarsest level by ancestral
    (DDPM posterior) moves through one time per bucket (the middle move of each of ``buckets``
    groups of consecutive moves) to t_end, and at each bucket time evaluates every level to measure
    D_k(t), the RMS per dimension of f_{k+1} − f_k. S(t) is the squared gain of the reverse flow
    from t to t_end for Gaussian data with the pilot's final variance (:func:`flow_gain`), since the
    flow damps early errors (a twin pilot would measure the coarsest level's own, much rougher,
    Jacobian instead; with well-separated modes the Gaussian gain underestimates what early noise
    costs, through mode switches). Each move i then gets p_k = min(1, w/(μ√c̄_k)),
    w = a_i·D_k(t_i)·√S(t_i) (a_i: the base step's gain on the score), c̄_1 = c_2 and c̄_k = c_k + c_{k+1} (level 1 is paid anyway), μ set by ``budget``: the
    randomisation's added mean squared error per dimension at t_end to first order,
    Σ_i Σ_k w²(1/p − 1) (the water-filling of :func:`allocate`); floored at p_min. Returns the
    schedule (moves, K−1) and the calibration record (times, D, S, evaluations, cost)."""
    from .solvers.ddim import posterior_step

    moves = grid.shape[0] - 1
    nb = max(1, min(buckets, moves))
    edges = [round(b * moves / nb) for b in range(nb + 1)]
    mids = [(edges[b] + edges[b + 1] - 1) // 2 for b in range(nb)]
    rep = grid[mids]
    counters = [CountingScore(f, samples, cost=c) for f, c in zip(levels.scores, levels.costs)]
    src = NoiseSource.from_seed(CALIBRATION_SEED, samples)
    dt, dev, shape = like.dtype, like.device, like.shape[1:]
    times = [float(sde.T), *(float(v) for v in rep), float(grid[-1])]  # pilot move j: times[j] → times[j+1]
    zs = [src.normal(shape, Stream.PROBE, j + 1, dtype=dt, device=dev) for j in range(nb + 1)]

    def move(x: Tensor, j: int, score: Tensor) -> Tensor:
        """Pilot move j by the DDPM posterior step with the coarsest level's score at times[j]."""
        if not times[j + 1] < times[j]:
            return x
        tt = per_row(times[j], samples, dt, dev)
        return posterior_step(
            sde, x, sde.denoise(x, tt, score), tt, per_row(times[j + 1], samples, dt, dev), 1.0, zs[j]
        )

    def at(j: int) -> Tensor:
        return per_row(times[j], samples, dt, dev)

    x = sde.prior_sample(src.normal(shape, Stream.PRIOR, 0, dtype=dt, device=dev))
    if times[1] < times[0]:
        x = move(x, 0, counters[0](x, at(0)))
    d = math.prod(shape)
    diffs = torch.zeros(nb, len(levels) - 1, dtype=torch.float64)
    for b in range(nb):
        raw = [c(x, at(b + 1)) for c in counters]
        outs = [r.reshape(samples, -1).to(torch.float64) for r in raw]
        for k in range(len(levels) - 1):
            diffs[b, k] = ((outs[k + 1] - outs[k]) ** 2).sum(1).mean().div(d).sqrt()
        x = move(x, b + 1, raw[0])
    # the end state's sensitivity to a perturbation at each move's start (the reverse flow damps
    # early errors): the gain of the flow of Gaussian data with the pilot's variance per dimension
    var = float(x.to(torch.float64).reshape(samples, -1).var(0, unbiased=False).mean())
    sens = flow_gain(sde, grid, var, 1.0 if base == "em" else 0.5 * (1.0 + eta * eta)) ** 2
    bucket_of = torch.zeros(moves, dtype=torch.long)
    for b in range(nb):
        bucket_of[edges[b] : edges[b + 1]] = b
    gain = step_gain(sde, base, eta, grid[:-1], grid[1:]).abs()
    weight = gain[:, None] * diffs[bucket_of] * sens.sqrt()[:, None]
    c = torch.tensor(levels.costs, dtype=torch.float64)
    marginal = torch.cat([c[1:2], c[1:-1] + c[2:]])
    schedule = allocate(weight, marginal, budget, p_min)
    record = {
        "samples": samples,
        "bucket_times": [float(v) for v in rep],
        "diff_rms": [[float(v) for v in row] for row in diffs],
        "data_variance": var,
        "sensitivity": [float(v) for v in sens[mids]],  # at the bucket times
        "nfe_per_level": [float(cc.nfe_per_sample.sum()) for cc in counters],
        "cost": float(sum(float(cc.cost_per_sample.sum()) for cc in counters)),
        "predicted_mse": float(((weight**2) * (1.0 / schedule - 1.0)).sum()),
        "shadow_price": shadow_price(weight, marginal, schedule, p_min),
    }
    return schedule, record


def shadow_price(weight: Tensor, marginal: Tensor, schedule: Tensor, p_min: float) -> float:
    """The rule's marginal MSE per unit of expected cost, w²/(p²·c̄) on the entries strictly between
    p_min and 1 (where the water-filling sets it equal); 0 when no entry is free."""
    c = marginal.expand_as(weight)
    free = (weight > 0) & (schedule < 1.0) & (schedule > p_min)
    if not bool(free.any()):
        return 0.0
    return float((weight[free] ** 2 / (schedule[free] ** 2 * c[free])).median())


def summarise(schedule: Tensor) -> dict[str, list[float]]:
    """Per-correction mean, min and max of a schedule over the moves (JSON-ready)."""
    if schedule.numel() == 0:
        return {"p_mean": [], "p_min": [], "p_max": []}
    return {
        "p_mean": [float(v) for v in schedule.mean(0)],
        "p_min": [float(v) for v in schedule.min(0).values],
        "p_max": [float(v) for v in schedule.max(0).values],
    }

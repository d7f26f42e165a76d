"""ML-EM's probability schedules at sampling time: checking and resolving ``p`` (constants, a
callable, "auto"), the expected cost of a schedule, and the "auto" calibration (the base step's gain on
the score, the reverse flow's gain, the water-filling allocation) with its summary."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..levels import CALIBRATION_SEED, Levels
from ..noise import NoiseSource, Stream
from ..score import CountingScore
from ..sde import SDE, broadcast_to_rows, per_row
from .core.common import posterior_step

__all__ = ["check_p", "resolve_schedule", "expected_cost", "auto_schedule", "allocate", "summarise"]


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

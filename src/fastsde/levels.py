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

from .models import list_models, load_model
from .noise import NoiseSource, Stream
from .score import CountingScore, ScoreFn, check_score_and_process, score_process
from .sde import SDE, per_row

__all__ = [
    "Levels",
    "LevelScores",
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

    #: a hierarchy of scores (``fastsde.score.scores_of`` reads its levels)
    is_hierarchy = True
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

    def flush(self) -> None:
        """Each level's deferred NaN/Inf checks (the same protocol as one counter)."""
        for counter in self.levels:
            counter.flush()

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

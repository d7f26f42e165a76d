"""Multilevel Euler–Maruyama (ML-EM; Jacot 2026, arXiv:2603.24594) over a hierarchy of scores.

At each move, fresh draws B_k ~ Bernoulli(p_k), per sample and independent of the Brownian
increment, give the randomised telescoping score

    s̃ = s_1 + Σ_{k=1}^{K−1} (B_k / p_k)·(s_{k+1} − s_k),      E[s̃] = s_K,

which the base step takes in place of the score: ``base="em"`` the Euler–Maruyama move of the
reverse SDE, ``base="ddim"`` the DDIM move (η = 0: the PF-ODE). Both are affine in the score, so
this is the paper's multilevel drift. Level 1 is evaluated on every row; level k ≥ 2 only on
the rows with B_{k−1} = 1 or B_k = 1 (gather/scatter), each through its own counter, so the compute
saved is real and ``res.cost``/``res.nfe_per_level`` come from the counters. The draws are
Stream.BERNOULLI with the move index as counter (Φ of a keyed normal), so the Brownian path
(Stream.STEP) is plain EM's: with every p = 1 the samples are EM's with f_K (up to summation order).

With a plain score (one level) ``mlem`` is its base solver: EM, or DDIM, on that score.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..artifacts.mlem import MLEMSchedule
from ..levels import LevelScores
from ..noise import Stream
from ..sde import broadcast_to_rows
from .core.context import SolverContext, solver_grid
from .core.controllers import FixedGrid
from .core.options import Option, grid_options, one_of, positive_float, positive_int, unit_interval
from .core.spec import SolverSpec
from .core.stepper import State, Step, Stepper, StepResult
from .ddim import DDIMStepper, _eta
from .em import EulerMaruyama
from .mlem_schedule import auto_schedule, check_p, expected_cost, resolve_schedule, summarise

__all__ = ["MLEM", "MultilevelEM"]


class MultilevelEM(Stepper):
    """ML-EM: the base step (EM or DDIM) on the randomised telescoping score; weak order 1."""

    order = 1.0
    stochastic = True

    def __init__(self, ctx: SolverContext, options: Mapping[str, Any], grid: Tensor | None = None) -> None:
        super().__init__(ctx, options)
        opts = self.options
        self.base = EulerMaruyama(ctx, {}) if opts["base"] == "em" else DDIMStepper(ctx, {"eta": opts["eta"]})
        self.grid = grid if grid is not None else solver_grid(ctx, opts)
        self.counted = ctx.score if isinstance(ctx.score, LevelScores) else None
        self.k = 1 if self.counted is None else len(self.counted.levels)
        p = opts["p"]
        if self.counted is None and (isinstance(p, (list, tuple)) or (isinstance(p, Tensor) and p.dim() == 1)):
            if len(p) != 0:
                raise ValueError(
                    f"p gives {len(p)} probabilit(ies) but a single score has no corrections: pass "
                    "fastsde.Levels([...], costs=[...]) as the score, or leave p out"
                )
        # constants and callables are checked in full now, before any compute
        self.learned = p if isinstance(p, MLEMSchedule) else None
        if self.learned is not None:  # its key was checked against the run by the front door
            self.learned.check_levels(self.k)
            self.schedule = self.learned.probabilities(self.grid[:-1])
        else:
            self.schedule = None if isinstance(p, str) else resolve_schedule(p, self.k - 1, self.grid[:-1])

    def init(self, x: Tensor) -> tuple[State, Tensor | None]:
        """Before the first move: the probe of the levels, the calibration pass for p="auto", the
        record of the schedule and its expected cost."""
        if self.counted is None:
            return {}, None
        opts, levels = self.options, self.counted.spec
        probed = levels.probe(self.sde, x, self.ctx.t_end, self.counted.levels[-1].cond)
        record: dict[str, Any] = {"base": opts["base"], "probe_rows_per_level": probed}
        if self.schedule is None:
            self.schedule, calib = auto_schedule(
                levels,
                self.sde,
                x,
                self.grid,
                base=opts["base"],
                eta=float(opts["eta"]),
                budget=float(opts["budget"]),
                p_min=float(opts["p_min"]),
                buckets=int(opts["buckets"]),
                samples=int(opts["calibration_samples"]),
            )
            record["rule"] = "auto"
            record["budget"] = float(opts["budget"])
            record["calibration"] = calib
        elif self.learned is not None:
            record["rule"] = "learned"
            record["learned"] = self.learned.config()
        else:
            record["rule"] = "callable" if callable(opts["p"]) else "constant"
        self.schedule = self.schedule.to(x.device)
        record["schedule"] = summarise(self.schedule)
        if record["rule"] == "constant":
            record["schedule"]["p"] = [float(v) for v in self.schedule[0]]
        record["expected_cost"] = expected_cost(self.schedule.cpu(), levels.costs)
        self.counted.record = record
        self.ctx.stats["mlem_schedule"] = self.schedule.cpu().clone()
        return {}, None

    def step(self, x: Tensor, s: Step) -> StepResult:
        if self.counted is None:
            return self.base.step(x, s)
        levels = self.counted.levels
        n, dev = x.shape[0], x.device
        p = self.schedule[s.index.to(dev, torch.long)]  # (rows, K−1) float64
        z = s.normal(torch.empty(n, self.k - 1, dtype=torch.float64, device=dev), Stream.BERNOULLI)
        draw = (0.5 * torch.erfc(-z / math.sqrt(2.0))) < p  # Φ(z) is uniform: B_k ~ Bernoulli(p_k)
        rows = torch.arange(n) if s.rows is None else s.rows
        outs = [levels[0](x, s.t, rows=s.rows)]
        for k in range(1, self.k):  # level k+1 (0-based k): fine end of correction k, coarse end of k+1
            need = draw[:, k - 1] if k == self.k - 1 else draw[:, k - 1] | draw[:, k]
            idx = need.nonzero().squeeze(1)
            full = torch.zeros_like(x)
            if idx.numel():
                full[idx] = levels[k](x[idx], s.t[idx], rows=rows[idx.cpu()])
            outs.append(full)
        mixed = outs[0]
        for k in range(self.k - 1):
            w = torch.where(draw[:, k], 1.0 / p[:, k], torch.zeros_like(p[:, k])).to(x.dtype)
            if bool(draw[:, k].any()):
                mixed = mixed + broadcast_to_rows(w, x) * (outs[k + 1] - outs[k])
        inner = dataclasses.replace(s, score=lambda xx, tt: mixed, score0=lambda: mixed)
        return self.base.step(x, inner)


def _build(ctx: SolverContext, opts: dict[str, Any]) -> dict[str, Any]:
    grid = solver_grid(ctx, opts)
    return dict(stepper=MultilevelEM(ctx, opts, grid), controller=FixedGrid(grid))


def _check(opts: dict[str, Any], sde: Any, t_end: float) -> None:
    if opts["base"] == "em" and float(opts["eta"]) != 0.0:
        raise ValueError(f"eta applies to base='ddim' only, got eta={opts['eta']!r} with base='em'")


MLEM = SolverSpec(
    name="mlem",
    build=_build,
    stepper=MultilevelEM,
    options={
        **grid_options(1000, "sde"),
        "p": Option(
            "auto", check_p, "probability per correction: list, number, callable p(t), 'auto' or a fit_mlem schedule"
        ),
        "base": Option("em", one_of("em", "ddim"), "the step the multilevel score feeds: EM or DDIM"),
        "eta": Option(0.0, _eta, "DDIM's η with base='ddim' (0: PF-ODE)"),
        "budget": Option(1e-3, positive_float, "p='auto': added MSE per dimension the randomisation may cost"),
        "p_min": Option(1e-3, unit_interval, "p='auto': floor of every probability"),
        "buckets": Option(10, positive_int(1), "p='auto': time buckets of the calibration pass"),
        "calibration_samples": Option(16, positive_int(1), "p='auto': pilot samples of the calibration pass"),
    },
    summary="multilevel Euler–Maruyama over fastsde.Levels: f1 + Σ (B_k/p_k)(f_{k+1} − f_k), fresh draws per move",
    check=_check,
    artifact=("p", MLEMSchedule),
)

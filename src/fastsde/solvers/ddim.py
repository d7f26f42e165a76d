"""DDIM (Song, Meng, Ermon 2021) in data-prediction form for any process x_t = m·x0 + σ·z.

A move t → s (s < t) with x̂0 the Tweedie estimate at t and ε̂ = (x_t − m_t·x̂0)/σ_t:

    x_s = m_s·x̂0 + √(σ_s² − c²)·ε̂ + c·z,   c = η·σ_s·√(1 − σ̃_s²/σ̃_t²),  σ̃ = σ/m.

For VP (m² + σ² = 1) c is DDIM's σ = η·√((1−ᾱ_s)/(1−ᾱ_t))·√(1 − ᾱ_t/ᾱ_s). η = 0 is deterministic
(Euler on the PF-ODE in (x/m, σ/m), identical to DPM-Solver-1 and to ``euler``); η = 1 is the exact
DDPM posterior q(x_s | x_t, x0 = x̂0), i.e. ancestral sampling. η is limited to [0, 1] so that
σ_s² − c² ≥ 0 on every grid. 1 NFE per move, N NFE with the denoise; the noise of move k is
Stream.STEP with counter k.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from ..noise import Stream
from .base import Option, SolverContext, SolverSpec, grid_options, run_grid, solver_grid
from .discrete import posterior_step

__all__ = ["DDIM", "ddim"]


def ddim(ctx: SolverContext, x: Tensor, *, steps: int, grid: str, rho: float, eta: float) -> Tensor:
    sde = ctx.sde
    eta = float(eta)

    def step(k: int, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        x0 = sde.denoise(x, t, ctx.score(x, t))
        z = ctx.normal(x, Stream.STEP, k) if eta > 0.0 else None
        return posterior_step(sde, x, x0, t, t_next, eta, z)

    return run_grid(ctx, x, solver_grid(ctx, dict(steps=steps, grid=grid, rho=rho)), step, "ddim")


def _eta(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")


DDIM = SolverSpec(
    name="ddim",
    run=ddim,
    options={**grid_options(50, "sde"), "eta": Option(0.0, _eta, "0: deterministic DDIM, 1: ancestral (DDPM)")},
    summary="DDIM in data-prediction form for any m, σ (eta 0 deterministic, 1 ancestral), N NFE with denoise",
    stochastic=False,  # deterministic by default; eta > 0 draws noise
)

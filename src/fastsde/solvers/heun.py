"""Euler and EDM's Heun sampler on the probability-flow ODE in EDM coordinates (Karras et al. 2022, §9).

Any process x_t = m·x0 + σ·z becomes, in x̃ = x/m with noise level σ̃ = σ/m, the EDM process
x̃ = x0 + σ̃·z, whose PF-ODE is dx̃/dσ̃ = (x̃ − x̂0)/σ̃ with x̂0 the Tweedie denoiser
(x + σ²·s)/m. Both samplers step in (x̃, σ̃) between grid points and map back with x = m·x̃.

- ``euler``: x̃' = x̃ + (σ̃' − σ̃)·d, d = (x̃ − x̂0)/σ̃. Deterministic, 1 NFE per move, N NFE with
  the denoise. (This is DDIM with η = 0.)
- ``heun``: EDM's Algorithm 1/2. N grid points give N−1 Heun moves (2 NFE each); EDM's last Euler
  step from σ_min to 0 returns exactly x̂0, which is the front door's Tweedie denoise, so
  NFE = 2N − 1 (2N − 2 with denoise=False). Optional churn (EDM §9.4): on grid points with
  σ̃ ∈ [s_tmin, s_tmax] the noise level is raised to σ̂ = σ̃(1 + γ), γ = min(s_churn/N, √2 − 1), by
  adding √(σ̂² − σ̃²)·s_noise·ε (Stream.STEP, counter k), and the Heun move starts from σ̂. The churned
  level can exceed the top of the grid (as in EDM); the score is then evaluated at the time
  t_from_edm_sigma(σ̂), beyond T, which an exact score handles and a trained one may not
  (EDM's own ImageNet setting keeps s_tmax below σ_max for this reason). s_tmin and s_tmax are
  EDM noise levels σ̃ = σ/m, not times.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..noise import Stream
from ..sde import SDE, broadcast_to_rows
from .base import (
    Option,
    SolverContext,
    SolverSpec,
    grid_options,
    nonnegative_float,
    run_grid,
    solver_grid,
)

__all__ = ["EULER", "HEUN", "euler", "heun", "edm_direction"]


def edm_direction(ctx: SolverContext, x_tilde: Tensor, t: Tensor) -> Tensor:
    """d = dx̃/dσ̃ = (x̃ − x̂0)/σ̃ at time t (one NFE)."""
    sde = ctx.sde
    m = broadcast_to_rows(sde.mean_coeff(t), x_tilde)
    x = m * x_tilde
    x0 = sde.denoise(x, t, ctx.score(x, t))
    return (x_tilde - x0) / broadcast_to_rows(sde.edm_sigma(t), x_tilde)


def euler(ctx: SolverContext, x: Tensor, *, steps: int, grid: str, rho: float) -> Tensor:
    sde = ctx.sde

    def step(k: int, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        xt = x / broadcast_to_rows(sde.mean_coeff(t), x)
        dsig = broadcast_to_rows(sde.edm_sigma(t_next) - sde.edm_sigma(t), x)
        return broadcast_to_rows(sde.mean_coeff(t_next), x) * (xt + dsig * edm_direction(ctx, xt, t))

    return run_grid(ctx, x, solver_grid(ctx, dict(steps=steps, grid=grid, rho=rho)), step, "euler")


def heun(
    ctx: SolverContext,
    x: Tensor,
    *,
    steps: int,
    grid: str,
    rho: float,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
) -> Tensor:
    sde = ctx.sde
    gamma_max = min(s_churn / steps, math.sqrt(2.0) - 1.0)

    def step(k: int, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        sig = sde.edm_sigma(t)
        sig_next = broadcast_to_rows(sde.edm_sigma(t_next), x)
        xt = x / broadcast_to_rows(sde.mean_coeff(t), x)
        if gamma_max > 0.0:
            churn = (sig >= s_tmin) & (sig <= s_tmax)
            sig_hat = torch.where(churn, sig * (1.0 + gamma_max), sig)
            if bool(churn.any()):
                add = broadcast_to_rows((sig_hat**2 - sig**2).clamp_min(0.0).sqrt(), x)
                xt = xt + add * s_noise * ctx.normal(x, Stream.STEP, k)
                t = torch.where(churn, sde.t_from_edm_sigma(sig_hat), t)
            sig = sig_hat
        sig = broadcast_to_rows(sig, x)
        d = edm_direction(ctx, xt, t)
        x_euler = xt + (sig_next - sig) * d
        d_next = edm_direction(ctx, x_euler, t_next)
        xt_next = xt + (sig_next - sig) * 0.5 * (d + d_next)
        return broadcast_to_rows(sde.mean_coeff(t_next), x) * xt_next

    return run_grid(ctx, x, solver_grid(ctx, dict(steps=steps, grid=grid, rho=rho)), step, "heun")


def _noise_level_or_inf(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0 or v == -math.inf:
        raise ValueError(f"{name} must be a number >= 0 (inf allowed), got {v!r}")


def _check_churn_window(opts: dict, sde: SDE, t_end: float) -> None:
    if opts["s_tmin"] > opts["s_tmax"]:
        raise ValueError(f"s_tmin must be <= s_tmax, got s_tmin={opts['s_tmin']!r}, s_tmax={opts['s_tmax']!r}")


EULER = SolverSpec(
    name="euler",
    run=euler,
    options=grid_options(50, "ode"),
    summary="Euler on the probability-flow ODE in EDM coordinates (x/m against σ/m), N NFE with denoise",
)

HEUN = SolverSpec(
    name="heun",
    run=heun,
    options={
        **grid_options(18, "ode"),
        "s_churn": Option(0.0, nonnegative_float, "EDM churn S_churn (0: deterministic)"),
        "s_tmin": Option(0.0, _noise_level_or_inf, "lowest noise level σ/m that is churned"),
        "s_tmax": Option(math.inf, _noise_level_or_inf, "highest noise level σ/m that is churned"),
        "s_noise": Option(1.0, nonnegative_float, "EDM S_noise: scale of the churn noise"),
    },
    summary="EDM's Heun sampler in EDM coordinates (optional churn), 2N−1 NFE with denoise",
    stochastic=False,  # deterministic by default; s_churn > 0 draws noise
    check=_check_churn_window,
)

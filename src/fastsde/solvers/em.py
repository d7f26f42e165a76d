"""Euler–Maruyama on the reverse SDE (Song et al. 2021, with the true grid spacing).

N grid points from T to t_end give N−1 steps x ← x − h·b(x, t) + g(t)·√h·z with
b = f − g²·s; with the final denoise the cost is N NFE.
"""

from __future__ import annotations

from torch import Tensor

from ..noise import Stream
from ..sde import broadcast_to_rows
from .base import SolverContext, SolverSpec, grid_options, run_grid, solver_grid


def em(ctx: SolverContext, x: Tensor, *, steps: int, grid: str, rho: float) -> Tensor:
    sde = ctx.sde

    def step(k: int, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        h = broadcast_to_rows(t - t_next, x)
        drift = sde.reverse_drift(x, t, ctx.score(x, t))
        g = broadcast_to_rows(sde.diffusion(t), x)
        return x - h * drift + g * h.sqrt() * ctx.normal(x, Stream.STEP, k)

    return run_grid(ctx, x, solver_grid(ctx, dict(steps=steps, grid=grid, rho=rho)), step, "em")


EM = SolverSpec(
    name="em",
    run=em,
    options=grid_options(1000, "sde"),
    summary="Euler–Maruyama on the reverse SDE, N−1 steps on the grid + denoise",
    stochastic=True,
)

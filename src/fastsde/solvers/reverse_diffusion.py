"""Song et al.'s reverse-diffusion predictor (Score SDE §5, §6.2–6.3); the ancestral predictor is in
``ancestral``.

Song's reference code reads the DDPM/SMLD tables at an index i = floor(t·(N−1)/T); that is exact only
on his own grid linspace(T, ε, N). Here the discrete quantities are the ones *implied by the grid*
between consecutive points t_k > t_{k+1}, so the predictors are exact on any grid and equal Song's
tables on his grid as N grows:

- VE: σ_i = σ(t_k), σ_{i−1} = σ(t_{k+1});
- VP: β_i = 1 − m(t_k)²/m(t_{k+1})² (the one-step DDPM β between the two points), α_i = 1 − β_i;
- sub-VP and EDM (no table of their own): the generic rule f_i = f(x, t_k)·h, G_i = g(t_k)·√h with
  h = t_k − t_{k+1}.

Reverse diffusion: x ← x − f_i + G_i²·s + G_i·z (VE: x + (σ_i² − σ_{i−1}²)s + √(σ_i² − σ_{i−1}²)z;
VP: (2 − √α_i)x + β_i·s + √β_i·z).

Every predictor costs one score evaluation per move, so N grid points cost N NFE with the denoise.
The noise of move k is Stream.STEP with counter k.
"""

from __future__ import annotations

from torch import Tensor

from ..sde import SDE, VESDE, VPSDE, broadcast_to_rows, grid_beta
from .core.options import grid_options
from .core.spec import SolverSpec, fixed_grid
from .core.stepper import Step, Stepper, StepResult

__all__ = ["REVERSE_DIFFUSION", "ReverseDiffusion", "reverse_diffusion_move"]


def reverse_diffusion_move(sde: SDE, x: Tensor, s: Step) -> Tensor:
    """One reverse-diffusion move x ← x − f_i + G_i²·s + G_i·z with grid-implied f_i, G_i (1 NFE)."""
    t, t_next = s.t, s.t_next
    score = s.score(x, t)
    z = s.normal(x)
    if isinstance(sde, VESDE):
        var = broadcast_to_rows(sde.marginal_std(t) ** 2 - sde.marginal_std(t_next) ** 2, x)
        return x + var * score + var.sqrt() * z
    if isinstance(sde, VPSDE):
        beta = broadcast_to_rows(grid_beta(sde, t, t_next), x)
        return (2.0 - (1.0 - beta).sqrt()) * x + beta * score + beta.sqrt() * z
    h = broadcast_to_rows(t - t_next, x)
    g2h = broadcast_to_rows(sde.diffusion(t) ** 2, x) * h
    return x - h * sde.drift(x, t) + g2h * score + g2h.sqrt() * z


class ReverseDiffusion(Stepper):
    """Song's reverse-diffusion predictor: weak order 1, one evaluation per move."""

    order = 1.0
    stochastic = True

    def step(self, x: Tensor, s: Step) -> StepResult:
        return StepResult(x=reverse_diffusion_move(self.sde, x, s))


REVERSE_DIFFUSION = SolverSpec(
    name="reverse_diffusion",
    build=fixed_grid(ReverseDiffusion),
    stepper=ReverseDiffusion,
    options=grid_options(1000, "sde"),
    summary="Song's reverse-diffusion predictor with grid-implied σ_i / β_i, N−1 moves + denoise",
)

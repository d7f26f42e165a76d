"""Song et al.'s ancestral predictor (Score SDE §6.3), with the discrete quantities implied by the
grid between consecutive points t_k > t_{k+1} (see ``reverse_diffusion``):

VE x ← x + (σ_i² − σ_{i−1}²)s + σ_{i−1}·√(σ_i² − σ_{i−1}²)/σ_i·z; VP x ← (x + β_i·s)/√α_i + √β_i·z.
Song defines no ancestral step for sub-VP or EDM; for those this module takes the exact DDPM
posterior step of x_t = m·x0 + σ·z with x0 replaced by its Tweedie estimate, which is DDIM with
η = 1 (and coincides with Song's VE rule when m = 1).

One evaluation per move: N grid points cost N NFE with the denoise. The noise of move k is
Stream.STEP with counter k.
"""

from __future__ import annotations

from torch import Tensor

from ..sde import SDE, VESDE, VPSDE, broadcast_to_rows, grid_beta
from .core.common import posterior_step
from .core.options import grid_options
from .core.spec import SolverSpec, fixed_grid
from .core.stepper import Step, Stepper, StepResult

__all__ = ["ANCESTRAL", "Ancestral", "ancestral_move"]


def ancestral_move(sde: SDE, x: Tensor, s: Step) -> Tensor:
    """One ancestral move: Song's VE/VP rule with grid-implied σ_i, β_i; the DDPM posterior otherwise."""
    t, t_next = s.t, s.t_next
    score = s.score(x, t)
    z = s.normal(x)
    if isinstance(sde, VESDE):
        sig2 = broadcast_to_rows(sde.marginal_std(t) ** 2, x)
        sig2_next = broadcast_to_rows(sde.marginal_std(t_next) ** 2, x)
        var = sig2 - sig2_next
        return x + var * score + (sig2_next * var / sig2).sqrt() * z
    if isinstance(sde, VPSDE):
        beta = broadcast_to_rows(grid_beta(sde, t, t_next), x)
        return (x + beta * score) / (1.0 - beta).sqrt() + beta.sqrt() * z
    return posterior_step(sde, x, sde.denoise(x, t, score), t, t_next, 1.0, z)


class Ancestral(Stepper):
    """Ancestral sampling: weak order 1, one evaluation per move."""

    order = 1.0
    stochastic = True

    def step(self, x: Tensor, s: Step) -> StepResult:
        return StepResult(x=ancestral_move(self.sde, x, s))


ANCESTRAL = SolverSpec(
    name="ancestral",
    build=fixed_grid(Ancestral),
    stepper=Ancestral,
    options=grid_options(1000, "sde"),
    summary="Song's ancestral predictor (VE, VP); exact DDPM posterior step for sub-VP and EDM",
)

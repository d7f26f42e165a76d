"""Euler on the probability-flow ODE in EDM coordinates (Karras et al. 2022, §9).

Any process x_t = m·x0 + σ·z becomes, in x̃ = x/m with noise level σ̃ = σ/m, the EDM process
x̃ = x0 + σ̃·z, whose PF-ODE is dx̃/dσ̃ = (x̃ − x̂0)/σ̃ with x̂0 the Tweedie denoiser (x + σ²·s)/m.
Euler steps x̃' = x̃ + (σ̃' − σ̃)·d, d = (x̃ − x̂0)/σ̃, between grid points and maps back with
x = m·x̃. Deterministic, order 1, 1 NFE per move, N NFE with the denoise. (This is DDIM with
η = 0.) EDM's Heun is in ``heun``.
"""

from __future__ import annotations

from torch import Tensor

from ..sde import broadcast_to_rows
from .core.common import edm_direction
from .core.options import grid_options
from .core.spec import SolverSpec, fixed_grid
from .core.stepper import Step, Stepper, StepResult, denoised

__all__ = ["EULER", "Euler", "edm_direction"]


class Euler(Stepper):
    """Euler in EDM coordinates: order 1, one evaluation per move."""

    order = 1.0
    #: from m = 0, x̃ = x/m is infinite; the same Euler move written in x is x' = m'·x̂0 + σ'·ε̂ with
    #: ε̂ = (x − m·x̂0)/σ (x' = x + (σ' − σ)·v on a rectified flow, diffusers' FlowMatchEuler step)
    singular_start = True

    def step(self, x: Tensor, s: Step) -> StepResult:
        sde = self.sde
        if self.singular_move(s):
            x0 = denoised(sde, s, x, s.t, singular=True)
            eps = (x - broadcast_to_rows(sde.mean_coeff(s.t), x) * x0) / broadcast_to_rows(sde.marginal_std(s.t), x)
            m_next, sig_next = sde.mean_coeff(s.t_next), sde.marginal_std(s.t_next)
            return StepResult(x=broadcast_to_rows(m_next, x) * x0 + broadcast_to_rows(sig_next, x) * eps, x0_hat=x0)
        xt = x / broadcast_to_rows(sde.mean_coeff(s.t), x)
        dsig = broadcast_to_rows(sde.edm_sigma(s.t_next) - sde.edm_sigma(s.t), x)
        return StepResult(
            x=broadcast_to_rows(sde.mean_coeff(s.t_next), x) * (xt + dsig * edm_direction(sde, s, xt, s.t))
        )


EULER = SolverSpec(
    name="euler",
    build=fixed_grid(Euler),
    stepper=Euler,
    options=grid_options(50, "ode"),
    summary="Euler on the probability-flow ODE in EDM coordinates (x/m against σ/m), N NFE with denoise",
)

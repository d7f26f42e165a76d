"""Euler–Maruyama on the reverse SDE (Song et al. 2021, with the true grid spacing).

N grid points from T to t_end give N−1 steps x ← x − h·b(x, t) + g(t)·√h·z with
b = f − g²·s; with the final denoise the cost is N NFE. The noise of move k is Stream.STEP with
counter k.
"""

from __future__ import annotations

from torch import Tensor

from ..sde import SDE, broadcast_to_rows
from .core.options import grid_options
from .core.spec import SolverSpec, fixed_grid
from .core.stepper import Step, Stepper, StepResult

__all__ = ["EM", "EulerMaruyama", "em_move"]


def em_move(sde: SDE, x: Tensor, s: Step) -> Tensor:
    """One Euler–Maruyama move of the reverse SDE from s.t to s.t_next (1 NFE)."""
    h = broadcast_to_rows(s.t - s.t_next, x)
    drift = sde.reverse_drift(x, s.t, s.score(x, s.t))
    g = broadcast_to_rows(sde.diffusion(s.t), x)
    return x - h * drift + g * h.sqrt() * s.normal(x)


class EulerMaruyama(Stepper):
    """Euler–Maruyama: weak order 1, one evaluation per step."""

    order = 1.0
    stochastic = True

    def step(self, x: Tensor, s: Step) -> StepResult:
        return StepResult(x=em_move(self.sde, x, s))


EM = SolverSpec(
    name="em",
    build=fixed_grid(EulerMaruyama),
    stepper=EulerMaruyama,
    options=grid_options(1000, "sde"),
    summary="Euler–Maruyama on the reverse SDE, N−1 steps on the grid + denoise",
)

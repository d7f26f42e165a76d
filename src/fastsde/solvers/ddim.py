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
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .core.common import posterior_step
from .core.options import Option, grid_options
from .core.spec import SolverSpec, fixed_grid
from .core.stepper import Step, Stepper, StepResult, denoised

__all__ = ["DDIM", "DDIMStepper", "posterior_step"]


class DDIMStepper(Stepper):
    """DDIM: order 1 on the PF-ODE (η = 0); weak order 1 on the ancestral chain (η > 0)."""

    order = 1.0
    singular_start = True  # from m = 0 the move is x_s = m_s·x̂0 + σ_s·ε̂ (ε̂ = x, e^{−h} = 0): exact in x̂0

    @classmethod
    def declared_stochastic(cls, options: Mapping[str, Any]) -> bool:
        return float(options.get("eta") or 0.0) > 0.0

    def step(self, x: Tensor, s: Step) -> StepResult:
        eta = float(self.options["eta"])
        x0 = denoised(self.sde, s, x, s.t, self.singular_move(s))
        z = s.normal(x) if eta > 0.0 else None
        return StepResult(x=posterior_step(self.sde, x, x0, s.t, s.t_next, eta, z), x0_hat=x0)


def _eta(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")


DDIM = SolverSpec(
    name="ddim",
    build=fixed_grid(DDIMStepper),
    stepper=DDIMStepper,
    options={**grid_options(50, "sde"), "eta": Option(0.0, _eta, "0: deterministic DDIM, 1: ancestral (DDPM)")},
    summary="DDIM in data-prediction form for any m, σ (eta 0 deterministic, 1 ancestral), N NFE with denoise",
)

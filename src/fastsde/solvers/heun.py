"""EDM's Heun sampler on the probability-flow ODE in EDM coordinates (Karras et al. 2022, §9).

Any process x_t = m·x0 + σ·z becomes, in x̃ = x/m with noise level σ̃ = σ/m, the EDM process
x̃ = x0 + σ̃·z, whose PF-ODE is dx̃/dσ̃ = (x̃ − x̂0)/σ̃ with x̂0 the Tweedie denoiser
(x + σ²·s)/m. Both samplers step in (x̃, σ̃) between grid points and map back with x = m·x̃.

- ``euler`` (module ``euler``): x̃' = x̃ + (σ̃' − σ̃)·d, d = (x̃ − x̂0)/σ̃.
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
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..sde import SDE, broadcast_to_rows
from .core.common import edm_direction
from .core.options import Option, grid_options, nonnegative_float
from .core.spec import SolverSpec, fixed_grid
from .core.stepper import Step, Stepper, StepResult

__all__ = ["HEUN", "Heun"]


class Heun(Stepper):
    """EDM's Heun: order 2 on the PF-ODE, two evaluations per move; stochastic with churn."""

    order = 2.0
    nfe_per_step = 2

    @classmethod
    def declared_stochastic(cls, options: Mapping[str, Any]) -> bool:
        return float(options.get("s_churn") or 0.0) > 0.0 and float(options.get("s_noise", 1.0) or 0.0) > 0.0

    def step(self, x: Tensor, s: Step) -> StepResult:
        sde, o = self.sde, self.options
        gamma_max = min(o["s_churn"] / o["steps"], math.sqrt(2.0) - 1.0)
        t, t_next = s.t, s.t_next
        sig = sde.edm_sigma(t)
        sig_next = broadcast_to_rows(sde.edm_sigma(t_next), x)
        xt = x / broadcast_to_rows(sde.mean_coeff(t), x)
        if gamma_max > 0.0:
            churn = (sig >= o["s_tmin"]) & (sig <= o["s_tmax"])
            sig_hat = torch.where(churn, sig * (1.0 + gamma_max), sig)
            if bool(churn.any()):
                add = broadcast_to_rows((sig_hat**2 - sig**2).clamp_min(0.0).sqrt(), x)
                xt = xt + add * o["s_noise"] * s.normal(x)
                t = torch.where(churn, sde.t_from_edm_sigma(sig_hat), t)
            sig = sig_hat
        sig = broadcast_to_rows(sig, x)
        d = edm_direction(sde, s, xt, t)
        x_euler = xt + (sig_next - sig) * d
        d_next = edm_direction(sde, s, x_euler, t_next)
        xt_next = xt + (sig_next - sig) * 0.5 * (d + d_next)
        return StepResult(x=broadcast_to_rows(sde.mean_coeff(t_next), x) * xt_next)


def _noise_level_or_inf(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0 or v == -math.inf:
        raise ValueError(f"{name} must be a number >= 0 (inf allowed), got {v!r}")


def _check_churn_window(opts: dict, sde: SDE, t_end: float) -> None:
    if opts["s_tmin"] > opts["s_tmax"]:
        raise ValueError(f"s_tmin must be <= s_tmax, got s_tmin={opts['s_tmin']!r}, s_tmax={opts['s_tmax']!r}")


HEUN = SolverSpec(
    name="heun",
    build=fixed_grid(Heun),
    stepper=Heun,
    options={
        **grid_options(18, "ode"),
        "s_churn": Option(0.0, nonnegative_float, "EDM churn S_churn (0: deterministic)"),
        "s_tmin": Option(0.0, _noise_level_or_inf, "lowest noise level σ/m that is churned"),
        "s_tmax": Option(math.inf, _noise_level_or_inf, "highest noise level σ/m that is churned"),
        "s_noise": Option(1.0, nonnegative_float, "EDM S_noise: scale of the churn noise"),
    },
    summary="EDM's Heun sampler in EDM coordinates (optional churn), 2N−1 NFE with denoise",
    check=_check_churn_window,
)

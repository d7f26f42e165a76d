"""DEIS-tAB (Zhang & Chen 2022): the exponential integrator of the probability-flow ODE in noise
(ε) form, with ε̂ extrapolated by a polynomial in the process time t.

For x_t = m·x0 + σ·z the PF-ODE in ε form is exactly linear in x: with x̃ = x/m and σ̃ = σ/m it is
dx̃ = ε̂ dσ̃ (the exponential factor m_{t'}/m_t is applied exactly). A move t_i → t_{i+1} with the
k = min(i + 1, order) latest evaluations (nodes t_i, …, t_{i−k+1}):

    x̃_{i+1} = x̃_i + Σ_{j<k} C_j·ε̂_{i−j},   C_j = ∫_{σ̃_i}^{σ̃_{i+1}} ℓ_j(t(σ̃)) dσ̃,

ℓ_j the Lagrange basis polynomial in t, t(σ̃) the process's inverse noise level; the integrals are
taken per sample by 8-point Gauss–Legendre in σ̃ (float64). Order 1 is DDIM (η = 0); on EDM, where
t = σ̃, tAB-k is ``lms`` of order k.

Warm start: orders 1, 2 on the first two moves. Final-step policy: every move at full order, then
the front door's Tweedie denoise at t_end (1 NFE). 1 NFE per move: N grid points cost N NFE with the
denoise. Order = ``order`` (default 3). Default grid: uniform in log-SNR (Karras ρ = 7 on EDM).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .adams import EDMAdams
from .core.common import lagrange_integrals
from .core.options import Option, grid_options, one_of
from .core.spec import SolverSpec, fixed_grid
from .core.stepper import Step

__all__ = ["DEIS", "DEISStepper"]

#: Gauss–Legendre points per move for the coefficient integrals.
QUADRATURE_POINTS = 8


class DEISStepper(EDMAdams):
    """DEIS-tAB of order ``order``: ε̂ extrapolated in t, integrated against dσ̃; 1 NFE per move."""

    order = 3.0

    @classmethod
    def declared_order(cls, options: Mapping[str, Any]) -> float:
        return float(options.get("order", 3))

    def max_order(self) -> int:
        return int(self.options["order"])

    def node(self, t64: Tensor) -> Tensor:
        return t64

    def weights(self, k: int, nodes: Tensor, s: Step, sig: Tensor, sig_next: Tensor) -> Tensor:
        if k == 1:
            return (sig_next - sig)[:, None]
        return lagrange_integrals(nodes, sig, sig_next, QUADRATURE_POINTS, to_node=self.sde.t_from_edm_sigma)


DEIS = SolverSpec(
    name="deis",
    build=fixed_grid(DEISStepper),
    stepper=DEISStepper,
    options={
        **grid_options(20, "exp"),
        "order": Option(3, one_of(1, 2, 3), "polynomial order of the ε̂ extrapolation in t"),
    },
    summary="DEIS-tAB: exponential integrator in ε form, ε̂ extrapolated in t, N NFE with denoise",
)

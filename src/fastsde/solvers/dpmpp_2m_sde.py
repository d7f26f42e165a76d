"""SDE-DPM-Solver++(2M) (Lu et al. 2022, the reverse-SDE variant of DPM-Solver++(2M)): a second-order
multistep exponential integrator of the reverse SDE in data-prediction form, for any process
x_t = m·x0 + σ·z with half log-SNR λ = log(m/σ).

Exact step of the reverse family dx = [f − (1+η)/2·g²·s] dt + √η·g dw̄ (Song's family with λ² = η:
η = 1 is the reverse SDE, η = 0 the PF-ODE; every η ≥ 0 has the data marginals). For a move s → t
with h = λ_t − λ_s > 0 and k = (1+η)h, writing x̂0 for the data prediction along the path,

    x_t = (σ_t/σ_s)·e^{−ηh}·x_s + m_t·e^{−(1+η)λ_t}∫_{λ_s}^{λ_t}(1+η)e^{(1+η)λ} x̂0 dλ + σ_t√(1 − e^{−2ηh})·z.

First order freezes x̂0 at x̂0_s: x_t = (σ_t/σ_s)e^{−ηh}x_s + m_t(1 − e^{−k})x̂0_s + noise.
Second order (multistep) adds a term in the slope D = (x̂0_s − x̂0_p)/h_p per unit λ, from the
previous point p:
- ``midpoint`` (k-diffusion's and diffusers' default): ½·m_t(1 − e^{−k})·h·D;
- ``heun``: the exact integral of x̂0 linear in λ through the two points, m_t·h·(1 − (1 − e^{−k})/k)·D.

The first move is first order (no history); with ``lower_order_final`` (default) the last move is also
first order when there are fewer than 15 moves, as for ``dpmpp_2m``. 1 NFE per move: N grid points
cost N NFE with the denoise.

``corrector=True`` (not in k-diffusion; the predictor–corrector idea of UniPC and SA-Solver, here for
the η-family in λ): when move k evaluates x̂0 at its start x_k (which move k − 1 predicted), it first
redoes move k − 1 with x̂0 linear in λ between that move's two ends, x_k ← base_{k−1} +
m_t·h·(1 − (1 − e^{−(1+η)h})/((1+η)h))·(x̂0_k − x̂0_{k−1})/h (base: the first-order part with the
same noise), and then steps on from the corrected x_k with the x̂0_k it has. No extra evaluation;
the last move is not corrected (that would need the score at t_end beyond the final denoise). This
is the corrector of ``adaptive_sde_dpm_2m`` on a fixed grid.

The noise of move k is Stream.STEP with counter k. Default grid: uniform in λ.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..sde import SDE, broadcast_to_rows
from .core.common import first_order_moves, where_rows
from .core.options import Option, boolean, grid_options, nonnegative_float, one_of
from .core.spec import SolverSpec, fixed_grid
from .core.stepper import State, Step, Stepper, StepResult

__all__ = ["DPMPP_2M_SDE", "SDEDPMSolverPP2M", "SDEDPMCoefficients"]


class SDEDPMCoefficients:
    """Per-row coefficients of one SDE-DPM-Solver++ move s → t (float64, shape (n,)).

    ``decay`` multiplies x_s, ``weight`` multiplies x̂0_s, ``noise_std`` multiplies z; ``midpoint`` and
    ``linear`` multiply the slope D = (x̂0_s − x̂0_p)/h_p (per unit λ) in the two second-order forms.
    """

    def __init__(self, sde: SDE, t: Tensor, t_next: Tensor, eta: float) -> None:
        t64, tn64 = t.to(torch.float64), t_next.to(torch.float64)
        lam_s, lam_t = sde.log_snr(t64), sde.log_snr(tn64)
        self.h = lam_t - lam_s
        k = (1.0 + eta) * self.h
        one_minus = -torch.expm1(-k)  # 1 − e^{−(1+η)h}
        m_t = sde.mean_coeff(tn64)
        self.decay = sde.marginal_std(tn64) / sde.marginal_std(t64) * torch.exp(-eta * self.h)
        self.weight = m_t * one_minus
        self.noise_std = sde.marginal_std(tn64) * torch.sqrt(-torch.expm1(-2.0 * eta * self.h))
        # D is a slope per unit λ; the forms' coefficients on it:
        self.midpoint = 0.5 * m_t * one_minus * self.h
        safe_k = torch.where(k > 0, k, torch.ones_like(k))
        self.linear = torch.where(k > 0, m_t * self.h * (1.0 - one_minus / safe_k), torch.zeros_like(k))

    def first_order(self, x: Tensor, x0: Tensor) -> Tensor:
        """The noise-free first-order part of the move: decay·x + weight·x̂0."""
        return broadcast_to_rows(self.decay.to(x.dtype), x) * x + broadcast_to_rows(self.weight.to(x.dtype), x) * x0


class SDEDPMSolverPP2M(Stepper):
    """SDE-DPM-Solver++(2M): weak order 1 on the reverse SDE (η > 0), order 2 on the PF-ODE (η = 0);
    one evaluation per move."""

    order = 1.0

    @classmethod
    def declared_order(cls, options: Mapping[str, Any]) -> float:
        return 2.0 if float(options.get("eta", 1.0)) == 0.0 else 1.0

    @classmethod
    def declared_stochastic(cls, options: Mapping[str, Any]) -> bool:
        return float(options.get("eta", 1.0)) > 0.0

    def init(self, x: Tensor) -> tuple[State, Tensor | None]:
        n, dev = x.shape[0], x.device
        f64 = torch.float64
        return {
            "x0": torch.zeros_like(x),
            "h": torch.zeros(n, dtype=f64, device=dev),
            "base": torch.zeros_like(x),
            "linear": torch.zeros(n, dtype=f64, device=dev),
        }, None

    def reset(self, state: State, rows: Tensor) -> None:
        state["h"][rows.to(state["h"].device)] = 0.0

    def step(self, x: Tensor, s: Step) -> StepResult:
        sde, o = self.sde, self.options
        eta, dt = o["eta"], x.dtype
        coef = SDEDPMCoefficients(sde, s.t, s.t_next, eta)
        x0 = sde.denoise(x, s.t, s.score(x, s.t))
        h_prev, x0_prev = s.get("h"), s.get("x0")
        if o["corrector"]:  # redo the last move with x̂0 linear between its two ends
            has = (s.history > 0) if s.history is not None else h_prev > 0

            def redone() -> Tensor:
                linear = broadcast_to_rows(s.get("linear").to(dt), x)
                return s.get("base") + linear * (x0 - x0_prev) / broadcast_to_rows(h_prev.to(dt), x)

            x = where_rows(not has if isinstance(has, bool) else ~has, x, redone)
        first = first_order_moves(s, h_prev > 0, o["lower_order_final"])
        base = coef.first_order(x, x0)
        if eta > 0.0:
            base = base + broadcast_to_rows(coef.noise_std.to(dt), x) * s.normal(x)
        c = coef.midpoint if o["solver_type"] == "midpoint" else coef.linear

        def second_order() -> Tensor:
            slope = (x0 - x0_prev) / broadcast_to_rows(h_prev.to(dt), x)
            return base + broadcast_to_rows(c.to(dt), x) * slope

        out = where_rows(first, base, second_order)
        return StepResult(x=out, state={"x0": x0, "h": coef.h, "base": base, "linear": coef.linear}, x0_hat=x0)


DPMPP_2M_SDE = SolverSpec(
    name="dpmpp_2m_sde",
    build=fixed_grid(SDEDPMSolverPP2M),
    stepper=SDEDPMSolverPP2M,
    options={
        **grid_options(20, "exp"),
        "eta": Option(1.0, nonnegative_float, "noise scale: 1 the reverse SDE, 0 the PF-ODE"),
        "solver_type": Option("midpoint", one_of("midpoint", "heun"), "form of the second-order correction"),
        "lower_order_final": Option(True, boolean, "first-order last move when there are fewer than 15 moves"),
        "corrector": Option(
            False,
            boolean,
            "correct each move with the score at its end, which the next move evaluates anyway "
            "(no extra NFE; not the last move)",
        ),
    },
    summary="SDE-DPM-Solver++(2M) on the reverse SDE (eta 1), N NFE with denoise",
)

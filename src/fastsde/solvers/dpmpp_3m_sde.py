"""DPM-Solver++(3M) SDE (k-diffusion's ``sample_dpmpp_3m_sde``; Lu et al. 2022 for the 3M ODE update):
a third-order multistep exponential integrator of the reverse-SDE family in data prediction, for any
process x_t = m·x0 + σ·z with half log-SNR λ = log(m/σ).

Equation: dx = [f − (1+η)/2·g²·s] dt + √η·g dw̄ (η = 1 the reverse SDE, η = 0 the PF-ODE; every η ≥ 0
has the data marginals). Its exact step s → t, with h = λ_t − λ_s and H = (1+η)h, is

    x_t = (σ_t/σ_s)·e^{−ηh}·x_s + m_t·e^{−(1+η)λ_t}∫_{λ_s}^{λ_t}(1+η)e^{(1+η)λ} x̂0 dλ + σ_t√(1 − e^{−2ηh})·z.

The move integrates x̂0 through the last three points against that weight:

    x_t = (σ_t/σ_s)·e^{−ηh}·x_s + m_t·[(1 − e^{−H})·D_0 + φ₂(H)·g₁ − c·φ₃(H)·g₂] + s_noise·σ_t√(1 − e^{−2ηh})·z,

φ₂(H) = (e^{−H} − 1)/H + 1, φ₃(H) = φ₂/H − ½, and g₁, g₂ from the data predictions D_0 (now), D_1,
D_2 (before) with r₀ = h₁/h, r₁ = h₂/h (λ-steps, not H): δ₀ = (D_0 − D_1)/r₀, δ₁ = (D_1 − D_2)/r₁,
g₁ = δ₀ + (δ₀ − δ₁)·r₀/(r₀ + r₁), g₂ = (δ₀ − δ₁)/(r₀ + r₁). g₂ ≈ h²·x̂0″/2, so the exact integral of
the quadratic through the three points has c = 2 (``form="exact"``); k-diffusion's update has c = 1
(``form="peer"``, bit for bit its formula; formally second order on the PF-ODE). With one past value
the move adds φ₂(H)·δ₀; with none it is first order (the SDE-DPM-Solver++ 1 step).

Fixed grid: warm-up orders 1, 2, 3 (as k-diffusion). ``lower_order_final`` (default True; False is
k-diffusion's rule): below 15 moves the last move is first order and the one before at most second.
Measured on the 64-D EDM mixture (4096 samples, per-mode FD, floor 0.011): at 10 NFE 0.89 with it and
3.65 without (k-diffusion 3.65); from 15 moves on the two are the same method. Both converge at 32
NFE there, as k-diffusion; ``form="exact"`` at 28 but is worse below 24 NFE. Final
step: the last move ends at t_end (> 0) with its noise; the front door's denoise at t_end (1 NFE) is
k-diffusion's step to σ = 0. 1 NFE per move: N grid points cost N NFE with the denoise. The noise of
move k is Stream.STEP with counter k (the same draws as ``dpmpp_2m_sde``, ``er_sde``, ``sa_solver``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..sde import broadcast_to_rows
from .core.common import LOWER_ORDER_FINAL_BELOW, shared_rows
from .core.options import Option, boolean, grid_options, nonnegative_float, one_of
from .core.spec import SolverSpec, fixed_grid
from .core.stepper import Step, Stepper, StepResult
from .dpmpp_3m import DPMSolverPP3M

__all__ = ["DPMPP_3M_SDE", "DPMSolverPP3MSDE"]


class DPMSolverPP3MSDE(Stepper):
    """DPM-Solver++(3M) SDE: weak order 1 for η > 0; on the PF-ODE (η = 0) order 3 (``form="exact"``)
    or 2 (``form="peer"``). One evaluation per move."""

    order = 1.0
    coordinate = "logsnr"

    @classmethod
    def declared_order(cls, options: Mapping[str, Any]) -> float:
        if cls.declared_stochastic(options):
            return 1.0
        return 3.0 if options.get("form", "peer") == "exact" else 2.0

    @classmethod
    def declared_stochastic(cls, options: Mapping[str, Any]) -> bool:
        return float(options.get("eta", 1.0)) > 0.0 and float(options.get("s_noise", 1.0)) > 0.0

    # the same history as the deterministic 3M: D and the λ-step at the last two points (0: none yet)
    init = DPMSolverPP3M.init
    reset = DPMSolverPP3M.reset

    def _coefficients(self, key: Tensor, moves: int | None) -> Tensor:
        """Per-row coefficients from (t, t_next, h₁, h₂, index) (float64): columns decay, the weights
        of D_0, δ₀ (2M), g₁, g₂, the ratios r₀/(r₀ + r₁), r₀, r₁, r₀ + r₁, the noise std, the order, h."""
        sde, o = self.sde, self.options
        eta = float(o["eta"])
        t, tn, h1, h2, index = key.unbind(1)
        h = sde.log_snr(tn) - sde.log_snr(t)
        big_h = (1.0 + eta) * h
        one = torch.ones_like(h)
        r0 = torch.where(h1 > 0, h1 / h, one)
        r1 = torch.where(h2 > 0, h2 / h, one)
        em1 = torch.expm1(-big_h)  # e^{−H} − 1
        phi2 = em1 / big_h + 1.0
        phi3 = phi2 / big_h - 0.5
        c3 = 2.0 if o["form"] == "exact" else 1.0
        m_t, sig_t = sde.mean_coeff(tn), sde.marginal_std(tn)
        decay = sig_t / sde.marginal_std(t) * torch.exp(-eta * h)
        std = float(o["s_noise"]) * sig_t * torch.sqrt(-torch.expm1(-2.0 * eta * h))
        order = 1.0 + (h1 > 0).double() + ((h1 > 0) & (h2 > 0)).double()
        if o["lower_order_final"] and moves is not None and moves < LOWER_ORDER_FINAL_BELOW:
            order = torch.minimum(order, (moves - index).clamp_min(1.0))  # moves left, this one included
        cols = [decay, -m_t * em1, m_t * phi2, -c3 * m_t * phi3, r0 / (r0 + r1), r0, r1, r0 + r1, std, order, h]
        return torch.stack(cols, dim=1)

    def step(self, x: Tensor, s: Step) -> StepResult:
        dt = x.dtype
        d0 = self.sde.denoise(x, s.t, s.score(x, s.t))
        h1, h2 = s.get("h1"), s.get("h2")
        key = torch.stack([s.t64, s.t_next64, h1, h2, s.index.to(s.t64)], dim=1)
        coef = shared_rows(lambda k: self._coefficients(k, s.moves), key, s.k is not None or None)
        decay, w0, w_phi2, w_g2, frac, r0, r1, r01, std, order = (
            broadcast_to_rows(v.to(dt), x) for v in coef.unbind(1)[:-1]
        )
        d1, d2 = s.get("d1"), s.get("d2")
        base = decay * x + w0 * d0
        delta0 = (d0 - d1) / r0
        delta1 = (d1 - d2) / r1
        x2 = base + w_phi2 * delta0
        x3 = base + w_phi2 * (delta0 + (delta0 - delta1) * frac) + w_g2 * ((delta0 - delta1) / r01)
        out = torch.where(order >= 3, x3, torch.where(order == 2, x2, base))
        if self.declared_stochastic(self.options):
            out = out + std * s.normal(x)
        return StepResult(x=out, state={"d1": d0, "d2": d1, "h1": coef[:, -1], "h2": h1}, x0_hat=d0)


DPMPP_3M_SDE = SolverSpec(
    name="dpmpp_3m_sde",
    build=fixed_grid(DPMSolverPP3MSDE),
    stepper=DPMSolverPP3MSDE,
    options={
        **grid_options(20, "exp"),
        "eta": Option(1.0, nonnegative_float, "noise scale of the η-family: 1 the reverse SDE, 0 the PF-ODE"),
        "s_noise": Option(1.0, nonnegative_float, "factor on the injected noise (1 keeps the law; k-diffusion's)"),
        "form": Option(
            "peer", one_of("peer", "exact"), "third-order term: 'peer' (k-diffusion's) or 'exact' (2φ₃, order 3)"
        ),
        "lower_order_final": Option(
            True, boolean, "below 15 moves: first-order last move, at most second-order move before it"
        ),
    },
    summary="DPM-Solver++(3M) SDE on the reverse SDE (eta 1), multistep in log-SNR, N NFE with denoise",
)

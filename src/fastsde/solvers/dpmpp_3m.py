"""DPM-Solver++(3M) (Lu et al. 2022; k-diffusion's ``sample_dpmpp_3m_sde`` at η = 0, diffusers'
third-order multistep update): a multistep exponential integrator of the PF-ODE in data
prediction, for any process x_t = m·x0 + σ·z with half log-SNR λ = log(m/σ).

A move s → t with h = λ_t − λ_s integrates x̂0 along λ exactly against the exponential weight:

    x_t = (σ_t/σ_s)·x_s + m_t·[(1 − e^{−h})·D_0 + φ₂·g₁ − c·φ₃·g₂],

φ₂ = (e^{−h} − 1)/h + 1, φ₃ = φ₂/h − ½, with the history of x̂0 at the last three points
(D_0 now, D_1, D_2 before; r₀ = h₁/h, r₁ = h₂/h the earlier λ-steps over this one):
δ₀ = (D_0 − D_1)/r₀, δ₁ = (D_1 − D_2)/r₁, g₁ = δ₀ + (δ₀ − δ₁)·r₀/(r₀ + r₁), g₂ = (δ₀ − δ₁)/(r₀ + r₁).
g₂ ≈ h²·x̂0″/2, so the exact third-order update has c = 2 (``form="exact"``, order 3); k-diffusion,
diffusers and DPM-Solver's code use c = 1 (``form="peer"``, formally second order, bit for bit the
peers' update). With one past value the move adds φ₂·δ₀ (the φ₂ form of 2M); with none it is
first order.

Fixed grid (``dpmpp_3m``): warm-up orders 1, 2, 3; with ``lower_order_final`` (default) and fewer
than 15 moves, the last move is first order and the one before it at most second order (diffusers'
rule). 1 NFE per move: N grid points cost N NFE with the denoise.

Adaptive (``adaptive_dpmpp_3m``): the same stepper under the per-sample controller in λ; its error
estimate is the difference between the 3M and the 2M update from the same history (no extra NFE;
the 2M local error is O(h³), so the declared error order is 3). The first step of a sample has no
estimate and is accepted at ``h_init``; after a rejection the evaluation at the unchanged start is
reused, so an attempt costs 1 NFE.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..sde import broadcast_to_rows
from .core.common import LOWER_ORDER_FINAL_BELOW, _growth_check
from .core.context import SolverContext
from .core.controllers import Adaptive, Coordinate
from .core.options import (
    Option,
    boolean,
    grid_options,
    one_of,
    optional,
    positive_float,
    positive_int,
    positive_or_inf,
    unit_interval,
)
from .core.spec import SolverSpec, fixed_grid
from .core.stepper import State, Step, Stepper, StepResult

__all__ = ["DPMPP_3M", "ADAPTIVE_DPMPP_3M", "DPMSolverPP3M"]


class DPMSolverPP3M(Stepper):
    """DPM-Solver++(3M): order 3 (``form="exact"``) or 2 (``form="peer"``); 1 NFE per move."""

    order = 3.0
    error_order = 3.0
    coordinate = "logsnr"

    @classmethod
    def declared_order(cls, options: Mapping[str, Any]) -> float:
        return 3.0 if options.get("form", "exact") == "exact" else 2.0

    def init(self, x: Tensor) -> tuple[State, Tensor | None]:
        n, dev = x.shape[0], x.device
        return {
            "d1": torch.zeros_like(x),
            "d2": torch.zeros_like(x),
            "h1": torch.zeros(n, dtype=torch.float64, device=dev),  # 0: no such point yet
            "h2": torch.zeros(n, dtype=torch.float64, device=dev),
        }, None

    def reset(self, state: State, rows: Tensor) -> None:
        rd = rows.to(state["h1"].device)
        state["h1"][rd] = 0.0
        state["h2"][rd] = 0.0

    def _max_order(self, s: Step) -> Tensor:
        """Per-row order allowed by the history and, on a short fixed grid, by lower_order_final."""
        h1, h2 = s.get("h1"), s.get("h2")
        order = 1 + (h1 > 0).to(torch.int64) + ((h1 > 0) & (h2 > 0)).to(torch.int64)
        if self.options.get("lower_order_final", False) and s.moves is not None and s.moves < LOWER_ORDER_FINAL_BELOW:
            left = (s.moves - s.index).to(order.device)  # moves left, this one included
            order = torch.minimum(order, left.clamp_min(1))
        return order

    def _host_order(self, s: Step) -> int:
        """:meth:`_max_order` on a fixed grid, from the host's history count (h > 0 for every move made)."""
        order = 1 + min(int(s.history), 2)
        if self.options.get("lower_order_final", False) and s.moves < LOWER_ORDER_FINAL_BELOW:
            order = min(order, max(s.moves - int(s.k), 1))
        return order

    def step(self, x: Tensor, s: Step) -> StepResult:
        sde, dt = self.sde, x.dtype
        t64, tn64 = s.t64, s.t_next64
        h = sde.log_snr(tn64) - sde.log_snr(t64)
        d0 = sde.denoise(x, s.t, s.score0())
        h1, h2 = s.get("h1"), s.get("h2")
        one = torch.ones_like(h)
        safe_h = torch.where(h > 0, h, one)
        r0 = torch.where(h1 > 0, h1 / safe_h, one)
        r1 = torch.where(h2 > 0, h2 / safe_h, one)
        em1 = torch.expm1(-h)  # e^{−h} − 1
        phi2 = torch.where(h > 0, em1 / safe_h + 1.0, torch.zeros_like(h))
        phi3 = torch.where(h > 0, phi2 / safe_h - 0.5, torch.zeros_like(h))
        c3 = 2.0 if self.options.get("form", "exact") == "exact" else 1.0

        def rows(v: Tensor) -> Tensor:
            return broadcast_to_rows(v.to(dt), x)

        m_t = sde.mean_coeff(tn64)
        base = rows(sde.marginal_std(tn64) / sde.marginal_std(t64)) * x + rows(-m_t * em1) * d0
        state = {"d1": d0, "d2": s.get("d1"), "h1": h, "h2": h1}
        if s.history is not None:  # a fixed grid: one order for every row, known on the host; no error estimate
            order = self._host_order(s)
            if order == 1:
                return StepResult(x=base, state=state, x0_hat=d0)
            delta0 = (d0 - s.get("d1")) / rows(r0)
            if order == 2:
                return StepResult(x=base.add_(rows(m_t * phi2) * delta0), state=state, x0_hat=d0)
            # order 3 as base + a·δ₀ + b·(δ₀ − δ₁): g₁ and g₂ folded into two per-row coefficients
            diff = delta0 - (s.get("d1") - s.get("d2")) / rows(r1)
            a = m_t * phi2
            b = (a * r0 - c3 * m_t * phi3) / (r0 + r1)
            return StepResult(x=base.add_(rows(a) * delta0).add_(rows(b) * diff), state=state, x0_hat=d0)
        delta0 = (d0 - s.get("d1")) / rows(r0)
        delta1 = (s.get("d1") - s.get("d2")) / rows(r1)
        g1 = delta0 + (delta0 - delta1) * rows(r0 / (r0 + r1))
        g2 = (delta0 - delta1) / rows(r0 + r1)
        x2 = base + rows(m_t * phi2) * delta0
        x3 = base + rows(m_t * phi2) * g1 - rows(c3 * m_t * phi3) * g2
        order = broadcast_to_rows(self._max_order(s).to(x.device), x)
        out = torch.where(order >= 3, x3, torch.where(order == 2, x2, base))
        ref = torch.where(order >= 3, x2, base)
        error = torch.where(order >= 2, out - ref, torch.zeros_like(out))
        return StepResult(x=out, error=error, x_ref=ref, state=state, x0_hat=d0)


_FORM = Option(
    "peer", one_of("exact", "peer"), "third-order term: 'exact' (order 3) or 'peer' (k-diffusion's, order 2)"
)


DPMPP_3M = SolverSpec(
    name="dpmpp_3m",
    build=fixed_grid(DPMSolverPP3M),
    stepper=DPMSolverPP3M,
    options={
        **grid_options(20, "exp"),
        "form": _FORM,
        "lower_order_final": Option(
            True, boolean, "below 15 moves: first-order last move, at most second-order move before it"
        ),
    },
    summary="DPM-Solver++(3M) on the PF-ODE (multistep, data prediction), N NFE with denoise",
)


def _build_adaptive(ctx: SolverContext, opts: dict[str, Any]) -> dict[str, Any]:
    controller = Adaptive(
        rtol=opts["eps_rel"],
        atol=opts["eps_abs"] if opts["eps_abs"] is not None else opts["eps_rel"] * ctx.sde.data_range / 200.0,
        exponent=1.0 / DPMSolverPP3M.error_order,
        mixed="max",
        use_prev=False,
        norm="scaled_l2",
        safety=opts["safety"],
        max_growth=opts["max_growth"],
        nonfinite_factor=0.1,
        h_init=opts["h_init"],
        h_max=opts["h_max"],
        stop_tol=1e-9,
    )
    return dict(
        stepper=DPMSolverPP3M(ctx, {**opts, "lower_order_final": False}),
        controller=controller,
        coordinate=Coordinate.log_snr(ctx.sde, ctx.t_start, ctx.t_end),
        compact=True,
        max_nfe=opts["max_nfe"],
        on_budget=opts["on_budget"],
        reuse_rejected=True,
        budget_hint="raise max_nfe, loosen eps_rel / eps_abs",
    )


ADAPTIVE_DPMPP_3M = SolverSpec(
    name="adaptive_dpmpp_3m",
    build=_build_adaptive,
    stepper=DPMSolverPP3M,
    options={
        "eps_rel": Option(1e-3, positive_float, "relative tolerance"),
        "eps_abs": Option(
            None, optional(positive_float), "absolute tolerance (default eps_rel × data range / 200, so that it scales)"
        ),
        "h_init": Option(0.1, positive_float, "first step in λ = log(m/σ) (accepted without an estimate)"),
        "h_max": Option(math.inf, positive_or_inf, "largest step in λ"),
        "safety": Option(0.9, unit_interval, "safety factor θ"),
        "max_growth": Option(2.0, _growth_check, "largest factor by which h may grow per step"),
        "form": _FORM,
        "max_nfe": Option(10_000, positive_int(2), "per-sample budget of solver NFE (denoise excluded)"),
        "on_budget": Option("raise", one_of("raise", "partial"), "what happens when max_nfe is reached"),
    },
    summary="adaptive DPM-Solver++(3M) on the PF-ODE: per-sample steps in log-SNR, 3M − 2M error estimate",
    adaptive=True,
    tolerance="eps_rel",
)

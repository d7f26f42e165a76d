"""DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep exponential integrator of the PF-ODE in
data-prediction form, for any process x_t = m·x0 + σ·z with half log-SNR λ = log(m/σ).

A move t_{i−1} → t_i with h_i = λ(t_i) − λ(t_{i−1}) > 0:

    x_{t_i} = (σ_{t_i}/σ_{t_{i−1}})·x_{t_{i−1}} − m_{t_i}·(e^{−h_i} − 1)·D_i,

with D_i = x̂0(t_{i−1}) for a first-order move and, for a second-order move with r_i = h_{i−1}/h_i,
D_i = (1 + 1/(2r_i))·x̂0(t_{i−1}) − 1/(2r_i)·x̂0(t_{i−2}). The first move is first order (no history);
with ``lower_order_final`` (default) the last move is also first order when there are fewer than 15
moves (diffusers' rule), which keeps 2–10-step sampling stable. 1 NFE per move: N grid points cost
N NFE with the denoise. Deterministic. Default grid: uniform in λ.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..sde import broadcast_to_rows
from .core.common import LOWER_ORDER_FINAL_BELOW, first_order_moves, grid_coefficients, where_rows
from .core.options import Option, boolean, grid_options
from .core.spec import SolverSpec, fixed_grid
from .core.stepper import State, Step, Stepper, StepResult, denoised

__all__ = ["DPMPP_2M", "DPMSolverPP2M", "first_order_moves", "LOWER_ORDER_FINAL_BELOW"]


class DPMSolverPP2M(Stepper):
    """DPM-Solver++(2M): order 2, one evaluation per move, multistep history of x̂0 and h."""

    order = 2.0
    #: from m = 0 (h = ∞) the first move is x_s = (σ_s/σ_t)·x + m_s·x̂0, exact in x̂0; the next one sees
    #: h_prev = ∞ and is first order (r = h_prev/h = ∞), after which the history is finite
    singular_start = True

    def init(self, x: Tensor) -> tuple[State, Tensor | None]:
        return {"x0": torch.zeros_like(x), "h": torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)}, None

    def reset(self, state: State, rows: Tensor) -> None:
        state["h"][rows.to(state["h"].device)] = 0.0

    def coefficients(self, t: Tensor) -> Tensor:
        """Per move of a grid of points t: (σ_next/σ, −m_next·(e^{−h} − 1), h, 1/(2r) = h/(2·h_prev))."""
        sde = self.sde
        lam = sde.log_snr(t)
        h = lam[1:] - lam[:-1]
        sig, m = sde.marginal_std(t), sde.mean_coeff(t)
        half_inv_r = torch.cat([torch.zeros_like(h[:1]), 0.5 * h[1:] / h[:-1]])
        return torch.stack([sig[1:] / sig[:-1], -m[1:] * (-h).expm1(), h, half_inv_r], dim=1)

    def grid_step(self, x: Tensor, s: Step) -> StepResult:
        """The move on a fixed grid: coefficients from the run's table, the order decided on the host."""
        ratio, weight, h, half_inv_r = grid_coefficients(self, s, self.coefficients).unbind()
        x0 = denoised(self.sde, s, x, s.t, self.singular_move(s))
        if first_order_moves(s, None, self.options["lower_order_final"]):
            d = x0
        else:  # in place on fresh tensors: the same operations as the per-row path, fewer allocations
            d = ((1.0 + half_inv_r) * x0).sub_(half_inv_r * s.get("x0"))
        out = (ratio * x).add_(weight * d)
        return StepResult(x=out, state={"x0": x0, "h": h.expand(x.shape[0])}, x0_hat=x0)

    def step(self, x: Tensor, s: Step) -> StepResult:
        if s.history is not None:
            return self.grid_step(x, s)
        sde = self.sde
        t, t_next = s.t, s.t_next
        h = sde.log_snr(t_next) - sde.log_snr(t)
        x0 = denoised(sde, s, x, t, self.singular_move(s))
        h_prev, x0_prev = s.get("h"), s.get("x0")
        first = first_order_moves(s, h_prev > 0, self.options["lower_order_final"])

        def second_order() -> Tensor:
            half_inv_r = broadcast_to_rows(0.5 * h / h_prev, x)
            return (1.0 + half_inv_r) * x0 - half_inv_r * x0_prev

        d = where_rows(first, x0, second_order)
        ratio = broadcast_to_rows(sde.marginal_std(t_next) / sde.marginal_std(t), x)
        weight = broadcast_to_rows(-sde.mean_coeff(t_next) * (-h).expm1(), x)
        return StepResult(x=ratio * x + weight * d, state={"x0": x0, "h": h}, x0_hat=x0)


DPMPP_2M = SolverSpec(
    name="dpmpp_2m",
    build=fixed_grid(DPMSolverPP2M),
    stepper=DPMSolverPP2M,
    options={
        **grid_options(20, "exp"),
        "lower_order_final": Option(True, boolean, "first-order last move when there are fewer than 15 moves"),
    },
    summary="DPM-Solver++(2M) in data-prediction form, N NFE with denoise",
)

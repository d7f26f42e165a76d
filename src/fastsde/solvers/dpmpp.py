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

from torch import Tensor

from ..sde import broadcast_to_rows
from .base import Option, SolverContext, SolverSpec, boolean, grid_options, run_grid, solver_grid

__all__ = ["DPMPP_2M", "dpmpp_2m"]

#: Fewer moves than this make the last move first order when lower_order_final is on.
LOWER_ORDER_FINAL_BELOW = 15


def dpmpp_2m(ctx: SolverContext, x: Tensor, *, steps: int, grid: str, rho: float, lower_order_final: bool) -> Tensor:
    sde = ctx.sde
    moves = steps - 1
    history: dict[str, Tensor] = {}

    def step(k: int, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        lam, lam_next = sde.log_snr(t), sde.log_snr(t_next)
        h = lam_next - lam
        x0 = sde.denoise(x, t, ctx.score(x, t))
        first_order = k == 0 or (lower_order_final and k == moves - 1 and moves < LOWER_ORDER_FINAL_BELOW)
        if first_order:
            d = x0
        else:
            half_inv_r = broadcast_to_rows(0.5 * h / history["h"], x)
            d = (1.0 + half_inv_r) * x0 - half_inv_r * history["x0"]
        history["x0"], history["h"] = x0, h
        ratio = broadcast_to_rows(sde.marginal_std(t_next) / sde.marginal_std(t), x)
        weight = broadcast_to_rows(-sde.mean_coeff(t_next) * (-h).expm1(), x)
        return ratio * x + weight * d

    return run_grid(ctx, x, solver_grid(ctx, dict(steps=steps, grid=grid, rho=rho)), step, "dpmpp_2m")


DPMPP_2M = SolverSpec(
    name="dpmpp_2m",
    run=dpmpp_2m,
    options={
        **grid_options(20, "exp"),
        "lower_order_final": Option(True, boolean, "first-order last move when there are fewer than 15 moves"),
    },
    summary="DPM-Solver++(2M) in data-prediction form, N NFE with denoise",
)

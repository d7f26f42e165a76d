"""Song et al.'s discrete predictors: reverse diffusion and ancestral sampling (Score SDE §5, §6.2–6.3).

Song's reference code reads the DDPM/SMLD tables at an index i = floor(t·(N−1)/T); that is exact only
on his own grid linspace(T, ε, N). Here the discrete quantities are the ones *implied by the grid*
between consecutive points t_k > t_{k+1}, so the predictors are exact on any grid and equal Song's
tables on his grid as N grows:

- VE: σ_i = σ(t_k), σ_{i−1} = σ(t_{k+1});
- VP: β_i = 1 − m(t_k)²/m(t_{k+1})² (the one-step DDPM β between the two points), α_i = 1 − β_i;
- sub-VP and EDM (no table of their own): the generic rule f_i = f(x, t_k)·h, G_i = g(t_k)·√h with
  h = t_k − t_{k+1}.

Reverse diffusion: x ← x − f_i + G_i²·s + G_i·z (VE: x + (σ_i² − σ_{i−1}²)s + √(σ_i² − σ_{i−1}²)z;
VP: (2 − √α_i)x + β_i·s + √β_i·z).

Ancestral: VE x ← x + (σ_i² − σ_{i−1}²)s + σ_{i−1}·√(σ_i² − σ_{i−1}²)/σ_i·z; VP
x ← (x + β_i·s)/√α_i + √β_i·z. Song defines no ancestral step for sub-VP or EDM; for those this module
takes the exact DDPM posterior step of x_t = m·x0 + σ·z with x0 replaced by its Tweedie estimate, which
is DDIM with η = 1 (and coincides with Song's VE rule when m = 1).

Every predictor costs one score evaluation per move, so N grid points cost N NFE with the denoise.
The noise of move k is Stream.STEP with counter k (the ``stream``/``counter`` arguments let the PC
sampler reuse these steps unchanged).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..noise import Stream
from ..sde import SDE, VESDE, VPSDE, broadcast_to_rows
from .base import SolverContext, SolverSpec, grid_options, run_grid, solver_grid

__all__ = [
    "REVERSE_DIFFUSION",
    "ANCESTRAL",
    "PREDICTORS",
    "grid_beta",
    "posterior_step",
    "reverse_diffusion_step",
    "ancestral_step",
    "em_step",
]

#: A predictor move: (ctx, k, x, t_k, t_{k+1}) -> x at t_{k+1}.
PredictorStep = Callable[[SolverContext, int, Tensor, Tensor, Tensor], Tensor]


def grid_beta(sde: SDE, t: Tensor, t_next: Tensor) -> Tensor:
    """β_i = 1 − m(t)²/m(t_next)² of a VP-type (β-schedule) process, computed without cancellation."""
    return -(2.0 * (sde.log_alpha(t) - sde.log_alpha(t_next))).expm1()


def em_step(ctx: SolverContext, k: int, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """Euler–Maruyama on the reverse SDE with the true spacing (the ``em`` solver's move)."""
    sde = ctx.sde
    h = broadcast_to_rows(t - t_next, x)
    drift = sde.reverse_drift(x, t, ctx.score(x, t))
    g = broadcast_to_rows(sde.diffusion(t), x)
    return x - h * drift + g * h.sqrt() * ctx.normal(x, Stream.STEP, k)


def reverse_diffusion_step(ctx: SolverContext, k: int, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """One reverse-diffusion move x ← x − f_i + G_i²·s + G_i·z with grid-implied f_i, G_i."""
    sde = ctx.sde
    s = ctx.score(x, t)
    z = ctx.normal(x, Stream.STEP, k)
    if isinstance(sde, VESDE):
        var = broadcast_to_rows(sde.marginal_std(t) ** 2 - sde.marginal_std(t_next) ** 2, x)
        return x + var * s + var.sqrt() * z
    if isinstance(sde, VPSDE):
        beta = broadcast_to_rows(grid_beta(sde, t, t_next), x)
        return (2.0 - (1.0 - beta).sqrt()) * x + beta * s + beta.sqrt() * z
    h = broadcast_to_rows(t - t_next, x)
    g2h = broadcast_to_rows(sde.diffusion(t) ** 2, x) * h
    return x - h * sde.drift(x, t) + g2h * s + g2h.sqrt() * z


def posterior_step(sde: SDE, x: Tensor, x0: Tensor, t: Tensor, t_next: Tensor, eta: float, z: Tensor | None) -> Tensor:
    """DDIM's move t → s = t_next in data-prediction form for x_t = m·x0 + σ·z:

    x_s = m_s·x̂0 + √(σ_s² − c²)·ε̂ + c·z, ε̂ = (x_t − m_t·x̂0)/σ_t, c = η·σ_s·√(1 − e^{−2h}),

    with h = λ_s − λ_t the step in half log-SNR (e^{−2h} = σ̃_s²/σ̃_t²). η = 1 is the exact DDPM
    posterior q(x_s | x_t, x0 = x̂0); η = 0 is deterministic.
    """
    m_t = broadcast_to_rows(sde.mean_coeff(t), x)
    m_s = broadcast_to_rows(sde.mean_coeff(t_next), x)
    sig_t = broadcast_to_rows(sde.marginal_std(t), x)
    sig_s = broadcast_to_rows(sde.marginal_std(t_next), x)
    eps = (x - m_t * x0) / sig_t
    if eta == 0.0 or z is None:
        return m_s * x0 + sig_s * eps
    h = broadcast_to_rows(sde.log_snr(t_next) - sde.log_snr(t), x)
    frac = -(-2.0 * h).expm1()  # 1 − σ̃_s²/σ̃_t² ∈ [0, 1)
    c = eta * sig_s * frac.sqrt()
    keep = sig_s * (1.0 - eta * eta * frac).clamp_min(0.0).sqrt()
    return m_s * x0 + keep * eps + c * z


def ancestral_step(ctx: SolverContext, k: int, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """One ancestral move: Song's VE/VP rule with grid-implied σ_i, β_i; the DDPM posterior otherwise."""
    sde = ctx.sde
    s = ctx.score(x, t)
    z = ctx.normal(x, Stream.STEP, k)
    if isinstance(sde, VESDE):
        sig2 = broadcast_to_rows(sde.marginal_std(t) ** 2, x)
        sig2_next = broadcast_to_rows(sde.marginal_std(t_next) ** 2, x)
        var = sig2 - sig2_next
        return x + var * s + (sig2_next * var / sig2).sqrt() * z
    if isinstance(sde, VPSDE):
        beta = broadcast_to_rows(grid_beta(sde, t, t_next), x)
        return (x + beta * s) / (1.0 - beta).sqrt() + beta.sqrt() * z
    return posterior_step(sde, x, sde.denoise(x, t, s), t, t_next, 1.0, z)


PREDICTORS: dict[str, PredictorStep] = {
    "reverse_diffusion": reverse_diffusion_step,
    "ancestral": ancestral_step,
    "em": em_step,
}


def _runner(name: str, move: PredictorStep) -> Callable[..., Tensor]:
    def run(ctx: SolverContext, x: Tensor, *, steps: int, grid: str, rho: float) -> Tensor:
        def step(k: int, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
            return move(ctx, k, x, t, t_next)

        return run_grid(ctx, x, solver_grid(ctx, dict(steps=steps, grid=grid, rho=rho)), step, name)

    run.__name__ = name
    run.__doc__ = f"The {name} predictor over the grid (N−1 moves); N NFE with the denoise."
    return run


REVERSE_DIFFUSION = SolverSpec(
    name="reverse_diffusion",
    run=_runner("reverse_diffusion", reverse_diffusion_step),
    options=grid_options(1000, "sde"),
    summary="Song's reverse-diffusion predictor with grid-implied σ_i / β_i, N−1 moves + denoise",
    stochastic=True,
)

ANCESTRAL = SolverSpec(
    name="ancestral",
    run=_runner("ancestral", ancestral_step),
    options=grid_options(1000, "sde"),
    summary="Song's ancestral predictor (VE, VP); exact DDPM posterior step for sub-VP and EDM",
    stochastic=True,
)

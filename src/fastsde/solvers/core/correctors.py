"""Correctors: moves at a fixed noise level that the driver makes after accepted steps.

Every corrector is called as ``corrector(ctx, x, t, rows, key, t_next)`` on the rows the driver just
moved (``rows``: their sample indices, None for all in order; ``key``: a per-row counter that keys
the corrector's noise) and returns the corrected rows. After it moves a sample the driver tells the
stepper to forget multistep / FSAL values of the old position. :class:`Corrector` holds what all of
them share:

- placement: ``at_start`` corrects x_T before the first step; ``at_end`` also corrects samples that
  have just reached t_end; ``every`` corrects only points whose key is a multiple of it (with
  ``key="point"`` the key is the point's index on the grid, or its accepted-step count when the
  step size is adaptive; with ``key="attempt"`` the index of the accepted attempt); ``sigma_max``
  corrects only where the marginal std σ_t is at most that level;
- rows that are not corrected are neither evaluated nor counted.

Two Langevin dynamics targeting the marginal q_t at the fixed time t, one NFE per inner step:

- :class:`Langevin`, overdamped: K steps of x ← x + ε·s(x) + √(2ε)·z. Step rule ``"snr"`` is Song
  et al.'s ε = 2α·(snr·‖z‖/‖s‖)² (norms per sample, or batch means as in Song's code); rule
  ``"sigma"`` is ε = κ·σ_t², the scale 1/L_t of the score's Lipschitz constant (snr 0.16 ≈ κ 0.05,
  since ‖s‖ ≈ √D/σ_t and ‖z‖ ≈ √D). Noise: Stream.CORRECTOR, counter key·K + j.
- :class:`Underdamped`, the ULMC corrector of Chen et al. (2023): a fresh velocity v ~ N(0, I) per
  call, friction γ = friction/σ_t, duration T_c = duration·σ_t in K steps of h = T_c/K, each the exact
  solution of dx = v ds, dv = −γv ds + g ds + √(2γ) dB with the score g = s_t(x) frozen at the
  step's start (an Ornstein–Uhlenbeck step in v, not Euler). The velocity is dropped after the
  call. Noise: Stream.CORRECTOR, counter key·(2K+1) (velocity), key·(2K+1) + 1 + 2j and + 2 + 2j.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ...noise import Stream
from ...sde import broadcast_to_rows

__all__ = ["Corrector", "Langevin", "Underdamped", "ulmc_coefficients"]

#: alpha(t, t_next) -> per-row α of the step-size rule (None: α = 1).
AlphaFn = Callable[[Tensor, "Tensor | None"], Tensor]


class Corrector:
    """Placement and row selection shared by every corrector; subclasses implement :meth:`correct`."""

    def __init__(
        self,
        steps: int,
        *,
        at_start: bool = False,
        at_end: bool = True,
        key: str = "attempt",
        every: int = 1,
        sigma_max: float = math.inf,
    ) -> None:
        self.steps, self.at_start, self.at_end, self.key = steps, at_start, at_end, key
        self.every, self.sigma_max = every, sigma_max

    @property
    def nfe(self) -> int:
        """Evaluations per corrected point."""
        return self.steps

    def selects(self, sigma: Tensor, key: Tensor) -> Tensor:
        """Which points are corrected (CPU mask): key a multiple of ``every`` and σ_t ≤ ``sigma_max``.
        The driver narrows the rows with it before the call, so that only the rows moved are reset."""
        if self.every == 1 and not math.isfinite(self.sigma_max):
            return torch.ones(key.shape[0], dtype=torch.bool)
        keep = (key.cpu() % self.every) == 0
        if math.isfinite(self.sigma_max):
            keep = keep & (sigma.cpu() <= self.sigma_max)
        return keep

    def __call__(
        self, ctx, x: Tensor, t: Tensor, rows: Tensor | None, key: Tensor, t_next: Tensor | None = None
    ) -> Tensor:
        """Correct the selected rows of x at times t; rows are the sample indices (None: all in order)."""
        if self.every == 1 and not math.isfinite(self.sigma_max):
            return self.correct(ctx, x, t, rows, key, t_next)
        keep = self.selects(ctx.sde.marginal_std(t), key)
        if not bool(keep.any()):
            return x
        if bool(keep.all()):
            return self.correct(ctx, x, t, rows, key, t_next)
        sel = keep.nonzero().squeeze(1)
        sd = sel.to(x.device)
        sub_rows = sel if rows is None else rows[sel]
        out = x.clone()
        out[sd] = self.correct(ctx, x[sd], t[sd], sub_rows, key[sel], t_next[sd] if t_next is not None else None)
        return out

    def correct(self, ctx, x: Tensor, t: Tensor, rows: Tensor | None, key: Tensor, t_next: Tensor | None) -> Tensor:
        raise NotImplementedError


class Langevin(Corrector):
    """K overdamped Langevin steps; step by the snr rule (per-sample or batch-mean norms) or ε = κ·σ_t²."""

    def __init__(
        self,
        steps: int,
        snr: float = 0.16,
        *,
        per_sample_norm: bool = True,
        alpha: AlphaFn | None = None,
        rule: str = "snr",
        kappa: float = 0.05,
        at_start: bool = False,
        at_end: bool = True,
        key: str = "attempt",
        every: int = 1,
        sigma_max: float = math.inf,
    ) -> None:
        super().__init__(steps, at_start=at_start, at_end=at_end, key=key, every=every, sigma_max=sigma_max)
        if rule not in ("snr", "sigma"):
            raise ValueError(f"rule must be 'snr' or 'sigma', got {rule!r}")
        self.snr, self.per_sample_norm, self.alpha, self.rule, self.kappa = snr, per_sample_norm, alpha, rule, kappa

    def _norms(self, v: Tensor) -> Tensor:
        norms = v.reshape(v.shape[0], -1).norm(dim=1)
        return norms if self.per_sample_norm else norms.mean().expand_as(norms)

    def correct(self, ctx, x: Tensor, t: Tensor, rows: Tensor | None, key: Tensor, t_next: Tensor | None) -> Tensor:
        alpha = self.alpha(t, t_next) if self.alpha is not None else None
        tiny = torch.finfo(x.dtype).tiny
        if self.rule == "sigma":
            eps_sigma = broadcast_to_rows(self.kappa * ctx.sde.marginal_std(t) ** 2, x)
        for j in range(self.steps):
            s = ctx.score(x, t, rows=rows)
            z = ctx.noise.normal(
                x.shape[1:], Stream.CORRECTOR, key * self.steps + j, rows, dtype=x.dtype, device=x.device
            )
            if self.rule == "sigma":
                eps = eps_sigma
            else:
                ratio = self.snr * self._norms(z) / self._norms(s).clamp_min(tiny)
                eps = 2.0 * alpha * ratio**2 if alpha is not None else 2.0 * ratio**2
                eps = broadcast_to_rows(eps, x)
            x = x + eps * s + (2.0 * eps).sqrt() * z
        return x


def ulmc_coefficients(friction: float, duration: float, steps: int) -> dict[str, float]:
    """The dimensionless coefficients of one exact frozen-score ULMC step (float64).

    With u = γh = friction·duration/steps and e = exp(−u), one step from (x, v) with g = s_t(x) is

        x' = x + σ·A1·v + σ²·A2·g + σ·a·n1,    v' = e·v + σ·A1·g + b1·n1 + b2·n2,

    A1 = (1 − e)/friction, A2 = (u − (1 − e))/friction², and (σ·a·n1, b1·n1 + b2·n2) the Cholesky
    form of the step's Gaussian noise: Var ξ_x = σ²·a², a² = 2ψ(u)/friction², ψ(u) = u − 2(1 − e) +
    (1 − e²)/2 (a series for small u, where it cancels); Var ξ_v = 1 − e²; Cov = σ·(1 − e)²/friction.
    """
    u = friction * duration / steps
    one_e = -math.expm1(-u)  # 1 − e
    one_e2 = -math.expm1(-2.0 * u)  # 1 − e²
    psi = u**3 / 3.0 - u**4 / 4.0 + 7.0 * u**5 / 60.0 if u < 1e-3 else u - 2.0 * one_e + 0.5 * one_e2
    root = math.sqrt(2.0 * psi)
    b1 = one_e**2 / root
    return {
        "e": math.exp(-u),
        "A1": one_e / friction,
        "A2": (u - one_e) / friction**2,
        "a": root / friction,
        "b1": b1,
        "b2": math.sqrt(max(one_e2 - b1 * b1, 0.0)),
    }


class Underdamped(Corrector):
    """K exact frozen-score underdamped Langevin steps from a fresh velocity (Chen et al.'s DPUM)."""

    def __init__(
        self,
        steps: int,
        *,
        friction: float = 2.0,
        duration: float = 1.0,
        at_start: bool = False,
        at_end: bool = True,
        key: str = "point",
        every: int = 1,
        sigma_max: float = math.inf,
    ) -> None:
        super().__init__(steps, at_start=at_start, at_end=at_end, key=key, every=every, sigma_max=sigma_max)
        self.friction, self.duration = friction, duration
        self.coef = ulmc_coefficients(friction, duration, steps)

    def correct(self, ctx, x: Tensor, t: Tensor, rows: Tensor | None, key: Tensor, t_next: Tensor | None) -> Tensor:
        c, k = self.coef, self.steps
        sig = broadcast_to_rows(ctx.sde.marginal_std(t), x)
        base = key * (2 * k + 1)

        def normal(offset: int) -> Tensor:
            return ctx.noise.normal(x.shape[1:], Stream.CORRECTOR, base + offset, rows, dtype=x.dtype, device=x.device)

        v = normal(0)
        for j in range(k):
            g = ctx.score(x, t, rows=rows)
            n1, n2 = normal(1 + 2 * j), normal(2 + 2 * j)
            x, v = (
                x + sig * (c["A1"] * v + c["a"] * n1) + sig * sig * (c["A2"] * g),
                c["e"] * v + sig * (c["A1"] * g) + c["b1"] * n1 + c["b2"] * n2,
            )
        return x

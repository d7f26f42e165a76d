"""Adaptive SDE-DPM-Solver++: per-sample error control on an embedded pair of exponential
integrators of the reverse SDE in half log-SNR time (``adaptive_sde_dpm``).

Derivation (data prediction, any process with marginals x_t = m·x0 + σ·z, λ = log(m/σ)).
With f = a·x, g² = −2σ²·dλ/dt and s = (m·x̂0 − x)/σ², the reverse SDE dx = [a·x − g²·s] dt + g dw̄
is linear in x apart from x̂0. With u = x·m/σ² it reads du = 2e^{2λ} x̂0 dλ + (m/σ²) g dw̄, so over a
step s → t (h = λ_t − λ_s > 0), exactly,

    x_t = (σ_t/σ_s)e^{−h}·x_s + m_t·e^{−2λ_t}∫ 2e^{2λ} x̂0 dλ + σ_t·e^{−λ_t}·W,   Var W = e^{2λ_t} − e^{2λ_s}.

- Low member (SDE-DPM-Solver++ 1, 1 NFE): x̂0 frozen at x̂0_s:
  x_low = (σ_t/σ_s)e^{−h}x_s + m_t(1 − e^{−2h})x̂0_s + N_t.
- High member (2S-midpoint, 1 more NFE): x̂0 linear in λ through x̂0_s and x̂0_m = x̂0(u, λ_s + r·h),
  r = ½, where u is the low member's step to the midpoint, with the Brownian integral restricted to
  [λ_s, λ_m]. The linear term integrates exactly to m_t(h − (1 − e^{−2h})/2)·D with
  D = (x̂0_m − x̂0_s)/(r·h):  x_high = x_low + m_t(h − (1 − e^{−2h})/2)·(x̂0_m − x̂0_s)/(r·h).

Noise sharing: W is one Gaussian process in λ with independent increments and Var = e^{2λ}
(a time-changed Brownian motion). The midpoint uses N_m = σ_m·e^{−λ_m}·(W(λ_m) − W(λ_s)) and the
full step N_t = σ_t·e^{−λ_t}·(W(λ_t) − W(λ_s)): the midpoint sees the first part of the same path
(in law: N_m = σ_m√(1 − e^{−2rh})·z₁, N_t = σ_t e^{−h}√(e^{2rh} − 1)·z₁ + σ_t√(1 − e^{−2(1−r)h})·z₂),
and N_t has the exact variance σ_t²(1 − e^{−2h}). Both members use the same N_t, so x_high − x_low
carries no raw noise: it is the drift-side local error (including the noise's effect on x̂0), which
the controller of ``adaptive`` (mixed tolerance, accept iff E ≤ 1, h ← min(λ_end − λ, θ·h·E^(−r)))
drives below the tolerance. The step h lives in λ units; h_init = 0.1 is about GGF's 0.01 in t at
t = T for VP.

Defaults that differ from GGF, and why (measured on the exact mixtures, benchmarks/adaptive_quick.py):
- ``brownian="memory"``: W is revealed lazily per sample with memory of the points a rejected
  attempt drew (:class:`~fastsde.brownian.BrownianMemory`), so a retried step sees the same
  path. With fresh noise after every rejection the accepted steps are those with small noise, and
  in low dimension the samples come out visibly too narrow even at tight tolerances. ``"tree"``
  (a per-sample Brownian tree) gives the same quality and a path that depends on the seed only
  (the same noise at every tolerance), at one normal draw per tree level instead of one per query:
  on the shipped digits model it spent 16 % of the wall time outside the network.
- ``use_prev=False``: δ uses |x_low| only. The previous proposal lives at the previous (noisier)
  level, which in one large λ-step can be 10³ times larger (VE, EDM) and would disable the test.
- ``max_growth=5``: while x̂0 hardly moves (early, high noise) E ≈ 0 and h would jump to the end.
- ``exponent=0.67``: E scales like h^{3/2} (the noise moves x̂0_m by O(√h)), so r = 1/1.5.
- ``reuse_rejected=True``: after a rejection (x, t) is unchanged, so x̂0_s is not evaluated again:
  an attempt after a rejection costs 1 NFE.

Each attempt costs 2 NFE; both members are exact for x̂0 constant along the path, and the high
member also for x̂0 linear in λ, which is why it needs far fewer steps than the Euler–Maruyama pair.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..sde import broadcast_to_rows
from .core.common import adaptive_options, adaptive_plan, log_snr_coordinate
from .core.context import SolverContext
from .core.spec import SolverSpec
from .core.stepper import Step, Stepper, StepResult, embedded

__all__ = ["ADAPTIVE_SDE_DPM", "SDEDPMPair"]

_R = 0.5  # midpoint ratio r


class SDEDPMPair(Stepper):
    """SDE-DPM-Solver++ 1 / 2S-midpoint pair in λ (2 NFE per attempt; error of order 1.5)."""

    order = 1.0
    error_order = 1.5
    nfe_per_step = 2
    coordinate = "logsnr"
    stochastic = True

    def step(self, x: Tensor, s: Step) -> StepResult:
        sde = self.sde
        dt = x.dtype
        ts, tn = s.t.to(torch.float64), s.t_next.to(torch.float64)
        lam_s, lam_t = sde.log_snr(ts), sde.log_snr(tn)
        h = lam_t - lam_s
        tm = sde.t_from_lambda(lam_s + _R * h)
        tm = torch.minimum(torch.maximum(tm, tn), ts)  # round-trip safety
        lam_m = sde.log_snr(tm)
        r = torch.where(h > 0, (lam_m - lam_s) / torch.where(h > 0, h, torch.ones_like(h)), torch.full_like(h, _R))
        sig_s, sig_m, sig_t = sde.marginal_std(ts), sde.marginal_std(tm), sde.marginal_std(tn)
        m_m, m_t = sde.mean_coeff(tm), sde.mean_coeff(tn)
        e2h = -torch.expm1(-2.0 * h)  # 1 − e^{−2h}

        def rows(v: Tensor) -> Tensor:
            return broadcast_to_rows(v.to(dt), x)

        a_t = rows(sig_t / sig_s * torch.exp(-h))
        b_t = rows(m_t * e2h)
        a_m = rows(sig_m / sig_s * torch.exp(-r * h))
        b_m = rows(m_m * -torch.expm1(-2.0 * r * h))
        safe_rh = torch.where(h > 0, r * h, torch.ones_like(h))
        c2 = rows(torch.where(h > 0, m_t * (h - 0.5 * e2h) / safe_rh, torch.zeros_like(h)))

        # W in λ with Var = e^{2λ}: N_m = σ_m e^{−λ_m}(W_m − W_s), N_t = σ_t e^{−λ_t}(W_t − W_s)
        w_m, w_t = s.brownian([lam_m, s.c_next])
        n_m = rows(sig_m * torch.exp(-lam_m)) * w_m.to(dt)
        n_t = rows(sig_t * torch.exp(-lam_t)) * w_t.to(dt)
        x0_s = sde.denoise(x, s.t, s.score0())
        u = a_m * x + b_m * x0_s + n_m
        tm_d = tm.to(dt)
        x0_m = sde.denoise(u, tm_d, s.score(u, tm_d))
        low = a_t * x + b_t * x0_s + n_t
        return embedded(low, low + c2 * (x0_m - x0_s), self.options["extrapolate"], x0_hat=x0_s)


def _build(ctx: SolverContext, opts: dict[str, Any]) -> dict[str, Any]:
    return adaptive_plan(ctx, SDEDPMPair(ctx, opts), opts, log_snr_coordinate(ctx), opts["h_init"])


ADAPTIVE_SDE_DPM = SolverSpec(
    name="adaptive_sde_dpm",
    build=_build,
    stepper=SDEDPMPair,
    options=adaptive_options(
        h_init=0.1, eps_rel=0.02, exponent=0.67, brownian="memory", use_prev=False, max_growth=5.0, reuse=True
    ),
    summary="adaptive SDE-DPM-Solver++ (1 / 2S midpoint pair in log-SNR, per-sample steps) on the reverse SDE",
    adaptive=True,
    tolerance="eps_rel",
)

"""Processes: closed forms agree with the SDE they claim to solve, inverses invert, the simulated
forward process has the stated marginals, and the PF-ODE carries data to the prior."""

from __future__ import annotations

import math

import pytest
import torch

import fastsde
from fastsde.problems import mixture_2d

T64 = torch.float64


def _times(sde: fastsde.SDE, n: int = 7) -> torch.Tensor:
    lo = max(sde.default_t_end, sde.t_min) * 2
    return torch.linspace(lo, sde.T * 0.99, n, dtype=T64)


def test_marginals_solve_the_linear_sde(process):
    """For x = m x0 + σ z under dx = a x dt + g dw: m' = a m and (σ²)' = 2a σ² + g²."""
    t = _times(process)
    dt = 1e-6 * process.T
    dm = (process.mean_coeff(t + dt) - process.mean_coeff(t - dt)) / (2 * dt)
    dvar = (process.marginal_std(t + dt) ** 2 - process.marginal_std(t - dt) ** 2) / (2 * dt)
    a, m, s, g = process.drift_coeff(t), process.mean_coeff(t), process.marginal_std(t), process.diffusion(t)
    torch.testing.assert_close(dm, a * m, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(dvar, 2 * a * s**2 + g**2, rtol=1e-5, atol=1e-8)


def test_log_snr_and_edm_sigma_invert(process):
    t = _times(process, 11)
    torch.testing.assert_close(process.t_from_lambda(process.log_snr(t)), t, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(process.t_from_edm_sigma(process.edm_sigma(t)), t, rtol=1e-9, atol=1e-12)
    lam = process.log_snr(t)
    assert bool((lam[1:] < lam[:-1]).all()), "log-SNR must decrease in t"
    torch.testing.assert_close(lam, torch.log(process.mean_coeff(t) / process.marginal_std(t)))


def test_published_closed_forms():
    t = torch.tensor([0.5], dtype=T64)
    vp = fastsde.VPSDE(0.1, 20.0)
    log_alpha = -0.25 * 0.25 * 19.9 - 0.5 * 0.5 * 0.1
    assert math.isclose(float(vp.mean_coeff(t)), math.exp(log_alpha), rel_tol=1e-12)
    assert math.isclose(float(vp.marginal_std(t)), math.sqrt(1 - math.exp(2 * log_alpha)), rel_tol=1e-12)
    sub = fastsde.SubVPSDE(0.1, 20.0)
    assert math.isclose(float(sub.marginal_std(t)), 1 - math.exp(2 * log_alpha), rel_tol=1e-12)  # not square-rooted
    ve = fastsde.VESDE(0.01, 50.0)
    assert math.isclose(float(ve.marginal_std(t)), 0.01 * (5000.0**0.5), rel_tol=1e-12)
    assert math.isclose(float(ve.diffusion(t)), 0.01 * 5000.0**0.5 * math.sqrt(2 * math.log(5000.0)), rel_tol=1e-12)
    edm = fastsde.EDM()
    assert (edm.T, edm.default_t_end) == (80.0, 0.002)
    assert (vp.T, vp.default_t_end, ve.default_t_end) == (1.0, 1e-3, 1e-5)


def test_reverse_family_and_denoise(process):
    x = torch.randn(4, 3, dtype=T64)
    s = torch.randn(4, 3, dtype=T64)
    t = _times(process, 4)
    g2 = process.diffusion(t)[:, None] ** 2
    f = process.drift(x, t)
    torch.testing.assert_close(process.reverse_drift(x, t, s, lam=1.0), f - g2 * s)
    torch.testing.assert_close(process.ode_drift(x, t, s), f - 0.5 * g2 * s)
    torch.testing.assert_close(process.reverse_drift(x, t, s, lam=2.0), f - 2.5 * g2 * s)
    m, sig = process.mean_coeff(t)[:, None], process.marginal_std(t)[:, None]
    torch.testing.assert_close(process.denoise(x, t, s), (x + sig**2 * s) / m)


def test_prior_logp_matches_torch_distributions(process):
    x = process.prior_sample(torch.randn(5, 2, 3, dtype=T64))
    ref = torch.distributions.Normal(0.0, process.prior_std).log_prob(x).sum(dim=(1, 2))
    torch.testing.assert_close(process.prior_logp(x), ref)


def ks_to_marginal(gm, x: torch.Tensor, t: float) -> float:
    """Largest over dimensions of the Kolmogorov–Smirnov distance between the samples' per-dimension
    empirical CDF and the exact marginal CDF at t, Σ_k w_k Φ((x − μ_kd)/s_kd) (a diagonal mixture's
    one-dimensional marginal is the one-dimensional mixture)."""
    w, mean, std = gm.marginal_params(t)
    mean, std = mean.reshape(len(w), -1), std.reshape(len(w), -1)
    flat = x.reshape(x.shape[0], -1)
    n = flat.shape[0]
    i = torch.arange(1, n + 1, dtype=T64)
    worst = 0.0
    for d in range(flat.shape[1]):
        xs, _ = torch.sort(flat[:, d])
        cdf = (w * 0.5 * (1 + torch.erf((xs[:, None] - mean[:, d]) / (std[:, d] * math.sqrt(2))))).sum(1)
        worst = max(worst, float(torch.maximum(i / n - cdf, cdf - (i - 1) / n).max()))
    return worst


#: Kolmogorov's critical value at the 0.1 % level, times 1/√n.
KS_CRIT = 1.95


def test_simulated_forward_marginals_match_closed_form(process):
    """Fine Euler–Maruyama on the forward SDE from exact data reproduces the diffused mixture: the
    first two moments, and the whole per-dimension distribution (Kolmogorov–Smirnov, at the 0.1 %
    level for n samples) halfway and at the end."""
    gm = mixture_2d(process)
    g = torch.Generator().manual_seed(0)
    n, steps = 20000, 400
    x = gm.sample(n, generator=g)
    t0 = process.t_min if process.t_min > 0 else 0.0
    if t0 > 0:  # EDM starts at σ_min: the data are convolved with it
        x = x + t0 * torch.randn(x.shape, generator=g, dtype=T64)
    t1 = process.T * 0.3 if not isinstance(process, fastsde.EDM) else 1.0
    grid = torch.linspace(t0, t1, steps + 1, dtype=T64)
    for k in range(steps):
        t = grid[k].expand(n)
        h = float(grid[k + 1] - grid[k])
        x = (
            x
            + h * process.drift(x, t)
            + process.diffusion(t)[:, None] * math.sqrt(h) * torch.randn(x.shape, generator=g, dtype=T64)
        )
        if k + 1 == steps // 2:
            t_half = float(grid[k + 1])
            assert ks_to_marginal(gm, x, t_half) < KS_CRIT / math.sqrt(n)
    assert ks_to_marginal(gm, x, t1) < KS_CRIT / math.sqrt(n)
    w, mean, std = gm.marginal_params(t1)
    exact_mean = (w[:, None] * mean).sum(0)
    exact_var = (w[:, None] * (std**2 + mean**2)).sum(0) - exact_mean**2
    se = exact_var.sqrt() / math.sqrt(n)
    assert bool(((x.mean(0) - exact_mean).abs() < 5 * se + 0.01 * exact_var.sqrt()).all())
    assert bool(((x.var(0) / exact_var - 1).abs() < 0.05).all())


def test_pf_ode_from_data_reaches_the_prior(process):
    """RK4 on the probability-flow ODE with the exact score, from data at t_end to T: the endpoint is
    distributed as the prior (mean 0, std prior_std per dimension)."""
    gm = mixture_2d(process)
    g = torch.Generator().manual_seed(1)
    n = 4000
    t_end = process.default_t_end
    x = gm.sample(n, t=t_end, generator=g)
    lam = process.log_snr(torch.tensor([t_end, process.T], dtype=T64))
    grid = process.t_from_lambda(torch.linspace(float(lam[0]), float(lam[1]), 200, dtype=T64))
    grid[0], grid[-1] = t_end, process.T

    def f(x, t):
        tt = torch.full((n,), t, dtype=T64)
        return process.ode_drift(x, tt, gm.score(x, tt))

    for k in range(len(grid) - 1):
        t, h = float(grid[k]), float(grid[k + 1] - grid[k])
        k1 = f(x, t)
        k2 = f(x + h / 2 * k1, t + h / 2)
        k3 = f(x + h / 2 * k2, t + h / 2)
        k4 = f(x + h * k3, t + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    std = process.prior_std
    _, mean_T, std_T = gm.marginal_params(process.T)
    exact_std = float(std_T.max())  # at T the marginal is the prior to within the data's residual
    assert abs(exact_std / std - 1) < 0.01
    assert bool((x.mean(0).abs() < 5 * std / math.sqrt(n) + float(mean_T.abs().max())).all())
    assert bool(((x.std(0) / std - 1).abs() < 0.05).all())
    assert ks_to_marginal(gm, x, process.T) < KS_CRIT / math.sqrt(n)  # distributed as the marginal at T


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: fastsde.VPSDE(beta_min=-1.0), "beta_min"),
        (lambda: fastsde.VPSDE(beta_min=5.0, beta_max=1.0), "beta_max"),
        (lambda: fastsde.VESDE(sigma_min=1.0, sigma_max=0.5), "sigma_max"),
        (lambda: fastsde.EDM(sigma_min=0.0), "sigma_min"),
    ],
)
def test_bad_parameters_are_value_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_check_time_names_the_range():
    with pytest.raises(ValueError, match=r"t_end must lie in \(0, 1\]"):
        fastsde.VPSDE().check_time("t_end", 1.5)
    with pytest.raises(ValueError, match=r"t_end must lie in \[0.002, 80\]"):
        fastsde.EDM().check_time("t_end", 0.001)

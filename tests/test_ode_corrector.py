"""PF-ODE + Langevin corrector (``ode_corrector``) and the driver's correctors.

The correctors are checked at a fixed t on an exact Gaussian q_t = N(μ_t, S_t), where the score is
linear and one corrector call is a linear Gaussian map whose output moments are known in closed
form; the underdamped integrator is also checked against the analytic moments of the
Ornstein–Uhlenbeck (x, v) process (matrix exponential, Van Loan's integral), to which it converges as
its step shrinks. The solver is checked for its NFE accounting, placement, equality with the plain
predictor at corrector_steps = 0, and refusal of bad options before any compute.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

import fastsde
from fastsde.noise import NoiseSource
from fastsde.score import CountingScore
from fastsde.solvers.core.context import SolverContext
from fastsde.solvers.core.correctors import Langevin, Underdamped, ulmc_coefficients

F64 = torch.float64
MU, S_DATA = 0.7, 0.4  # data N(MU, S_DATA²) per coordinate
T_FIX = 0.3  # the fixed time of the corrector tests (VP: σ_t ≈ 0.72, q_t std ≈ 0.79)


def gaussian(sde: fastsde.SDE, dims: int = 4) -> fastsde.GaussianMixture:
    return fastsde.GaussianMixture([1.0], torch.full((1, dims), MU, dtype=F64), [S_DATA], sde)


def marginal(sde: fastsde.SDE, t: float) -> tuple[float, float, float]:
    """(mean, variance of q_t, marginal std σ_t) per coordinate."""
    tt = torch.tensor([t], dtype=F64)
    m, sig = float(sde.mean_coeff(tt)), float(sde.marginal_std(tt))
    return m * MU, m * m * S_DATA**2 + sig * sig, sig


def corrected(corrector, sde: fastsde.SDE, x: torch.Tensor, t: float, seed: int = 0) -> tuple[torch.Tensor, float]:
    """One corrector call on x at time t; returns (x', mean NFE per sample)."""
    n = x.shape[0]
    ctx = SolverContext(sde, CountingScore(gaussian(sde, x.shape[1]), n), NoiseSource.from_seed(seed, n), 1.0, 1e-3)
    key = torch.zeros(n, dtype=torch.int64)
    out = corrector(ctx, x, torch.full((n,), t, dtype=F64), None, key, None)
    return out, ctx.score.nfe


def exact_start(sde: fastsde.SDE, n: int, dims: int, t: float) -> torch.Tensor:
    mean, var, _ = marginal(sde, t)
    g = torch.Generator().manual_seed(123)
    return mean + math.sqrt(var) * torch.randn(n, dims, generator=g, dtype=F64)


def assert_moments(x: torch.Tensor, mean: float, var: float, sds: float = 4.5) -> None:
    """Pooled mean and variance within `sds` Monte Carlo standard errors."""
    v = x.reshape(-1)
    n = v.numel()
    assert abs(float(v.mean()) - mean) < sds * math.sqrt(var / n), (float(v.mean()), mean)
    assert abs(float(v.var()) - var) < sds * var * math.sqrt(2.0 / n), (float(v.var()), var)


# ---------------------------------------------------------------------------------------------
# Overdamped: x' = x + ε·s + √(2ε)·z leaves N(μ, S) at S + ε²/S per step (closed form)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 3])
def test_overdamped_sigma_rule_bias_is_the_closed_form(steps):
    sde = fastsde.VPSDE()
    mean, var, sig = marginal(sde, T_FIX)
    kappa = 0.6  # large, so that the discretisation bias is far above the Monte Carlo error
    eps = kappa * sig**2
    expected = var
    for _ in range(steps):  # Var' = (1 − ε/S)²·Var + 2ε
        expected = (1.0 - eps / var) ** 2 * expected + 2.0 * eps
    x = exact_start(sde, 40_000, 4, T_FIX)
    out, nfe = corrected(Langevin(steps, rule="sigma", kappa=kappa), sde, x, T_FIX)
    assert nfe == steps
    assert expected > var * 1.05  # the bias is visible ...
    assert_moments(out, mean, expected)  # ... and is exactly the stated one


def test_overdamped_small_step_leaves_the_marginal_nearly_invariant():
    sde = fastsde.EDM()
    t = 1.5
    mean, var, _ = marginal(sde, t)
    x = exact_start(sde, 40_000, 4, t)
    out, _ = corrected(Langevin(2, rule="sigma", kappa=0.05), sde, x, t)
    assert_moments(out, mean, var * (1 + 0.05**2 * 2))


# ---------------------------------------------------------------------------------------------
# Underdamped: the frozen-score OU integrator
# ---------------------------------------------------------------------------------------------


def scheme_moments(var: float, sig: float, friction: float, duration: float, steps: int, x0: tuple[float, float]):
    """Exact mean and covariance of (x − μ, v) after `steps` frozen-score steps from (x0 mean, x0 var)
    and a fresh v ~ N(0, 1), for the linear score −(x − μ)/var: the scheme is a linear Gaussian map."""
    c = ulmc_coefficients(friction, duration, steps)
    m_map = torch.tensor([[1.0 - sig**2 * c["A2"] / var, sig * c["A1"]], [-sig * c["A1"] / var, c["e"]]], dtype=F64)
    q = torch.tensor(
        [[sig**2 * c["a"] ** 2, sig * c["a"] * c["b1"]], [sig * c["a"] * c["b1"], c["b1"] ** 2 + c["b2"] ** 2]],
        dtype=F64,
    )
    mean = torch.tensor([x0[0], 0.0], dtype=F64)
    cov = torch.diag(torch.tensor([x0[1], 1.0], dtype=F64))
    for _ in range(steps):
        mean, cov = m_map @ mean, m_map @ cov @ m_map.T + q
    return mean, cov


def ou_moments(var: float, sig: float, friction: float, duration: float, x0: tuple[float, float]):
    """Analytic mean and covariance of the underdamped Langevin SDE for a quadratic potential:
    d(x, v) = A·(x, v) ds + (0, √(2γ)) dB, A = [[0, 1], [−1/var, −γ]], over time duration·σ."""
    gamma, horizon = friction / sig, duration * sig
    a = np.array([[0.0, 1.0], [-1.0 / var, -gamma]])
    bb = np.array([[0.0, 0.0], [0.0, 2.0 * gamma]])
    block = np.block([[-a, bb], [np.zeros((2, 2)), a.T]]) * horizon
    e = scipy.linalg.expm(block)
    phi = torch.tensor(e[2:, 2:].T, dtype=F64)  # e^{A·T}
    noise = phi @ torch.tensor(e[:2, 2:], dtype=F64)  # ∫ e^{As} BBᵀ e^{Aᵀs} ds
    mean = phi @ torch.tensor([x0[0], 0.0], dtype=F64)
    cov = phi @ torch.diag(torch.tensor([x0[1], 1.0], dtype=F64)) @ phi.T + noise
    return mean, cov


def test_ulmc_coefficients_series_and_direct_forms_agree():
    for u in (1e-4, 9.99e-4, 1.001e-3, 0.01):
        low = ulmc_coefficients(1.0, u * (1 - 1e-9), 1)
        high = ulmc_coefficients(1.0, u * (1 + 1e-9), 1)
        assert low["a"] == pytest.approx(high["a"], rel=1e-6)
    c = ulmc_coefficients(2.0, 1.0, 1)  # u = 2: Var ξ_v = 1 − e^{−4}
    assert c["b1"] ** 2 + c["b2"] ** 2 == pytest.approx(1.0 - math.exp(-4.0), rel=1e-14)


def test_underdamped_scheme_converges_to_the_analytic_ou_moments():
    """From x − μ ~ N(1, 0.2) (off target) and a fresh velocity, the scheme's moments approach the
    OU process's as the step shrinks, at first order or better."""
    var, sig, fr, dur = 0.6, 0.7, 2.0, 1.5
    start = (1.0, 0.2)
    exact_mean, exact_cov = ou_moments(var, sig, fr, dur, start)
    errors = []
    for k in (4, 8, 16, 32, 64):
        mean, cov = scheme_moments(var, sig, fr, dur, k, start)
        errors.append(float((mean - exact_mean).abs().max() + (cov - exact_cov).abs().max()))
    slopes = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert errors[-1] < 0.01 and min(slopes) > 0.9, (errors, slopes)
    # the exact stationary law: the SDE leaves (N(0, var), N(0, 1)) invariant
    _, cov_stat = ou_moments(var, sig, fr, dur, (0.0, var))
    torch.testing.assert_close(cov_stat, torch.diag(torch.tensor([var, 1.0], dtype=F64)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 4])
def test_underdamped_sampler_has_the_schemes_moments(steps):
    """Monte Carlo over the implementation (keyed noise, fresh velocity) against the scheme's exact
    linear-Gaussian propagation, started from the exact marginal: the stated discretisation bias."""
    sde = fastsde.VPSDE()
    mean, var, sig = marginal(sde, T_FIX)
    fr, dur = 2.0, 3.0  # long and coarse: bias far above the Monte Carlo error at steps=1
    _, cov = scheme_moments(var, sig, fr, dur, steps, (0.0, var))
    x = exact_start(sde, 40_000, 4, T_FIX)
    out, nfe = corrected(Underdamped(steps, friction=fr, duration=dur), sde, x, T_FIX)
    assert nfe == steps
    assert_moments(out, mean, float(cov[0, 0]))
    if steps == 1:
        assert abs(float(cov[0, 0]) / var - 1.0) > 0.05  # the stated bias is not negligible here


def test_underdamped_pulls_an_off_target_start_towards_q_t():
    sde = fastsde.EDM()
    t = 2.0
    mean, var, sig = marginal(sde, t)
    x = (
        mean
        + 2.5 * math.sqrt(var)
        + 0.3 * torch.randn(20_000, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    )
    out, _ = corrected(Underdamped(8, duration=3.0), sde, x, t)
    approx_mean, approx_cov = scheme_moments(var, sig, 2.0, 3.0, 8, (2.5 * math.sqrt(var), 0.09))
    assert_moments(out, mean + float(approx_mean[0]), float(approx_cov[0, 0]))
    assert abs(float(out.mean()) - mean) < 0.5 * abs(float(x.mean()) - mean)


# ---------------------------------------------------------------------------------------------
# The solver
# ---------------------------------------------------------------------------------------------


class Times:
    """A score that records the time and row count of each call."""

    def __init__(self, score):
        self.score, self.calls = score, []

    def __call__(self, x, t):
        self.calls.append((x.shape[0], t.clone()))
        return self.score(x, t)


@pytest.mark.parametrize("predictor", ["ddim", "heun", "dpmpp_2m", "dpmpp_3m"])
def test_without_corrector_it_is_the_predictor_bit_for_bit(predictor):
    sde = fastsde.VPSDE()
    gm = gaussian(sde, 3)
    kw = dict(seed=4, dtype=F64, steps=9)
    plain = fastsde.sample(gm, sde, (5, 3), solver=predictor, grid="logsnr", **kw)
    oc = fastsde.sample(gm, sde, (5, 3), solver="ode_corrector", predictor=predictor, corrector_steps=0, **kw)
    assert torch.equal(plain.samples, oc.samples) and torch.equal(plain.nfe_per_sample, oc.nfe_per_sample)
    assert not fastsde.SOLVERS["ode_corrector"].is_stochastic({"corrector_steps": 0})


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"corrector": "overdamped", "corrector_steps": 2},
        {"corrector": "overdamped", "step_rule": "snr"},
        {"every": 3},
        {"sigma_max": 0.3},
        {"correct_end": True, "corrector_steps": 3},
        {"predictor": "heun", "every": 2},
    ],
)
def test_nfe_is_predictor_plus_k_per_corrected_point(opts):
    """The corrector runs (and is counted) exactly at the points the placement names."""
    sde = fastsde.VPSDE()
    rec = Times(gaussian(sde, 2))
    steps = 10
    res = fastsde.sample(rec, sde, (4, 2), solver="ode_corrector", steps=steps, seed=1, dtype=F64, **opts)
    spec = fastsde.SOLVERS["ode_corrector"]
    expected = spec.fixed_nfe({**opts, "steps": steps}, denoise=True, sde=sde)
    assert res.nfe_per_sample.tolist() == [float(expected)] * 4
    assert sum(rows for rows, _ in rec.calls) == 4 * expected
    if "sigma_max" in opts:
        grid = fastsde.grids.time_grid(sde, "logsnr", steps, 1.0, sde.default_t_end)
        k = int((sde.marginal_std(grid[1:-1]) <= 0.3).sum())
        assert 0 < k < steps - 2 and expected == steps + k


def test_corrector_improves_a_coarse_predictor_on_a_gaussian():
    """On N(μ, s²) data a 6-point DDIM predictor shrinks the spread; the underdamped corrector,
    at its defaults, brings the sample variance closer to the truth (measured, 8192 samples)."""
    sde = fastsde.VPSDE()
    gm = gaussian(sde, 8)
    kw = dict(steps=6, seed=0, dtype=F64)
    plain = fastsde.sample(gm, sde, (1024, 8), solver="ode_corrector", corrector_steps=0, **kw)
    dpum = fastsde.sample(gm, sde, (1024, 8), solver="ode_corrector", **kw)
    err_plain = abs(float(plain.samples.var()) / S_DATA**2 - 1.0)
    err_dpum = abs(float(dpum.samples.var()) / S_DATA**2 - 1.0)
    assert err_dpum < err_plain, (err_plain, err_dpum)


def test_adaptive_predictor_with_corrector_reevaluates_its_fsal_value():
    """predictor='ode': after a corrected point the stale FSAL field is re-evaluated (1 NFE), so the
    solve stays accurate; without it the next step would use the field of the old position."""
    sde = fastsde.VPSDE()
    gm = gaussian(sde, 4)
    kw = dict(predictor="ode", duration=0.25, corrector_steps=2, seed=2, dtype=F64)  # a corrector of small bias
    res = fastsde.sample(gm, sde, (512, 4), solver="ode_corrector", **kw)
    s = res.stats
    attempts = (s["accepted"] + s["rejected"]).double()
    corrected = s["accepted"].double() - 1  # every accepted point but t_end
    base = 1 + 1 + 6 * attempts + 2 * corrected  # init, h_init selection, attempts, corrector (K = 2)
    refreshed = res.nfe_per_sample - 1 - base  # minus the denoise
    assert bool((refreshed >= corrected - 1).all()) and bool((refreshed <= corrected + s["rejected"]).all())
    assert abs(float(res.samples.var()) / S_DATA**2 - 1.0) < 0.05


@pytest.mark.parametrize(
    "opts,match",
    [
        ({"corrector": "langevin"}, "corrector must be one of"),
        ({"predictor": "em"}, "predictor must be one of"),
        ({"friction": 0.0}, "friction must be > 0"),
        ({"duration": -1.0}, "duration must be > 0"),
        ({"kappa": math.nan}, "kappa must be a finite number"),
        ({"corrector_steps": -1}, "corrector_steps must be an integer >= 0"),
        ({"every": 0}, "every must be an integer >= 1"),
        ({"sigma_max": math.nan}, "sigma_max must be a number > 0"),
        ({"step_rule": "fixed"}, "step_rule must be one of"),
        ({"predictor": "ode", "every": 2}, "every needs a fixed-grid predictor"),
        ({"correct_end": 1}, "correct_end must be True or False"),
    ],
)
def test_bad_options_are_refused_before_compute(opts, match):
    sde = fastsde.VPSDE()
    rec = Times(gaussian(sde, 2))
    with pytest.raises(ValueError, match=match):
        fastsde.sample(rec, sde, (3, 2), solver="ode_corrector", seed=0, **opts)
    assert rec.calls == []


def test_declarations():
    spec = fastsde.SOLVERS["ode_corrector"]
    assert spec.nfe_per_step == 2 and spec.stochastic and spec.order == 0.0
    assert spec.order_for({"corrector_steps": 0, "predictor": "heun"}) == 2.0
    assert spec.nfe_per_step_for({"predictor": "heun", "corrector_steps": 3}) == 5
    assert spec.fixed_nfe({"steps": 10}) == 9 + 8 + 1
    assert spec.fixed_nfe({"steps": 10, "sigma_max": 0.5}) is None  # needs the process's grid
    assert spec.fixed_nfe({"predictor": "ode"}) is None


def test_uncorrected_points_keep_the_multistep_history():
    """Only the rows the corrector moves restart the predictor: with sigma_max below every grid
    level nothing is corrected and dpmpp_2m runs as itself, bit for bit (second-order moves)."""
    sde = fastsde.VPSDE()
    gm = gaussian(sde, 3)
    kw = dict(seed=4, dtype=F64, steps=9, predictor="dpmpp_2m")
    plain = fastsde.sample(gm, sde, (5, 3), solver="ode_corrector", corrector_steps=0, **kw)
    none_corrected = fastsde.sample(gm, sde, (5, 3), solver="ode_corrector", sigma_max=1e-6, **kw)
    assert torch.equal(plain.samples, none_corrected.samples)
    assert torch.equal(plain.nfe_per_sample, none_corrected.nfe_per_sample)
    low = fastsde.sample(gm, sde, (5, 3), solver="ode_corrector", sigma_max=0.3, **kw)
    low_ddim = fastsde.sample(gm, sde, (5, 3), solver="ode_corrector", sigma_max=0.3, **{**kw, "predictor": "ddim"})
    assert not torch.allclose(low.samples, low_ddim.samples)  # the second-order moves above σ 0.3 stay

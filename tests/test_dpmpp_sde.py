"""SDE-DPM-Solver++(2M) (``dpmpp_2m_sde``) on exact float64 mixtures: the distribution it samples, its
one-move closed form, its η = 0 limit, NFE accounting, determinism and bad input."""

from __future__ import annotations

import pytest
import torch
from test_convergence import fitted_order
from test_fixed_solvers import PROCESSES, assert_matches_marginal

import fastsde
from fastsde.noise import NoiseSource, Stream
from fastsde.problems import mixture_2d
from fastsde.score import NonFiniteScoreError

F64 = torch.float64


@pytest.mark.parametrize("name", list(PROCESSES))
def test_samples_match_exact_marginal(name):
    sde = PROCESSES[name]()
    gm = mixture_2d(sde)
    res = fastsde.sample(gm, sde, (2000, 2), solver="dpmpp_2m_sde", seed=0, dtype=F64, denoise=False, steps=60)
    assert_matches_marginal(gm, res.samples, sde.default_t_end)


@pytest.mark.parametrize("name", ["vp", "ve", "edm"])
def test_one_move_is_the_first_order_sde_step(name):
    """Two grid points = one move: x_t = (σ_t/σ_s)e^{−h}x_s + m_t(1 − e^{−2h})x̂0_s + σ_t√(1 − e^{−2h})·z."""
    sde = PROCESSES[name]()
    gm = mixture_2d(sde)
    x = sde.prior_sample(torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(3)))
    t_end = 0.3 if name != "edm" else 1.0
    res = fastsde.sample(
        gm, sde, (16, 2), solver="dpmpp_2m_sde", seed=5, x_init=x, dtype=F64, denoise=False, steps=2, t_end=t_end
    )
    s = torch.full((16,), sde.T, dtype=F64)
    t = torch.full((16,), t_end, dtype=F64)
    h = sde.log_snr(t) - sde.log_snr(s)
    x0 = sde.denoise(x, s, gm.score(x, s))
    z = NoiseSource.from_seed(5, 16).normal((2,), Stream.STEP, 0, dtype=F64)
    expect = (
        (sde.marginal_std(t) / sde.marginal_std(s) * torch.exp(-h))[:, None] * x
        + (sde.mean_coeff(t) * -torch.expm1(-2 * h))[:, None] * x0
        + (sde.marginal_std(t) * torch.sqrt(-torch.expm1(-2 * h)))[:, None] * z
    )
    assert torch.allclose(res.samples, expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_eta_zero_midpoint_is_dpmpp_2m(name):
    """With no noise the midpoint form is algebraically DPM-Solver++(2M)."""
    sde = PROCESSES[name]()
    gm = mixture_2d(sde)
    kw = dict(seed=1, dtype=F64, steps=12, lower_order_final=True)
    a = fastsde.sample(gm, sde, (32, 2), solver="dpmpp_2m_sde", eta=0.0, solver_type="midpoint", **kw)
    b = fastsde.sample(gm, sde, (32, 2), solver="dpmpp_2m", **kw)
    assert torch.allclose(a.samples, b.samples, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("form", ["midpoint", "heun"])
def test_both_forms_are_second_order_in_the_ode_limit(form):
    """η = 0 on the PF-ODE: fitted order of the median error against a tight reference, as in
    test_convergence.py (the median ignores the few samples on a mode boundary)."""
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)
    x_T = sde.prior_sample(torch.randn(200, 2, dtype=F64, generator=torch.Generator().manual_seed(0)))
    kw = dict(x_init=x_T, dtype=F64, denoise=False)
    ref = fastsde.sample(gm, sde, (200, 2), solver="heun", steps=1024, **kw).samples
    steps, errors = [32, 64, 128], []
    for n in steps:
        out = fastsde.sample(
            gm, sde, (200, 2), solver="dpmpp_2m_sde", steps=n, eta=0.0, solver_type=form, lower_order_final=False, **kw
        ).samples
        errors.append(float((out - ref).norm(dim=1).median()))
    order = fitted_order(steps, errors)
    assert 1.8 <= order <= 2.4, f"{form}: errors {errors}, fitted order {order:.2f}"


def test_nfe_determinism_and_batch_independence():
    sde = fastsde.VESDE()
    gm = mixture_2d(sde)
    full = fastsde.sample(gm, sde, (24, 2), solver="dpmpp_2m_sde", seed=[10 + i for i in range(24)], dtype=F64, steps=9)
    assert full.nfe == 9 and full.calls == 9 and bool((full.nfe_per_sample == 9).all())
    again = fastsde.sample(
        gm, sde, (24, 2), solver="dpmpp_2m_sde", seed=[10 + i for i in range(24)], dtype=F64, steps=9
    )
    assert torch.equal(full.samples, again.samples)
    part = fastsde.sample(gm, sde, (5, 2), solver="dpmpp_2m_sde", seed=[10 + i for i in range(5)], dtype=F64, steps=9)
    assert torch.allclose(part.samples, full.samples[:5], rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(eta=-0.5), r"eta must be >= 0, got -0.5"),
        (dict(eta=float("nan")), "eta must be a finite number, got nan"),
        (dict(solver_type="euler"), "solver_type must be one of"),
        (dict(steps=1), "steps must be an integer >= 2"),
        (dict(order=3), "unknown option"),
    ],
)
def test_bad_options_are_value_errors_before_compute(options, message):
    calls = []

    def score(x, t):
        calls.append(1)
        return -x

    with pytest.raises(ValueError, match=message):
        fastsde.sample(score, fastsde.VPSDE(), (4, 2), solver="dpmpp_2m_sde", **options)
    assert not calls


def test_nan_score_raises_naming_the_time():
    def score(x, t):
        out = -x.clone()
        out[t < 0.5] = float("nan")
        return out

    with pytest.raises(NonFiniteScoreError, match=r"t = \[0\.4"):
        fastsde.sample(score, fastsde.VPSDE(), (4, 2), solver="dpmpp_2m_sde", steps=11, grid="uniform", dtype=F64)


# ---------------------------------------------------------------------------------------------
# corrector=True: each move redone with the score at its end (no extra NFE)
# ---------------------------------------------------------------------------------------------


def test_corrector_replays_the_specified_update():
    """Move k − 1 is redone with x̂0 linear in λ between its ends once move k has evaluated x̂0_k; the
    corrected point is where move k starts; the last move is not corrected; NFE is unchanged."""
    sde = fastsde.VESDE()
    gm = mixture_2d(sde)
    x_T = sde.prior_sample(torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(4)))
    seen = []
    res = fastsde.sample(
        gm, sde, (8, 2), solver="dpmpp_2m_sde", seed=3, x_init=x_T, dtype=F64, denoise=False, steps=6,
        corrector=True, callback=lambda i: seen.append((i.t.clone(), i.x.clone())),
    )  # fmt: skip
    assert res.nfe == 5.0
    noise = NoiseSource.from_seed(3, 8)
    x, t = x_T, torch.full((8,), sde.T, dtype=F64)
    x0_old = base_old = lin_old = h_old = None
    for k, (t_next, x_reported) in enumerate(seen):
        x0 = sde.denoise(x, t, gm(x, t))
        if k > 0:
            x = base_old + lin_old[:, None] * (x0 - x0_old) / h_old[:, None]
        lam_s, lam_t = sde.log_snr(t), sde.log_snr(t_next)
        h = lam_t - lam_s
        m_t, s_t, s_s = sde.mean_coeff(t_next), sde.marginal_std(t_next), sde.marginal_std(t)
        one_minus = 1 - torch.exp(-2 * h)
        z = noise.normal((2,), Stream.STEP, k, dtype=F64)
        base = (
            (s_t / s_s * torch.exp(-h))[:, None] * x
            + (m_t * one_minus)[:, None] * x0
            + (s_t * one_minus.sqrt())[:, None] * z
        )
        first_order = k in (0, len(seen) - 1)  # below 15 moves the last one is first order
        out = base if first_order else base + (0.5 * m_t * one_minus * h)[:, None] * (x0 - x0_old) / h_old[:, None]
        assert torch.allclose(x_reported, out, rtol=1e-10, atol=1e-12), k
        x0_old, base_old, lin_old, h_old = x0, base, m_t * h * (1 - one_minus / (2 * h)), h
        x, t = out, t_next
    assert torch.allclose(res.samples, x, rtol=1e-10, atol=1e-12)


def test_corrector_keeps_second_order_with_a_smaller_error_in_the_ode_limit():
    """η = 0 (PF-ODE): still second order, and the error constant drops (measured 3.2–3.8× at 32–128 steps)."""
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)
    x_T = sde.prior_sample(torch.randn(200, 2, dtype=F64, generator=torch.Generator().manual_seed(0)))
    kw = dict(x_init=x_T, dtype=F64, denoise=False)
    ref = fastsde.sample(gm, sde, (200, 2), solver="heun", steps=1024, **kw).samples
    steps, errors = [32, 64, 128], {False: [], True: []}
    for corrector in (False, True):
        for n in steps:
            out = fastsde.sample(
                gm, sde, (200, 2), solver="dpmpp_2m_sde", steps=n, eta=0.0, lower_order_final=False,
                corrector=corrector, **kw,
            ).samples  # fmt: skip
            errors[corrector].append(float((out - ref).norm(dim=1).median()))
    order = fitted_order(steps, errors[True])
    assert 1.8 <= order <= 2.4, f"errors {errors[True]}, fitted order {order:.2f}"
    assert all(c < 0.5 * p for c, p in zip(errors[True], errors[False])), errors


def test_corrector_improves_the_law_at_few_steps():
    """VE 16-D mixture, 15 steps: the per-mode Fréchet distance drops (n = 10 000: 2.9 τ → 1.3 τ)."""
    from fastsde.metrics.mixture import mixture_frechet
    from fastsde.problems import mixture_nd

    sde = fastsde.VESDE()
    gm = mixture_nd(sde, dim=16)
    fd = {
        c: mixture_frechet(
            fastsde.sample(
                gm, sde, (4000, 16), solver="dpmpp_2m_sde", seed=0, dtype=F64, steps=15, corrector=c
            ).samples,
            gm,
        ).value
        for c in (False, True)
    }
    assert fd[True] < 0.7 * fd[False], fd

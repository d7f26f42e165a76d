"""Fixed-step samplers (EM, reverse diffusion, ancestral, PC, Euler, Heun, DDIM, DPM-Solver++(2M)) on exact
float64 mixtures: per-mode statistics, the papers' update formulas, NFE accounting, determinism,
stopping and NaN handling."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import Tensor

import fastsde
from fastsde.grids import time_grid
from fastsde.noise import NoiseSource, Stream
from fastsde.problems import mixture_2d as make_mixture
from fastsde.score import GaussianMixture, NonFiniteScoreError
from fastsde.sde import grid_beta

NEW_SOLVERS = ["reverse_diffusion", "ancestral", "pc", "euler", "heun", "ddim", "dpmpp_2m"]
F64 = torch.float64
PROCESSES = {
    "vp": fastsde.VPSDE,
    "subvp": fastsde.SubVPSDE,
    "ve": lambda: fastsde.VESDE(sigma_min=0.01, sigma_max=50.0),
    "edm": lambda: fastsde.EDM(sigma_min=0.002, sigma_max=80.0),
}


# ---------------------------------------------------------------------------------------------
# Helpers: per-mode statistics against the exact marginal, with tolerances from the sampling error
# ---------------------------------------------------------------------------------------------


def mode_stats(gm: GaussianMixture, x: Tensor, t: float) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:
    """Assign each sample to its most probable mode at time t; return weights, means, stds, counts."""
    comp = gm.responsibilities(x, t).argmax(dim=1)
    k = gm.weights.shape[0]
    counts = torch.bincount(comp, minlength=k)
    flat = x.reshape(x.shape[0], -1)
    means = [flat[comp == j].mean(0) for j in range(k)]
    stds = [flat[comp == j].std(0) for j in range(k)]
    return counts.double() / x.shape[0], means, stds, counts


def assert_matches_marginal(gm: GaussianMixture, x: Tensor, t: float, z: float = 4.0) -> None:
    """Per-mode weights, means and stds of x match the exact marginal at t within z standard errors
    (weights: √(w(1−w)/n); means: s/√n_k; stds: s/√(2n_k), the Gaussian standard errors)."""
    assert bool(torch.isfinite(x).all()), "non-finite samples"
    n = x.shape[0]
    w, mu, sd = gm.marginal_params(t)
    ws, means, stds, counts = mode_stats(gm, x.to(F64), t)
    w_tol = z * (w * (1 - w) / n).sqrt()
    assert bool(((ws - w).abs() <= w_tol).all()), f"weights {ws.tolist()} vs {w.tolist()} (tol {w_tol.tolist()})"
    for j in range(w.shape[0]):
        s = sd[j].reshape(-1)
        nk = int(counts[j])
        mean_err = (means[j] - mu[j].reshape(-1)).abs() / (s / math.sqrt(nk))
        std_err = (stds[j] - s).abs() / (s / math.sqrt(2 * nk))
        assert float(mean_err.max()) <= z, f"mode {j}: mean off by {mean_err.tolist()} standard errors"
        assert float(std_err.max()) <= z, f"mode {j}: std off by {std_err.tolist()} standard errors"


# Step counts at which each sampler's discretisation bias is at most about one standard error of
# 2000 samples (measured per process by the same statistics on 20000 samples).
STAT_CASES = [
    ("em", dict(steps=500)),
    ("reverse_diffusion", dict(steps=1000)),
    ("ancestral", dict(steps=1000)),
    ("pc", dict(steps=500)),
    ("pc", dict(steps=500, predictor="em")),
    ("euler", dict(steps=400)),
    ("heun", dict(steps=60)),
    ("heun", dict(steps=100, s_churn=20.0)),
    ("ddim", dict(steps=400)),
    ("ddim", dict(steps=400, eta=1.0, grid="logsnr")),
    ("dpmpp_2m", dict(steps=80)),
]


@pytest.mark.parametrize("solver, options", STAT_CASES, ids=[f"{s}-{i}" for i, (s, _) in enumerate(STAT_CASES)])
def test_samples_match_exact_marginal(process, solver, options):
    gm = make_mixture(process)
    res = fastsde.sample(gm, process, (2000, 2), solver=solver, seed=0, dtype=F64, denoise=False, **options)
    assert_matches_marginal(gm, res.samples, process.default_t_end)


@pytest.mark.parametrize("solver", ["em", *NEW_SOLVERS])
def test_float32_runs_and_agrees_with_float64(process, solver):
    gm = make_mixture(process)
    kw = dict(solver=solver, seed=2, steps=30, denoise=True)
    a = fastsde.sample(gm, process, (64, 2), dtype=torch.float32, **kw).samples
    b = fastsde.sample(gm, process, (64, 2), dtype=F64, **kw).samples
    assert a.dtype == torch.float32 and b.dtype == F64 and bool(torch.isfinite(a).all())
    # Same keyed noise in both precisions: most samples agree to float32 accuracy (a few may
    # cross a mode boundary along a stochastic path).
    assert float((a.double() - b).abs().max(dim=1).values.median()) < 1e-3


# ---------------------------------------------------------------------------------------------
# The papers' formulas, one move at a time
# ---------------------------------------------------------------------------------------------


def _one_move(solver, sde, x, **options):
    gm = make_mixture(sde)
    res = fastsde.sample(
        gm,
        sde,
        tuple(x.shape),
        solver=solver,
        seed=7,
        x_init=x,
        dtype=F64,
        denoise=False,
        steps=2,
        grid="uniform",
        **options,
    )
    t0 = torch.full((x.shape[0],), sde.T, dtype=F64)
    t1 = torch.full((x.shape[0],), options.get("t_end", sde.default_t_end), dtype=F64)
    z = NoiseSource.from_seed(7, x.shape[0]).normal(x.shape[1:], Stream.STEP, 0, dtype=F64)
    return res.samples, gm(x, t0), z, t0, t1


def test_song_formulas_ve_and_vp():
    """Song's §6.2/6.3 updates with the grid-implied σ_i, σ_{i−1} (VE) and β_i (VP)."""
    x = torch.tensor([[0.3, -1.2], [2.0, 0.5]], dtype=F64)
    ve = fastsde.VESDE()
    got, s, z, t0, t1 = _one_move("reverse_diffusion", ve, x * 50)
    si, sj = ve.sigma(t0)[:, None], ve.sigma(t1)[:, None]
    torch.testing.assert_close(got, x * 50 + (si**2 - sj**2) * s + (si**2 - sj**2).sqrt() * z)
    got, s, z, _, _ = _one_move("ancestral", ve, x * 50)
    torch.testing.assert_close(got, x * 50 + (si**2 - sj**2) * s + (sj**2 * (si**2 - sj**2) / si**2).sqrt() * z)

    vp = fastsde.VPSDE()
    got, s, z, t0, t1 = _one_move("reverse_diffusion", vp, x)
    beta = 1 - (vp.mean_coeff(t0) / vp.mean_coeff(t1))[:, None] ** 2
    torch.testing.assert_close(got, (2 - (1 - beta).sqrt()) * x + beta * s + beta.sqrt() * z)
    got, s, z, _, _ = _one_move("ancestral", vp, x)
    torch.testing.assert_close(got, (x + beta * s) / (1 - beta).sqrt() + beta.sqrt() * z)


@pytest.mark.parametrize("per_sample_norm", [False, True])
@pytest.mark.parametrize("name", ["vp", "ve"])
def test_pc_move_is_langevin_corrector_then_reverse_diffusion(name, per_sample_norm):
    """Score SDE §6.5/6.7 by hand: at t_0 one Langevin step with ε = 2α(snr·‖z‖/‖s‖)² (norms: batch
    means of per-sample L2 norms, or each sample's own; α = 1 − β_i for VP, 1 for VE), then the
    reverse-diffusion move to t_1 (close to t_0, so that α is far from 0 and 1)."""
    sde = PROCESSES[name]()
    t_end = {"vp": 0.98, "ve": 0.5}[name]
    gm = make_mixture(sde)
    x = torch.tensor([[0.3, -1.2], [2.0, 0.5], [-0.7, 0.1]], dtype=F64) * sde.prior_std
    snr = 0.2
    got, s, zp, t0, t1 = _one_move("pc", sde, x, t_end=t_end, snr=snr, per_sample_norm=per_sample_norm)
    zc = NoiseSource.from_seed(7, 3).normal((2,), Stream.CORRECTOR, 0, dtype=F64)
    s_norm, z_norm = s.norm(dim=1), zc.norm(dim=1)
    if not per_sample_norm:
        s_norm, z_norm = s_norm.mean().expand(3), z_norm.mean().expand(3)
    if name == "vp":
        beta = (1 - (sde.mean_coeff(t0) / sde.mean_coeff(t1)) ** 2)[:, None]
        alpha = 1 - beta
    else:
        alpha = torch.ones(3, 1, dtype=F64)
    eps = 2 * alpha * ((snr * z_norm / s_norm) ** 2)[:, None]
    xc = x + eps * s + (2 * eps).sqrt() * zc
    sc = gm(xc, t0)
    if name == "vp":
        expected = (2 - alpha.sqrt()) * xc + beta * sc + beta.sqrt() * zp
    else:
        var = (sde.sigma(t0) ** 2 - sde.sigma(t1) ** 2)[:, None]
        expected = xc + var * sc + var.sqrt() * zp
    torch.testing.assert_close(got, expected)


def test_grid_implied_beta_tends_to_songs_table():
    """On Song's grid linspace(T, ε, N) the grid-implied β of the move leaving t_k approaches DDPM's
    table entry β_i = linspace(β_min/N, β_max/N, N)[i] at his index i = floor(t_k·(N−1)/T), as O(1/N)."""
    sde = fastsde.VPSDE()
    errs = []
    for n in (1000, 16000):
        g = time_grid(sde, "uniform", n, 1.0, 1e-3)
        table = sde.discrete_betas(n)[torch.floor(g[:-1] * (n - 1)).long()]
        errs.append(float(((grid_beta(sde, g[:-1], g[1:]) - table) / table).abs().max()))
    assert errs[1] < 0.01 and errs[0] / errs[1] > 8.0


@pytest.mark.parametrize("name", ["subvp", "edm", "ve", "vp"])
def test_generic_rule_and_exact_posterior_coincide_with_em_and_ddim(name):
    """sub-VP/EDM reverse diffusion uses f_i = f·h, G_i = g√h, i.e. EM; sub-VP/EDM ancestral and VE
    ancestral are the DDPM posterior step, i.e. DDIM with η = 1; Euler is DDIM with η = 0."""
    sde = PROCESSES[name]()
    gm = make_mixture(sde)

    def run(solver: str, **options) -> Tensor:
        kw = dict(seed=4, dtype=F64, denoise=False, steps=25, grid="uniform")
        return fastsde.sample(gm, sde, (40, 2), solver=solver, **kw, **options).samples

    if name in ("subvp", "edm"):
        torch.testing.assert_close(run("reverse_diffusion"), run("em"))
    if name != "vp":
        torch.testing.assert_close(run("ancestral"), run("ddim", eta=1.0))
    torch.testing.assert_close(run("euler"), run("ddim", eta=0.0))


def test_heun_is_edms_second_order_step():
    sde = fastsde.EDM()
    gm = make_mixture(sde)
    x = torch.tensor([[10.0, -30.0], [55.0, 2.0]], dtype=F64)
    got = fastsde.sample(gm, sde, (2, 2), solver="heun", x_init=x, dtype=F64, denoise=False, steps=2).samples
    s0, s1 = torch.full((2,), 80.0, dtype=F64), torch.full((2,), 0.002, dtype=F64)
    den = lambda x, s: x + s[:, None] ** 2 * gm(x, s)  # noqa: E731  D(x; σ) = x + σ²∇log p
    d0 = (x - den(x, s0)) / 80.0
    xe = x + (0.002 - 80.0) * d0
    d1 = (xe - den(xe, s1)) / 0.002
    torch.testing.assert_close(got, x + (0.002 - 80.0) * 0.5 * (d0 + d1))


def test_dpmpp_2m_single_move_is_first_order_closed_form():
    sde = fastsde.VPSDE()
    gm = make_mixture(sde)
    x = torch.tensor([[0.3, -1.2], [2.0, 0.5]], dtype=F64)
    got = fastsde.sample(gm, sde, (2, 2), solver="dpmpp_2m", x_init=x, dtype=F64, denoise=False, steps=2).samples
    t0, t1 = torch.ones(2, dtype=F64), torch.full((2,), 1e-3, dtype=F64)
    x0 = sde.denoise(x, t0, gm(x, t0))
    h = sde.log_snr(t1) - sde.log_snr(t0)
    expected = (sde.marginal_std(t1) / sde.marginal_std(t0))[:, None] * x + (sde.mean_coeff(t1) * (1 - torch.exp(-h)))[
        :, None
    ] * x0
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("steps", [2, 3])
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_dpmpp_2m_few_steps_finite_and_sensible(process, steps, lower_order_final):
    """User need 7: 2 and 3 steps stay finite, inside the data's range, and never blow up."""
    gm = make_mixture(process)
    res = fastsde.sample(
        gm, process, (500, 2), solver="dpmpp_2m", seed=1, dtype=F64, steps=steps, lower_order_final=lower_order_final
    )
    x = res.samples
    assert res.nfe == steps and bool(torch.isfinite(x).all())
    data = gm.sample(20000, generator=torch.Generator().manual_seed(0))
    assert float(x.std(0).max()) <= 1.5 * float(data.std(0).max())
    assert float(x.abs().max()) <= 2.0 * float(data.abs().max())
    if steps == 3:  # two moves already spread the samples: no collapse onto one point
        assert float(x.std(0).min()) >= 0.1 * float(data.std(0).min())


# ---------------------------------------------------------------------------------------------
# Accounting, order of evaluations, determinism, stopping, NaN
# ---------------------------------------------------------------------------------------------


def _expected_nfe(solver: str, n: int, m: int = 1) -> int:
    """The NFE the solver declares for n grid points (and m corrector steps), the denoise included."""
    return fastsde.SOLVERS[solver].fixed_nfe({"steps": n, "corrector_steps": m})


def test_declared_nfe_rules_are_the_documented_ones():
    """The declared NFE rules, in numbers: N, 2N − 1 for Heun, (N − 1)(M + 1) + 1 for pc."""
    for n in (2, 7):
        assert _expected_nfe("heun", n) == 2 * n - 1
        assert _expected_nfe("pc", n, 3) == (n - 1) * 4 + 1
        for name in ("em", "euler", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m", "ancestral"):
            assert _expected_nfe(name, n) == n


@pytest.mark.parametrize("solver", ["em", *NEW_SOLVERS])
def test_nfe_accounting(solver):
    sde = fastsde.VPSDE()
    gm = make_mixture(sde)
    for n in (2, 7):
        res = fastsde.sample(gm, sde, (3, 2), solver=solver, steps=n)
        assert res.nfe == _expected_nfe(solver, n) and res.calls == res.nfe
        assert res.nfe_per_sample.tolist() == [res.nfe] * 3
        assert fastsde.sample(gm, sde, (3, 2), solver=solver, steps=n, denoise=False).nfe == res.nfe - 1
    if solver == "pc":
        assert fastsde.sample(gm, sde, (3, 2), solver="pc", steps=7, corrector_steps=3).nfe == _expected_nfe("pc", 7, 3)
        assert fastsde.sample(gm, sde, (3, 2), solver="pc", steps=7, corrector_steps=0).nfe == 7


def _recorded_times(solver, **options):
    sde = fastsde.EDM()
    gm = make_mixture(sde)
    times = []

    def score(x, t):
        times.append(float(t[0]))
        return gm(x, t)

    fastsde.sample(score, sde, (2, 2), solver=solver, dtype=F64, steps=4, **options)
    return times, time_grid(sde, "edm", 4, sde.T, sde.t_min).tolist()


def test_order_of_evaluations():
    """PC: corrector then predictor at each grid point, last point uncorrected; Heun: t_k, t_{k+1} per move."""
    times, g = _recorded_times("pc", grid="edm")
    assert times == pytest.approx([g[0], g[0], g[1], g[1], g[2], g[2], g[3]])
    times, g = _recorded_times("heun")
    assert times == pytest.approx([g[0], g[1], g[1], g[2], g[2], g[3], g[3]])


STOCHASTIC = [
    ("reverse_diffusion", {}),
    ("ancestral", {}),
    ("pc", dict(per_sample_norm=True)),
    ("pc", dict(per_sample_norm=True, predictor="ancestral", corrector_steps=2)),
    ("heun", dict(s_churn=10.0)),
    ("ddim", dict(eta=1.0)),
    ("ddim", dict(eta=0.3)),
]
DETERMINISTIC = [("euler", {}), ("heun", {}), ("ddim", {}), ("dpmpp_2m", {})]


@pytest.mark.parametrize("solver, options", STOCHASTIC + DETERMINISTIC)
def test_deterministic_and_batch_size_independent(process, solver, options):
    gm = make_mixture(process)
    kw = dict(solver=solver, seed=11, dtype=F64, steps=12, **options)
    small = fastsde.sample(gm, process, (5, 2), **kw).samples
    again = fastsde.sample(gm, process, (5, 2), **kw).samples
    big = fastsde.sample(gm, process, (50, 2), **kw).samples
    assert torch.equal(small, again)
    assert torch.equal(small, big[:5])
    x0 = process.prior_sample(torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64))
    other_seed = fastsde.sample(gm, process, (5, 2), **{**kw, "seed": 12}, x_init=x0).samples
    same_start = fastsde.sample(gm, process, (5, 2), **kw, x_init=x0).samples
    # From a shared start, only the stochastic samplers depend on the seed.
    assert torch.equal(other_seed, same_start) == ((solver, options) in DETERMINISTIC)


def test_pc_batch_mean_norms_depend_on_the_batch():
    """The reference rule (batch-mean norms) couples samples; per_sample_norm removes the coupling."""
    sde = fastsde.VESDE()
    gm = make_mixture(sde)
    kw = dict(solver="pc", seed=11, dtype=F64, steps=12)
    assert not torch.equal(
        fastsde.sample(gm, sde, (5, 2), **kw).samples, fastsde.sample(gm, sde, (50, 2), **kw).samples[:5]
    )


@pytest.mark.parametrize("solver", NEW_SOLVERS)
def test_callback_false_stops(solver):
    sde = fastsde.VPSDE()
    gm = make_mixture(sde)
    seen = []

    def callback(info):
        seen.append(info.step)
        return info.step < 1

    res = fastsde.sample(gm, sde, (4, 2), solver=solver, steps=10, callback=callback)
    per_move = {"heun": 2, "pc": 2}.get(solver, 1)
    assert res.stopped_early and seen == [0, 1] and res.nfe == 2 * per_move  # no denoise after a stop


@pytest.mark.parametrize("solver", ["em", *NEW_SOLVERS])
def test_nan_score_raises_naming_the_time(solver):
    sde = fastsde.VPSDE()
    gm = make_mixture(sde)
    cut = 0.5

    def score(x, t):
        s = gm(x, t)
        return torch.where((t < cut)[:, None], torch.full_like(s, math.nan), s)

    grid = time_grid(sde, fastsde.solvers.get_solver(solver).options["grid"].default_for(sde), 9, 1.0, 1e-3)
    with pytest.raises(NonFiniteScoreError, match=r"t = \[") as info:
        fastsde.sample(score, sde, (3, 2), solver=solver, steps=9, dtype=F64)
    named = [float(v) for v in re.search(r"t = \[([^\]]*)\]", str(info.value)).group(1).split(",")]
    first_bad = max(v for v in grid.tolist() if v < cut)
    assert named == pytest.approx([first_bad])


@pytest.mark.parametrize(
    "solver, options, message",
    [
        ("pc", dict(predictor="heun"), r"predictor must be one of \['reverse_diffusion', 'ancestral', 'em'\]"),
        ("pc", dict(snr=0.0), r"snr must be > 0"),
        ("pc", dict(corrector_steps=-1), r"corrector_steps must be an integer >= 0"),
        ("pc", dict(per_sample_norm=1), r"per_sample_norm must be True or False"),
        ("ddim", dict(eta=1.5), r"eta must be a number in \[0, 1\], got 1.5"),
        ("heun", dict(s_churn=-1.0), r"s_churn must be >= 0"),
        ("heun", dict(s_tmin=2.0, s_tmax=1.0), r"s_tmin must be <= s_tmax"),
        ("heun", dict(s_tmax=math.nan), r"s_tmax must be a number >= 0"),
        ("dpmpp_2m", dict(lower_order_final="yes"), r"lower_order_final must be True or False"),
        ("euler", dict(steps=1), r"steps must be an integer >= 2, got 1"),
    ],
)
def test_bad_options_are_value_errors_before_compute(solver, options, message):
    sde = fastsde.VPSDE()
    calls = []
    with pytest.raises(ValueError, match=message):
        fastsde.sample(lambda x, t: calls.append(1) or x, sde, (2, 2), solver=solver, **options)
    assert calls == []

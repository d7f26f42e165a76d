"""The stochastic few-NFE steppers (``dpmpp_3m_sde``, ``er_sde``, ``sa_solver``) on exact problems in
float64: the law they sample on a Gaussian, the identities between them (same x_T, same draws), their
orders (PF-ODE members on a mixture; weak order in closed form), short grids, determinism, bad input,
and the peers (k-diffusion's ``sample_dpmpp_3m_sde``, diffusers' ``SASolverScheduler``) where installed."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from test_convergence import fitted_order
from test_weak_order import variance_error

import fastsde
from fastsde.noise import NoiseSource, Stream
from fastsde.problems import mixture_2d
from fastsde.solvers.core.controllers import FixedGrid
from fastsde.solvers.core.spec import SolverSpec

F64 = torch.float64
NEW = ["dpmpp_3m_sde", "er_sde", "sa_solver"]
HAS_KDIFF = importlib.util.find_spec("k_diffusion") is not None
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
PROCESSES = {
    "vp": fastsde.VPSDE,
    "subvp": fastsde.SubVPSDE,
    "ve": lambda: fastsde.VESDE(sigma_min=0.01, sigma_max=50.0),
    "edm": lambda: fastsde.EDM(sigma_min=0.002, sigma_max=80.0),
}
#: the reverse SDE (η = 1, φ = σ², τ = 1 everywhere) of each solver
REVERSE_SDE = {
    "dpmpp_3m_sde": {},
    "er_sde": {"phi": "sde"},
    "sa_solver": {"tau": 1.0, "tau_sigma": None},
}


def _x_T(sde: fastsde.SDE, n: int, d: int = 2, seed: int = 0) -> torch.Tensor:
    return sde.prior_sample(torch.randn(n, d, dtype=F64, generator=torch.Generator().manual_seed(seed)))


def _run(gm, sde, x_T, solver, **opts):
    return fastsde.sample(gm, sde, tuple(x_T.shape), solver=solver, x_init=x_T, dtype=F64, **opts)


# ---------------------------------------------------------------------------------------------
# The law on an exact Gaussian
# ---------------------------------------------------------------------------------------------

MU, C = 0.3, 0.5  # data N(MU, C²) per coordinate
LAW_N, LAW_D, LAW_STEPS = 4_000, 4, 60


@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("solver", NEW)
def test_law_on_an_exact_gaussian(name, solver):
    """Without the denoise the samples at t_end are N(m·MU, m²C² + σ²): the mean within 4 standard
    errors, the variance within 4 standard errors of its χ² spread (16 000 draws: ±4.5 %; the
    discretisation bias at 60 steps is 0.1–1.5 %, computed in closed form). Checked by hand to fail
    on all 12 cases with every draw scaled by 1.05 (variance +10 %)."""
    sde = PROCESSES[name]()
    gm = fastsde.GaussianMixture([1.0], torch.full((1, LAW_D), MU, dtype=F64), [C], sde)
    res = fastsde.sample(gm, sde, (LAW_N, LAW_D), solver=solver, seed=11, dtype=F64, denoise=False, steps=LAW_STEPS)
    t = torch.tensor([sde.default_t_end], dtype=F64)
    m, sig = float(sde.mean_coeff(t)), float(sde.marginal_std(t))
    mean, var = m * MU, m * m * C * C + sig * sig
    x = res.samples.reshape(-1)
    k = x.numel()
    assert abs(float(x.mean()) - mean) < 4 * math.sqrt(var / k), (float(x.mean()), mean)
    assert abs(float(x.var()) / var - 1) < 4 * math.sqrt(2 / (k - 1)), (float(x.var()), var)


# ---------------------------------------------------------------------------------------------
# Identities (same x_T, same draws: every stepper takes move k's noise from Stream.STEP, counter k)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PROCESSES))
def test_first_moves_are_sde_dpm_solver_1(name):
    """One move of each on the reverse SDE = SDE-DPM-Solver++ 1 (dpmpp_2m_sde's first move)."""
    sde = PROCESSES[name]()
    gm = mixture_2d(sde)
    x_T = _x_T(sde, 64)
    kw = dict(seed=5, denoise=False, steps=2)
    ref = _run(gm, sde, x_T, "dpmpp_2m_sde", **kw).samples
    for solver, opts in REVERSE_SDE.items():
        got = _run(gm, sde, x_T, solver, **kw, **opts).samples
        torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-12, msg=solver)
    # ER-SDE of any order moves first order first
    got = _run(gm, sde, x_T, "er_sde", phi="sde", order=3, **kw).samples
    torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("name", ["vp", "ve", "edm"])
def test_first_order_chains_agree(name):
    """Whole chains: ER-SDE-1 (φ = σ²) = SA predictor p = 1 (τ = 1, no corrector) on the reverse SDE;
    ER-SDE-1 (φ = σ) = SA predictor p = 1 (τ = 0) = DDIM (η = 0) on the PF-ODE."""
    sde = PROCESSES[name]()
    gm = mixture_2d(sde)
    x_T = _x_T(sde, 32)
    kw = dict(seed=2, denoise=False, steps=7, grid="logsnr")
    a = _run(gm, sde, x_T, "er_sde", phi="sde", order=1, **kw).samples
    b = _run(gm, sde, x_T, "sa_solver", tau=1.0, tau_sigma=None, predictor_order=1, corrector_order=0, **kw).samples
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    ode = [
        _run(gm, sde, x_T, "er_sde", phi="ode", order=1, **kw).samples,
        _run(gm, sde, x_T, "sa_solver", tau=0.0, predictor_order=1, corrector_order=0, **kw).samples,
        _run(gm, sde, x_T, "ddim", **kw).samples,
    ]
    for other in ode[1:]:
        torch.testing.assert_close(other, ode[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lower_order_final", [True, False])
def test_ode_members_are_dpm_solver_pp_3m(lower_order_final):
    """η = 0: dpmpp_3m_sde is dpmpp_3m (both forms); SA's predictor p = 3 at τ = 0 without the
    rescaling is the exact third-order 3M update (the Lagrange exponential Adams–Bashforth 3)."""
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)
    x_T = _x_T(sde, 32)
    kw = dict(denoise=False, steps=9, lower_order_final=lower_order_final)
    for form in ("peer", "exact"):
        a = _run(gm, sde, x_T, "dpmpp_3m_sde", eta=0.0, form=form, **kw).samples
        b = _run(gm, sde, x_T, "dpmpp_3m", form=form, **kw).samples
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    sa = _run(gm, sde, x_T, "sa_solver", tau=0.0, predictor_order=3, corrector_order=0, rescale=False, **kw)
    torch.testing.assert_close(sa.samples, b, rtol=1e-9, atol=1e-11)


def test_sa_corrector_replays_the_move_with_the_same_noise():
    """p = c = 1 (no rescaling at order 1): move k − 1 is redone with x̂0 at its end (the evaluation
    at the predicted point) and the same draw, then move k starts from the corrected point."""
    sde = fastsde.EDM()
    gm = mixture_2d(sde)
    x_T = _x_T(sde, 8)
    seen = []
    res = _run(
        gm, sde, x_T, "sa_solver", seed=3, denoise=False, steps=5, tau=1.0, tau_sigma=None,
        predictor_order=1, corrector_order=1, callback=lambda i: seen.append(i.t.clone()),
    )  # fmt: skip
    noise = NoiseSource.from_seed(3, 8)
    x, t, prev = x_T, torch.full((8,), sde.T, dtype=F64), None
    for k, t_next in enumerate(seen):
        x0 = sde.denoise(x, t, gm(x, t))
        if prev is not None:  # corrector: the last move again, with x̂0 at its end
            base, w = prev
            x = base + w[:, None] * x0
        lam_s, lam_t = sde.log_snr(t), sde.log_snr(t_next)
        h = lam_t - lam_s
        base = (sde.marginal_std(t_next) / sde.marginal_std(t) * torch.exp(-h))[:, None] * x + (
            sde.marginal_std(t_next) * torch.sqrt(-torch.expm1(-2 * h))
        )[:, None] * noise.normal((2,), Stream.STEP, k, dtype=F64)
        w = sde.mean_coeff(t_next) * -torch.expm1(-2 * h)
        prev = (base, w)
        x, t = base + w[:, None] * x0, t_next
    torch.testing.assert_close(res.samples, x, rtol=1e-10, atol=1e-12)


def test_sa_tau_at_source_or_target():
    """τ switched on only on σ/m ∈ [1, 10]: 'target' and 'source' differ, and each equals the run with
    the callable τ that is 1 on the moves it names."""
    sde = fastsde.EDM()
    gm = mixture_2d(sde)
    x_T = _x_T(sde, 16)
    kw = dict(seed=4, denoise=False, steps=12)
    a = _run(gm, sde, x_T, "sa_solver", tau=1.0, tau_sigma=(1.0, 10.0), tau_at="target", **kw).samples
    b = _run(gm, sde, x_T, "sa_solver", tau=1.0, tau_sigma=(1.0, 10.0), tau_at="source", **kw).samples
    c = _run(gm, sde, x_T, "sa_solver", tau=lambda s: ((s >= 1.0) & (s <= 10.0)).double(), tau_sigma=None, **kw).samples
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Orders
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ode_reference():
    sde = fastsde.EDM()
    gm = mixture_2d(sde)
    x_T = _x_T(sde, 100)
    ref = _run(gm, sde, x_T, "ode", denoise=False, rtol=1e-10, atol=1e-10).samples
    return sde, gm, x_T, ref


@pytest.mark.parametrize(
    "solver,opts,steps",
    [
        ("er_sde", {"phi": "ode", "order": 3}, [32, 64, 128]),
        ("er_sde", {"phi": "ode", "order": 2}, [32, 64, 128]),
        ("sa_solver", {"tau": 0.0, "corrector_order": 0, "lower_order_final": False}, [32, 64, 128]),
        ("sa_solver", {"tau": 0.0, "lower_order_final": False}, [32, 64, 128]),
        (
            "sa_solver",
            {"tau": 0.0, "predictor_order": 2, "corrector_order": 3, "lower_order_final": False},
            [32, 64, 128],
        ),
    ],
)
def test_pf_ode_members_reach_their_declared_order(ode_reference, solver, opts, steps):
    """τ = 0 / φ = σ on the 2-D mixture (EDM), median error against an rtol-1e-10 solve. Measured:
    ER-SDE-3 / -2 2.20 / 2.06 (declared 2: backward differences), SA p = 3 without corrector 3.44,
    p = 3 with c = 4 4.09, p = 2 with c = 3 3.23."""
    sde, gm, x_T, ref = ode_reference
    spec = fastsde.SOLVERS[solver]
    assert not spec.is_stochastic(opts)
    declared = spec.order_for(opts)
    errors = [
        float((_run(gm, sde, x_T, solver, denoise=False, steps=n, **opts).samples - ref).norm(dim=1).median())
        for n in steps
    ]
    order = fitted_order(steps, errors)
    assert declared - 0.2 <= order <= declared + 0.6, f"{solver} {opts}: errors {errors}, order {order:.2f}"


@pytest.mark.parametrize("name", ["vp", "edm"])
@pytest.mark.parametrize("solver", NEW)
def test_weak_order_in_closed_form(name, solver):
    """The variance of a Gaussian's samples, in closed form (tests/test_weak_order.py's unit draws),
    converges at least at the declared weak order 1."""
    sde = fastsde.sde.process_by_name(name)
    opts = REVERSE_SDE[solver]
    spec = fastsde.SOLVERS[solver]
    steps = [16, 32, 64]  # measured 2.5–3.7 (VP, EDM)
    errors = [variance_error(solver, sde, n, **opts) for n in steps]
    assert spec.order_for(opts) - 0.2 <= fitted_order(steps, errors), errors
    assert errors[-1] < 0.05


# ---------------------------------------------------------------------------------------------
# Short grids, accounting, determinism, bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("moves", [1, 2, 3])
@pytest.mark.parametrize("solver", NEW)
def test_one_two_three_moves(solver, moves):
    """N = moves + 1 grid points cost N NFE (the denoise included) on every process, finite samples
    whose mean is near the data's."""
    for name, make in PROCESSES.items():
        sde = make()
        gm = mixture_2d(sde)
        res = fastsde.sample(gm, sde, (256, 2), solver=solver, seed=0, dtype=F64, steps=moves + 1)
        assert res.nfe == moves + 1 and fastsde.SOLVERS[solver].fixed_nfe({"steps": moves + 1}) == moves + 1
        assert bool(torch.isfinite(res.samples).all()), name
        assert float((res.samples.mean(0) - gm.sample(4000).mean(0)).abs().max()) < 0.35, name


@pytest.mark.parametrize("solver", NEW)
def test_deterministic_and_batch_size_independent(solver):
    sde = fastsde.VESDE()
    gm = mixture_2d(sde)
    kw = dict(solver=solver, dtype=F64, steps=9)
    seeds = [100 + i for i in range(12)]
    full = fastsde.sample(gm, sde, (12, 2), seed=seeds, **kw)
    again = fastsde.sample(gm, sde, (12, 2), seed=seeds, **kw)
    part = fastsde.sample(gm, sde, (5, 2), seed=seeds[:5], **kw)
    assert torch.equal(full.samples, again.samples)
    torch.testing.assert_close(part.samples, full.samples[:5], rtol=0, atol=1e-13)
    other = fastsde.sample(gm, sde, (12, 2), seed=[200 + i for i in range(12)], **kw)
    assert not torch.allclose(full.samples, other.samples)


@pytest.mark.parametrize(
    "solver,options,message",
    [
        ("dpmpp_3m_sde", dict(eta=-1.0), r"eta must be >= 0, got -1.0"),
        ("dpmpp_3m_sde", dict(s_noise=math.nan), r"s_noise must be a finite number, got nan"),
        ("dpmpp_3m_sde", dict(form="midpoint"), r"form must be one of \['peer', 'exact'\], got 'midpoint'"),
        ("er_sde", dict(order=4), r"order must be 1, 2 or 3, got 4"),
        ("er_sde", dict(order=True), r"order must be 1, 2 or 3, got True"),
        ("er_sde", dict(phi="sde9"), r"phi must be one of \['sde5', 'ode', 'sde', "),
        ("sa_solver", dict(predictor_order=0), r"predictor_order must be an integer in \[1, 4\], got 0"),
        ("sa_solver", dict(corrector_order=5), r"corrector_order must be an integer in \[0, 4\], got 5"),
        ("sa_solver", dict(tau=-0.5), r"tau must be a finite number >= 0 or a callable tau\(sigma\), got -0.5"),
        ("sa_solver", dict(tau="one"), r"tau must be a finite number >= 0 or a callable"),
        ("sa_solver", dict(tau_sigma=(3.0, 1.0)), r"tau_sigma must be None or a pair \(lo, hi\).*got \(3.0, 1.0\)"),
        ("sa_solver", dict(tau_sigma=2.0), r"tau_sigma must be None or a pair"),
        ("sa_solver", dict(tau=lambda s: -s), r"tau\(sigma\) must be finite and >= 0 on σ/m in \["),
        ("sa_solver", dict(tau=lambda s: s.foo), r"tau must map a tensor of noise levels"),
        ("sa_solver", dict(tau_at="middle"), r"tau_at must be one of \['target', 'source'\]"),
    ],
)
def test_bad_options_are_value_errors_before_compute(solver, options, message):
    calls = []

    def score(x, t):
        calls.append(1)
        return -x

    with pytest.raises(ValueError, match=message):
        fastsde.sample(score, fastsde.EDM(), (4, 2), solver=solver, **options)
    assert not calls


def test_declarations():
    s = fastsde.SOLVERS
    assert [s[n].order for n in NEW] == [1.0, 1.0, 1.0] and all(s[n].stochastic for n in NEW)
    assert s["dpmpp_3m_sde"].order_for({"eta": 0.0}) == 2.0
    assert s["dpmpp_3m_sde"].order_for({"eta": 0.0, "form": "exact"}) == 3.0
    assert not s["dpmpp_3m_sde"].is_stochastic({"s_noise": 0.0})
    assert s["er_sde"].order_for({"phi": "ode"}) == 2.0 and s["er_sde"].order_for({"phi": "ode", "order": 1}) == 1.0
    assert s["sa_solver"].order_for({"tau": 0.0}) == 4.0
    assert s["sa_solver"].order_for({"tau": 0.0, "corrector_order": 0}) == 3.0
    assert s["sa_solver"].is_stochastic({"tau": lambda sig: 0 * sig})
    assert all(s[n].nfe_per_step == 1 and s[n].fixed_nfe({"steps": 10}) == 10 for n in NEW)


# ---------------------------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_KDIFF, reason="k-diffusion not installed (pip install fastsde[peers])")
@pytest.mark.parametrize("name", ["vp", "edm"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_kdiffusion_dpmpp_3m_sde_with_injected_noise(name, eta):
    """Same Karras σ grid with a trailing zero, k-diffusion's noise sampler returning fastsde's draw of
    move k: the samples agree to 1e-10 (k-diffusion's last step to σ = 0 is fastsde's denoise)."""
    from k_diffusion import sampling

    from fastsde.bench.peers import EDMDenoiser, karras_sigmas

    sde = PROCESSES[name]()
    gm = mixture_2d(sde)
    n, steps = 32, 10
    x_T = _x_T(sde, n)
    noise = NoiseSource.from_seed(9, n)
    sigmas = karras_sigmas(sde, steps, sde.default_t_end)
    draws = iter(range(steps))

    def noise_sampler(sigma, sigma_next):
        return noise.normal((2,), Stream.STEP, next(draws), dtype=F64)

    m_T = float(sde.mean_coeff(torch.tensor([sde.T], dtype=F64)))
    peer = sampling.sample_dpmpp_3m_sde(
        EDMDenoiser(gm, sde), x_T / m_T, sigmas, eta=eta, noise_sampler=noise_sampler, disable=True
    )
    ours = _run(gm, sde, x_T, "dpmpp_3m_sde", seed=9, steps=steps, grid="edm", eta=eta, lower_order_final=False)
    ours = ours.samples
    torch.testing.assert_close(ours, peer, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers not installed")
@pytest.mark.parametrize("orders", [(2, 2), (3, 4)])
def test_diffusers_sasolver_with_injected_noise(monkeypatch, orders):
    """diffusers' SASolverScheduler (data prediction, trailing timesteps, τ = 1 on timesteps 200..800
    at the move's source) against sa_solver on the same times (t = (timestep + 1)/1000 and the final
    σ at timestep 0), the same draws and the process of the scheduler's own ᾱ table; diffusers keeps
    its σ in float32, hence the 1e-5 tolerance."""
    import diffusers
    import diffusers.schedulers.scheduling_sasolver as sas

    from fastsde.bench.peers import vp_trained_betas

    p, c = orders
    sched = diffusers.SASolverScheduler(
        num_train_timesteps=1000, trained_betas=vp_trained_betas(fastsde.VPSDE()).numpy(),
        timestep_spacing="trailing", prediction_type="epsilon", predictor_order=p, corrector_order=c,
        tau_func=lambda t: 1 if 200 <= t <= 800 else 0,
    )  # fmt: skip
    sde = fastsde.VPSDE.from_diffusers_scheduler(sched)
    gm = mixture_2d(sde)
    n, moves = 16, 10
    x_T = _x_T(sde, n)
    src = NoiseSource.from_seed(6, n)
    counter = iter(range(moves))
    monkeypatch.setattr(
        sas, "randn_tensor", lambda shape, **kw: src.normal((2,), Stream.STEP, next(counter), dtype=F64)
    )
    sched.set_timesteps(moves)
    x = x_T.clone()
    for tau in sched.timesteps:
        t = torch.full((n,), (float(tau) + 1.0) / 1000, dtype=F64)
        eps = -sde.marginal_std(t)[:, None] * gm(x, t)
        x = sched.step(eps, tau, x).prev_sample
    grid = torch.cat([(sched.timesteps.double() + 1.0) / 1000, torch.tensor([1e-3], dtype=F64)])
    spec = fastsde.SOLVERS["sa_solver"]
    explicit = SolverSpec(
        name="sa_solver", stepper=spec.stepper, options=spec.options, summary="", check=spec.check,
        build=lambda ctx, o: dict(stepper=spec.stepper(ctx, o), controller=FixedGrid(grid)),
    )  # fmt: skip
    lo, hi = sde.edm_sigma(torch.tensor([200.5 / 1000, 800.5 / 1000], dtype=F64)).tolist()
    ours = fastsde.sample(
        gm, sde, (n, 2), solver=explicit, x_init=x_T, seed=6, dtype=F64, denoise=False, t_end=1e-3,
        predictor_order=p, corrector_order=c, tau=1.0, tau_sigma=(lo, hi), tau_at="source",
    ).samples  # fmt: skip
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-5)


@pytest.mark.skipif(not HAS_KDIFF, reason="k-diffusion not installed (pip install fastsde[peers])")
def test_bench_kdiffusion_3m_sde_adapter_is_the_peer_on_the_karras_sigmas():
    """The bench row: k-diffusion's sampler from the bench's x_T on the Karras σ with a trailing zero,
    its own Brownian-tree noise (seed), N NFE."""
    from k_diffusion import sampling

    from fastsde.bench.peers import PEERS, EDMDenoiser, karras_sigmas

    sde = fastsde.EDM()
    gm = mixture_2d(sde)
    x_T = _x_T(sde, 16)
    run = PEERS["kdiff_dpmpp_3m_sde"].run(gm.score, sde, x_T, 12, sde.default_t_end, seed=3)
    sigmas = karras_sigmas(sde, 12, sde.default_t_end)
    bt = sampling.BrownianTreeNoiseSampler(x_T, float(sigmas[-2]), float(sigmas[0]), seed=3)
    theirs = sampling.sample_dpmpp_3m_sde(EDMDenoiser(gm.score, sde), x_T, sigmas, noise_sampler=bt, disable=True)
    assert run.nfe == 12
    torch.testing.assert_close(run.samples, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers not installed")
def test_bench_diffusers_sasolver_adapter():
    """The bench row: budget B is B − 1 scheduler steps and the counted denoise at timestep 0; its
    samples follow the mixture's law (mean and std per coordinate within 0.05 at 20 NFE)."""
    from fastsde.bench.peers import PEERS

    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)
    run = PEERS["diffusers_sasolver"].run(gm.score, sde, _x_T(sde, 1000), 20, sde.default_t_end, seed=1)
    assert run.nfe == 20 and run.setting["steps"] == 19
    ref = gm.sample(20000, generator=torch.Generator().manual_seed(2))
    assert float((run.samples.mean(0) - ref.mean(0)).abs().max()) < 0.05
    assert float((run.samples.std(0) - ref.std(0)).abs().max()) < 0.05
    assert not PEERS["diffusers_sasolver"].supports(fastsde.EDM())

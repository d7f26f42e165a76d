"""Rectified flow / flow matching (issue 31): the process, the velocity adapter, the exact mixture on
the flow path, the start at u = 1 (m = 0) for every solver (own or shared first move), the likelihood,
guided data predictions, and equality with diffusers' FlowMatchEulerDiscreteScheduler."""

from __future__ import annotations

import math

import pytest
import torch

import fastsde
from fastsde.likelihood.pf_ode import default_likelihood_t_end
from fastsde.problems import mixture_2d

F64 = torch.float64

FLOWS = {
    "flow": lambda: fastsde.RectifiedFlow(),
    "flow_shift3": lambda: fastsde.RectifiedFlow(shift=3.0),
}
#: the solvers whose first move from m = 0 is exact in x̂0, with a working option set each
#: (dpmpp_2m on the default time-uniform grid is pre-asymptotic at 40 steps on this mixture: its last moves
#: span several units of λ; on the quadratic grid its order 2 shows from 32 steps)
SINGULAR = {"euler": {}, "ddim": {"eta": 0.0}, "ddim_eta1": {"eta": 1.0}, "dpmpp_2m": {"grid": "quadratic"}}


def _solver(key: str) -> str:
    return key.split("_eta")[0]


def _velocity_net(gm: fastsde.GaussianMixture, sde: fastsde.RectifiedFlow):
    """A velocity network v(x, σ) = ε̂ − x̂0 = (x − x̂0)/σ from the exact mixture."""

    def net(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        u = sde.t_from_sigma(sigma.to(F64)).to(x.dtype)
        return (x - gm.data_prediction(x, u)) / sigma.to(x.dtype)[:, None]

    return net


# -- the process ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sde, shifted",
    [
        (fastsde.RectifiedFlow(), lambda u: u),
        (fastsde.RectifiedFlow(shift=3.0), lambda u: 3 * u / (1 + 2 * u)),
        (fastsde.RectifiedFlow(mu=0.7), lambda u: math.exp(0.7) / (math.exp(0.7) + 1 / u - 1)),
        (fastsde.RectifiedFlow(mu=2.5, time_shift_type="linear"), lambda u: 2.5 / (2.5 + 1 / u - 1)),
    ],
)
def test_schedule_is_the_shifted_sigma(sde, shifted):
    u = torch.tensor([0.001, 0.1, 0.37, 0.5, 0.9, 0.999, 1.0], dtype=F64)
    want = torch.tensor([shifted(float(v)) for v in u], dtype=F64)
    torch.testing.assert_close(sde.marginal_std(u), want, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(sde.mean_coeff(u), 1.0 - want, rtol=1e-14, atol=1e-15)
    assert float(sde.mean_coeff(torch.tensor([1.0], dtype=F64))[0]) == 0.0
    assert sde.T == 1.0 and sde.prior_std == 1.0


@pytest.mark.parametrize("sde", [fastsde.RectifiedFlow(shift=3.0), fastsde.RectifiedFlow(mu=0.9, shift_terminal=0.05)])
def test_drift_and_diffusion_give_the_marginals(sde):
    """a = d log m/du and g² = dσ²/du − 2aσ² (finite differences), λ inverted exactly."""
    u = torch.linspace(0.05, 0.95, 19, dtype=F64)
    e = 1e-6
    dlogm = (torch.log(sde.mean_coeff(u + e)) - torch.log(sde.mean_coeff(u - e))) / (2 * e)
    dsig2 = (sde.marginal_std(u + e) ** 2 - sde.marginal_std(u - e) ** 2) / (2 * e)
    torch.testing.assert_close(sde.drift_coeff(u), dlogm, rtol=1e-7, atol=1e-8)
    g2 = dsig2 - 2 * sde.drift_coeff(u) * sde.marginal_std(u) ** 2
    torch.testing.assert_close(sde.diffusion(u) ** 2, g2, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(sde.t_from_lambda(sde.log_snr(u)), u, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(sde.mean_coeff(u) + sde.marginal_std(u), torch.ones_like(u), rtol=1e-14, atol=1e-14)


def test_shift_leaves_the_logsnr_path_unchanged():
    """Shift only reparametrises time: the marginal at a given λ is the same."""
    lam = torch.linspace(-5.0, 5.0, 11, dtype=F64)
    a, b = fastsde.RectifiedFlow(), fastsde.RectifiedFlow(shift=3.0)
    torch.testing.assert_close(a.marginal_std(a.t_from_lambda(lam)), b.marginal_std(b.t_from_lambda(lam)))


def test_shift_terminal_ends_at_the_terminal_sigma():
    sde = fastsde.RectifiedFlow(shift=3.0, shift_terminal=0.1)
    end = torch.tensor([sde.default_t_end], dtype=F64)
    assert float(sde.marginal_std(end)[0]) == pytest.approx(0.1, rel=1e-12)
    assert float(sde.marginal_std(torch.tensor([1.0], dtype=F64))[0]) == pytest.approx(1.0, rel=1e-14)
    # a terminal above the unstretched end (LTX-Video's use): σ(0) = 1 − κ > 0, t_min = 0
    assert sde.t_min == 0.0 and float(sde.marginal_std(torch.zeros(1, dtype=F64))[0]) == pytest.approx(1 - sde.kappa)
    # below it: the data (σ = 0) sit at t_min in (0, t_end)
    low = fastsde.RectifiedFlow(shift=3.0, shift_terminal=0.1, t_end=0.1)
    assert float(low.marginal_std(torch.tensor([0.1], dtype=F64))[0]) == pytest.approx(0.1, rel=1e-12)
    assert 0.0 < low.t_min < low.default_t_end
    assert float(low.marginal_std(torch.tensor([low.t_min], dtype=F64))[0]) == pytest.approx(0.0, abs=1e-12)


def test_dynamic_mu_is_fluxs_calculate_shift():
    # FLUX at 1024² (4096 tokens) and 256² (256 tokens): the two ends of the line
    assert fastsde.RectifiedFlow.dynamic_mu(4096) == pytest.approx(1.15)
    assert fastsde.RectifiedFlow.dynamic_mu(256) == pytest.approx(0.5)
    assert fastsde.RectifiedFlow.dynamic_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)
    sde = fastsde.RectifiedFlow.dynamic(1024)
    assert sde.mu == pytest.approx(fastsde.RectifiedFlow.dynamic_mu(1024))
    assert sde.effective_shift == pytest.approx(math.exp(sde.mu))


@pytest.mark.parametrize(
    "sde",
    [
        fastsde.RectifiedFlow(),
        fastsde.RectifiedFlow(shift=3.0, shift_terminal=0.02),
        fastsde.RectifiedFlow.dynamic(mu=1.1),
    ],
)
def test_config_round_trips(sde):
    cfg = sde.config()
    assert cfg["type"] == "RectifiedFlow"
    back = fastsde.RectifiedFlow(**{k: v for k, v in cfg.items() if k != "type"})
    u = torch.linspace(0.01, 1.0, 7, dtype=F64)
    assert back.config() == cfg
    assert torch.equal(back.marginal_std(u), sde.marginal_std(u))


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(shift=0.0), "shift"),
        (dict(shift=-1.0), "shift"),
        (dict(shift=float("nan")), "shift"),
        (dict(shift=True), "shift"),
        (dict(t_end=0.0), "t_end"),
        (dict(t_end=1.0), "t_end"),
        (dict(shift_terminal=1.5), "shift_terminal"),
        (dict(time_shift_type="cubic", mu=1.0), "time_shift_type"),
        (dict(mu=float("inf")), "mu"),
        (dict(mu=-1.0, time_shift_type="linear"), "mu"),
        (dict(shift=3.0, mu=1.0), "mu"),
    ],
)
def test_bad_options_refused(kwargs, word):
    with pytest.raises(ValueError, match=word):
        fastsde.RectifiedFlow(**kwargs)


def test_dynamic_needs_exactly_one_of_mu_and_seq_len():
    with pytest.raises(ValueError, match="image_seq_len"):
        fastsde.RectifiedFlow.dynamic()
    with pytest.raises(ValueError, match="image_seq_len"):
        fastsde.RectifiedFlow.dynamic(1024, mu=1.0)
    with pytest.raises(ValueError, match="image_seq_len"):
        fastsde.RectifiedFlow.dynamic(0)


# -- diffusers scheduler configs ----------------------------------------------------------------


def test_from_diffusers_scheduler():
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sde = fastsde.RectifiedFlow.from_diffusers_scheduler(sch)
    assert sde.effective_shift == 3.0 and sde.default_t_end == pytest.approx(sch.sigma_min, rel=1e-6)
    dyn = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0, shift_terminal=0.02)
    with pytest.raises(ValueError, match="image_seq_len"):
        fastsde.RectifiedFlow.from_diffusers_scheduler(dyn)
    sde = fastsde.RectifiedFlow.from_diffusers_scheduler(dict(dyn.config), image_seq_len=4096)
    assert sde.mu == pytest.approx(1.15) and sde.shift_terminal == 0.02
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        fastsde.RectifiedFlow.from_diffusers_scheduler({"use_karras_sigmas": True})
    with pytest.raises(ValueError, match="dynamic"):
        fastsde.RectifiedFlow.from_diffusers_scheduler(sch, image_seq_len=4096)


def _diffusers_euler(sch, net, x, **set_kw):
    """Drive diffusers' FlowMatchEulerDiscreteScheduler by hand with a velocity function of (x, σ)."""
    sch.set_timesteps(**set_kw)
    x = x.to(torch.float32)
    for t in sch.timesteps:
        sigma = torch.full((x.shape[0],), float(t) / 1000.0, dtype=F64)
        v = net(x.to(F64), sigma).to(torch.float32)
        x = sch.step(v, t, x).prev_sample
    return x.to(F64)


@pytest.mark.parametrize(
    "sched_kw, set_kw",
    [({}, {}), ({"shift": 3.0}, {}), ({"use_dynamic_shifting": True}, {"mu": 0.8})],
    ids=["shift1", "shift3", "dynamic"],
)
def test_euler_equals_diffusers_flow_match_euler(sched_kw, set_kw):
    diffusers = pytest.importorskip("diffusers")
    steps = 12
    sch = diffusers.FlowMatchEulerDiscreteScheduler(**sched_kw)
    sde = fastsde.RectifiedFlow.from_diffusers_scheduler(sch, mu=set_kw.get("mu"))
    gm = mixture_2d(sde)
    net = _velocity_net(gm, sde)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    want = _diffusers_euler(sch, net, x_T, num_inference_steps=steps, **set_kw)
    # fastsde: N grid points, uniform in u (the shifted schedule), then the final denoise (diffusers' last
    # step to σ = 0 is x − σ·v = x̂0): N evaluations each
    score = fastsde.VelocityScore(net, sde)
    res = fastsde.sample(
        score, sde, x_T.shape, solver="euler", steps=steps, x_init=x_T, dtype=F64, t_end=sde.default_t_end
    )
    assert res.nfe == steps
    torch.testing.assert_close(res.samples, want, rtol=0, atol=2e-5)
    grid = fastsde.time_grid(sde, "uniform", steps, 1.0, sde.default_t_end)
    torch.testing.assert_close(sde.marginal_std(grid).float(), sch.sigmas[:-1], rtol=2e-6, atol=1e-6)


# -- the exact mixture on the flow path ----------------------------------------------------------


@pytest.mark.parametrize("name", list(FLOWS))
def test_mixture_is_exact_on_the_flow_path(name):
    sde = FLOWS[name]()
    gm = mixture_2d(sde)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    one = torch.ones(64, dtype=F64)
    # u = 1: pure noise, score −x, density N(0, I), x̂0 the data mean
    torch.testing.assert_close(gm.score(x, one), -x)
    std_normal = -0.5 * (x**2).sum(1) - math.log(2 * math.pi)
    torch.testing.assert_close(gm.log_prob(x, one), std_normal)
    mean = (gm.weights[:, None] * gm.means).sum(0)
    torch.testing.assert_close(gm.data_prediction(x, one), mean.expand_as(x))
    # inside: the score is ∇ log p and x̂0 is Tweedie's (x + σ²s)/m
    for u in (0.01, 0.3, 0.8, 0.999):
        t = torch.full((64,), u, dtype=F64)
        xr = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(gm.log_prob(xr, t).sum(), xr)
        torch.testing.assert_close(gm.score(x, t), grad)
        torch.testing.assert_close(gm.data_prediction(x, t), sde.denoise(x, t, gm.score(x, t)), rtol=1e-9, atol=1e-9)


def test_velocity_score_converts_exactly():
    sde = fastsde.RectifiedFlow(shift=3.0)
    gm = mixture_2d(sde)
    net = _velocity_net(gm, sde)
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = torch.rand(32, generator=torch.Generator().manual_seed(2), dtype=F64) * 0.98 + 0.01
    score = fastsde.VelocityScore(net, sde)
    torch.testing.assert_close(score(x, t), gm.score(x, t), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(score.data_prediction(x, t), gm.data_prediction(x, t), rtol=1e-9, atol=1e-9)
    seen = []
    fastsde.VelocityScore(lambda x, tt, **kw: seen.append((tt, kw)) or x, sde, time_input="timestep")(x, t, y=x)
    torch.testing.assert_close(seen[0][0], 1000.0 * sde.marginal_std(t))
    assert set(seen[0][1]) == {"y"}
    fastsde.VelocityScore(lambda x, tt: seen.append((tt, {})) or x, sde, time_input=lambda u: 2 * u)(x, t)
    torch.testing.assert_close(seen[1][0], 2 * t)
    with pytest.raises(ValueError, match="RectifiedFlow"):
        fastsde.VelocityScore(net, fastsde.VPSDE())
    with pytest.raises(ValueError, match="time_input"):
        fastsde.VelocityScore(net, sde, time_input="seconds")


# -- sampling from u = 1 -----------------------------------------------------------------------


def _mode_stats(gm, samples):
    resp = gm.responsibilities(samples)
    comp = resp.argmax(1)
    weights = torch.bincount(comp, minlength=3).to(F64) / samples.shape[0]
    means = torch.stack([samples[comp == k].mean(0) for k in range(3)])
    return weights, means


@pytest.mark.parametrize("name", list(FLOWS))
@pytest.mark.parametrize("key", list(SINGULAR))
def test_singular_start_solvers_sample_the_mixture(name, key):
    sde = FLOWS[name]()
    gm = mixture_2d(sde)
    solver, opts = _solver(key), SINGULAR[key]
    steps = 40
    res = fastsde.sample(gm, sde, (3000, 2), solver=solver, steps=steps, seed=1, dtype=F64, **opts)
    assert torch.isfinite(res.samples).all()
    assert res.nfe == fastsde.SOLVERS[solver].fixed_nfe({"steps": steps, **opts}) == steps
    weights, means = _mode_stats(gm, res.samples)
    torch.testing.assert_close(weights, gm.weights, rtol=0, atol=0.035)
    torch.testing.assert_close(means, gm.means, rtol=0, atol=0.02)


@pytest.mark.parametrize("name", list(FLOWS))
def test_first_move_from_pure_noise_is_exact(name):
    """One move from u = 1 to s with the exact mixture: x_s = σ_s·x + m_s·E[x0] (DDIM, Euler, DPM++)."""
    sde = FLOWS[name]()
    gm = mixture_2d(sde)
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    s = 0.6
    st = torch.tensor([s], dtype=F64)
    want = sde.marginal_std(st) * x_T + sde.mean_coeff(st) * (gm.weights[:, None] * gm.means).sum(0)
    for solver in ("ddim", "euler", "dpmpp_2m"):
        res = fastsde.sample(gm, sde, x_T.shape, solver=solver, steps=2, x_init=x_T, t_end=s, denoise=False, dtype=F64)
        torch.testing.assert_close(res.samples, want, rtol=1e-14, atol=1e-14)


def test_singular_start_is_batch_independent_and_deterministic():
    sde = fastsde.RectifiedFlow(shift=3.0)
    gm = mixture_2d(sde)
    for solver, opts in (("ddim", {"eta": 1.0}), ("dpmpp_2m", {})):
        full = fastsde.sample(gm, sde, (7, 2), solver=solver, steps=10, seed=[5, 6, 7, 8, 9, 10, 11], **opts)
        again = fastsde.sample(gm, sde, (7, 2), solver=solver, steps=10, seed=[5, 6, 7, 8, 9, 10, 11], **opts)
        part = fastsde.sample(gm, sde, (3, 2), solver=solver, steps=10, seed=[8, 9, 10], **opts)
        assert torch.equal(full.samples, again.samples)
        assert torch.equal(full.samples[3:6], part.samples)


def test_pure_noise_start_refusals_before_compute():
    """From u = 1 every solver needs the score's data prediction (refused before any evaluation without
    one: a plain score, classifier guidance); the log-SNR / EDM grids and mlem's p='auto' are refused
    there; started below u = 1 (x_init_noised) fixed-grid solvers run finitely as before."""
    sde = fastsde.RectifiedFlow()
    gm = mixture_2d(sde)
    calls = []

    def plain(x, t):
        calls.append(1)
        return gm.score(x, t)

    for name in fastsde.SOLVERS:
        if name == "mlem":
            continue
        with pytest.raises(ValueError, match="data_prediction"):
            fastsde.sample(plain, sde, (4, 2), solver=name)
    guided = fastsde.ClassifierGuidance(gm, lambda x, t: torch.zeros(x.shape[0], 3, dtype=x.dtype), 1.0)
    with pytest.raises(ValueError, match="0·∞"):
        fastsde.sample(guided, sde, (4, 2), solver="euler", cond={"class_labels": torch.zeros(4, dtype=torch.long)})
    levels = fastsde.Levels([mixture_2d(sde), mixture_2d(sde)], costs=[1.0, 4.0])
    with pytest.raises(ValueError, match="p explicitly"):
        fastsde.sample(levels, sde, (4, 2), solver="mlem", steps=10)
    assert not calls
    with pytest.raises(ValueError, match="data_prediction"):
        fastsde.log_likelihood(plain, sde, gm.sample(2))
    for kind in ("logsnr", "edm"):
        with pytest.raises(ValueError, match="uniform"):
            fastsde.sample(gm, sde, (4, 2), solver="dpmpp_2m", grid=kind)
    x_start = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    for name in ("heun", "dpmpp_3m", "unipc", "deis", "ipndm", "em", "ancestral", "er_sde"):
        res = fastsde.sample(
            gm, sde, x_start.shape, solver=name, steps=12, t_start=0.99, x_init=x_start, x_init_noised=True, seed=0
        )
        assert torch.isfinite(res.samples).all(), name


# -- every solver from u = 1 (the driver's shared first move) ---------------------------------------

#: the solvers with their own iia / mlem tests below
_OWN_TESTS = ("mlem", "iia_heun", "iia_ddim", "iia_dpmpp_2m")


def _options(name: str) -> dict:
    """A working option set from u = 1: 30 grid points on the quadratic grid (the time-uniform one is
    pre-asymptotic at 30 steps for the log-SNR multistep methods under shift 3: see SINGULAR), the
    adaptive solvers at their defaults."""
    spec = fastsde.SOLVERS[name]
    return {} if spec.adaptive else {"steps": 30, "grid": "quadratic"}


@pytest.mark.parametrize("flow", list(FLOWS))
@pytest.mark.parametrize("name", [k for k in fastsde.SOLVERS if k not in _OWN_TESTS])
def test_every_solver_samples_the_mixture_from_pure_noise(flow, name):
    """Every registered solver from u = 1: finite samples, honest NFE (the shared first move costs one
    data prediction in place of the method's move, ``fixed_nfe(sde=...)``; adaptive solvers: 1 + their
    own accounting), per-mode weights and means of the exact mixture."""
    sde = FLOWS[flow]()
    gm = mixture_2d(sde)
    spec = fastsde.SOLVERS[name]
    opts = _options(name)
    res = fastsde.sample(gm, sde, (3000, 2), solver=name, seed=1, dtype=F64, **opts)
    assert torch.isfinite(res.samples).all()
    stepper = spec.stepper
    if spec.adaptive:
        st = res.stats
        assert st["first_move"]["nfe"] == 1 and 0.0 < st["first_move"]["t"] < 1.0
        assert st["first_move"]["eta"] == (1.0 if spec.stochastic else 0.0)
        attempts = st["accepted"] - 1 + st["rejected"]  # accepted counts the first move
        want = 1 + stepper.first_nfe + stepper.nfe_per_step * attempts - st["reused_evaluations"]
        if "h_initial" in st:
            want = want + stepper.initial_step_nfe
        assert torch.equal(st["nfe_solver_per_sample"], want.to(st["nfe_solver_per_sample"].dtype))
        assert torch.equal(res.nfe_per_sample, st["nfe_solver_per_sample"] + 1)  # + the denoise
    else:
        want = spec.fixed_nfe(opts, sde=sde)
        assert res.nfe == want
        if name == "ode_corrector":  # its predictor (ddim) moves from u = 1 itself; heun's 2 NFE become 1
            assert want == spec.fixed_nfe(opts)
            pred = {"predictor": "heun", "steps": 6, "grid": "quadratic"}
            small = fastsde.sample(gm, sde, (4, 2), solver=name, dtype=F64, **pred)
            assert small.nfe == spec.fixed_nfe(pred, sde=sde) == spec.fixed_nfe(pred) - 1
        else:
            own = (opts["steps"] - 1) * spec.nfe_per_step_for(opts) + stepper.first_nfe + 1
            saved = 0 if stepper.singular_start else stepper.declared_move_nfe(spec._defaults(opts)) - 1
            assert want == own - saved
    weights, means = _mode_stats(gm, res.samples)
    torch.testing.assert_close(weights, gm.weights, rtol=0, atol=0.035)
    torch.testing.assert_close(means, gm.means, rtol=0, atol=0.03)


def test_shared_first_move_is_the_exact_posterior_move():
    """Move 0 of a method without its own first move from m = 0 is m_s·E[x0] + σ_s·x_T (η = 0,
    deterministic methods) or m_s·E[x0] + σ_s·z (η = 1, stochastic ones), z keyed per sample (the same
    for a fixed grid and an adaptive solve), the method's state untouched."""
    sde = fastsde.RectifiedFlow(shift=3.0)
    gm = mixture_2d(sde)
    mean = (gm.weights[:, None] * gm.means).sum(0)
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    st = torch.tensor([0.6], dtype=F64)
    m, sig = sde.mean_coeff(st), sde.marginal_std(st)
    for solver in ("heun", "dpmpp_3m", "unipc", "lms"):
        res = fastsde.sample(
            gm, sde, x_T.shape, solver=solver, steps=2, x_init=x_T, t_end=0.6, denoise=False, dtype=F64
        )
        torch.testing.assert_close(res.samples, sig * x_T + m * mean, rtol=1e-14, atol=1e-14)
        assert res.nfe == 1
    draws = []
    for solver in ("em", "ancestral", "dpmpp_2m_sde"):
        res = fastsde.sample(gm, sde, x_T.shape, solver=solver, steps=2, x_init=x_T, t_end=0.6, denoise=False, seed=3)
        draws.append((res.samples - m * mean) / sig)
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])
    assert not torch.allclose(draws[0].to(F64), x_T)


def test_adaptive_first_move_converges_as_the_tolerance_tightens():
    """The adaptive solvers' first move ends where m = √rtol (capped at 0.1): its O(m²) error shrinks with
    the tolerance, so ode from u = 1 converges to the reference as rtol tightens."""
    sde = fastsde.RectifiedFlow(shift=3.0)
    gm = mixture_2d(sde)
    x_T = torch.randn(100, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    ref = _reference(sde)
    errors, ends = [], []
    for rtol in (1e-3, 1e-5, 1e-7):
        res = fastsde.sample(
            gm, sde, x_T.shape, solver="ode", rtol=rtol, atol=rtol, x_init=x_T, denoise=False, dtype=F64
        )
        errors.append(float((res.samples - ref).pow(2).sum(1).sqrt().mean()))
        ends.append(res.stats["first_move"]["t"])
        m1 = float(sde.mean_coeff(torch.tensor([ends[-1]], dtype=F64))[0])
        assert m1 == pytest.approx(min(math.sqrt(rtol), 0.1), rel=1e-9)
    assert ends[0] < ends[1] < ends[2] < 1.0
    assert errors[0] > 20 * errors[1] > 20 * 20 * errors[2], errors


def test_mlem_levels_from_pure_noise():
    """mlem over two exact-mixture levels from u = 1: the first move takes the finest level's data
    prediction (counted on its counter), the later moves the randomised telescoping score."""
    sde = fastsde.RectifiedFlow(shift=3.0)
    levels = fastsde.Levels([mixture_2d(sde), mixture_2d(sde)], costs=[1.0, 4.0])
    gm = mixture_2d(sde)
    steps = 30
    res = fastsde.sample(
        levels, sde, (3000, 2), solver="mlem", steps=steps, p=[0.5], seed=1, dtype=F64, grid="quadratic"
    )
    assert torch.isfinite(res.samples).all()
    per_level = res.stats["nfe_per_level_per_sample"]
    assert torch.all(per_level[:, 0] == steps - 2)  # the coarse level on every move but the first
    assert torch.all(per_level[:, 1] >= 2)  # the first move and the denoise, plus the drawn corrections
    weights, means = _mode_stats(gm, res.samples)
    torch.testing.assert_close(weights, gm.weights, rtol=0, atol=0.035)
    torch.testing.assert_close(means, gm.means, rtol=0, atol=0.03)


@pytest.mark.parametrize("base", ["ddim", "heun", "dpmpp_2m"])
def test_iia_fits_and_samples_from_pure_noise(base):
    """An IIA table fitted on a rectified flow: move 0 is the shared first move (its row of coefficients
    is zero, not fitted), the later moves are IIA steps; sampling with it is finite, honest and right."""
    sde = fastsde.RectifiedFlow(shift=3.0)
    gm = mixture_2d(sde)
    steps = 10
    table = fastsde.fit_iia(gm, sde, solver=base, steps=steps, n=64, fine_steps=4, grid="quadratic")
    assert table.coefficients.shape[0] == steps - 1
    assert torch.all(table.coefficients[0] == 0) and bool((table.coefficients[1:] != 0).any())
    name = "iia_" + base
    res = fastsde.sample(gm, sde, (3000, 2), solver=name, steps=steps, table=table, grid="quadratic", seed=1, dtype=F64)
    assert torch.isfinite(res.samples).all()
    assert res.nfe == fastsde.SOLVERS[name].fixed_nfe({"steps": steps}, sde=sde)
    weights, means = _mode_stats(gm, res.samples)
    torch.testing.assert_close(weights, gm.weights, rtol=0, atol=0.035)
    torch.testing.assert_close(means, gm.means, rtol=0, atol=0.05)


@pytest.mark.parametrize("flow", list(FLOWS))
def test_log_likelihood_of_a_rectified_flow(flow):
    """The PF-ODE of the flow integrated up to T = 1 in x̂0 ((σ̇/σ)·(x − x̂0)): log p at t_end within 0.01
    nats per dimension of the exact mixture density, through the mixture and through a velocity network."""
    sde = FLOWS[flow]()
    gm = mixture_2d(sde)
    t_end = default_likelihood_t_end(sde)
    x = gm.sample(32, t=t_end, generator=torch.Generator().manual_seed(0))
    true = gm.log_prob(x, t_end)
    out = fastsde.log_likelihood(gm, sde, x)
    assert float(((out.logp - true).abs() / 2).max()) < 0.01
    torch.testing.assert_close(out.prior_logp, sde.prior_logp(out.z))
    steps = (out.stats["accepted"] + out.stats["rejected"]).to(F64)
    torch.testing.assert_close(out.nfe_per_sample, 2 + 6 * steps)
    velocity = fastsde.log_likelihood(fastsde.VelocityScore(_velocity_net(gm, sde), sde), sde, x[:8])
    torch.testing.assert_close(velocity.logp, out.logp[:8], rtol=0, atol=1e-6)


def test_guided_data_predictions():
    """CFG's data prediction is lerp(x̂0_u, x̂0_c, w) (one call on 2n rows), the x̂0 of the guided score
    inside; a CFG flow samples from u = 1. DiffusersUNetScore(prediction_type='flow_prediction') reads v."""
    sde = fastsde.RectifiedFlow(shift=3.0)
    gms = [
        mixture_2d(sde),
        fastsde.GaussianMixture([0.5, 0.5], torch.tensor([[1.0, 1.0], [-2.0, 0.5]]), [0.3, 0.3], sde=sde),
    ]

    class Cond:
        sde_ = sde

        def __call__(self, x, t, label):
            return torch.where(label[:, None] > 0, gms[1].score(x, t), gms[0].score(x, t))

        def data_prediction(self, x, t, label):
            return torch.where(label[:, None] > 0, gms[1].data_prediction(x, t), gms[0].data_prediction(x, t))

    cfg = fastsde.CFGScore(Cond(), 2.5, {"label": 0}, sde=sde)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = torch.full((16,), 0.4, dtype=F64)
    lab = torch.ones(16, dtype=torch.long)
    x0 = cfg.data_prediction(x, t, label=lab)
    want = torch.lerp(gms[0].data_prediction(x, t), gms[1].data_prediction(x, t), 2.5)
    torch.testing.assert_close(x0, want)
    torch.testing.assert_close(x0, sde.denoise(x, t, cfg(x, t, label=lab)), rtol=1e-10, atol=1e-10)
    assert fastsde.CFGScore(lambda x, t, label: x, 2.0, {"label": 0}, sde=sde).data_prediction is None
    res = fastsde.sample(cfg, sde, (64, 2), solver="heun", steps=8, cond={"label": lab.repeat(4)}, dtype=F64)
    assert torch.isfinite(res.samples).all() and res.nfe == fastsde.SOLVERS["heun"].fixed_nfe({"steps": 8}, sde=sde)

    class UNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, dtype=F64))
            self.seen = []

        def forward(self, x, label):
            self.seen.append(label)
            sigma = label / 1000.0
            u = sde.t_from_sigma(sigma)
            return type("Out", (), {"sample": (x - gms[0].data_prediction(x, u)) / sigma[:, None]})()

    unet = UNet()
    score = fastsde.score.DiffusersUNetScore(unet, sde, prediction_type="flow_prediction")
    torch.testing.assert_close(score(x, t), gms[0].score(x, t), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(score.data_prediction(x, t), gms[0].data_prediction(x, t), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(unet.seen[0], 1000.0 * sde.marginal_std(t))
    assert fastsde.score.DiffusersUNetScore(unet, sde, prediction_type="epsilon").data_prediction is None
    with pytest.raises(ValueError, match="RectifiedFlow"):
        fastsde.score.DiffusersUNetScore(unet, fastsde.VPSDE(), prediction_type="flow_prediction")


_REFERENCE: dict[float, torch.Tensor] = {}


def _reference(sde: fastsde.RectifiedFlow) -> torch.Tensor:
    """PF-ODE end points (t_end, before the denoise) of the 100 prior draws of seed 0 from u = 1:
    dpmpp_3m (form exact, order 3) on 1024 quadratic-grid points, computed once per shift."""
    key = sde.effective_shift
    if key not in _REFERENCE:
        x_T = torch.randn(100, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
        _REFERENCE[key] = fastsde.sample(
            mixture_2d(sde),
            sde,
            x_T.shape,
            solver="dpmpp_3m",
            form="exact",
            steps=1024,
            x_init=x_T,
            denoise=False,
            dtype=F64,
            grid="quadratic",
        ).samples
    return _REFERENCE[key]


@pytest.mark.parametrize(
    "solver, order, steps",
    [
        ("ddim", 1.0, [64, 128, 256]),
        ("dpmpp_2m", 2.0, [32, 64, 128]),
        ("heun", 2.0, [16, 32, 64]),
        ("unipc", 3.0, [32, 64, 128]),
    ],
)
def test_convergence_order_from_pure_noise(solver, order, steps):
    """Measured order on the flow PF-ODE from u = 1 on the quadratic grid: ddim / dpmpp_2m (their own
    first move; euler is ddim with η = 0, tested equal above), heun and unipc (the driver's shared first
    move, first order with local error O(m(t1)²), leaves their declared order measurable here);
    reference: :func:`_reference`."""
    sde = fastsde.RectifiedFlow(shift=3.0)
    gm = mixture_2d(sde)
    x_T = torch.randn(100, 2, generator=torch.Generator().manual_seed(0), dtype=F64)

    def run(name, n):
        return fastsde.sample(
            gm, sde, x_T.shape, solver=name, steps=n, x_init=x_T, denoise=False, dtype=F64, grid="quadratic"
        ).samples

    ref = _reference(sde)
    errors = [float((run(solver, n) - ref).pow(2).sum(1).sqrt().mean()) for n in steps]
    xs = [math.log(n) for n in steps]
    ys = [math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    fitted = -sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    assert order - 0.2 <= fitted <= order + 0.6, (errors, fitted)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_fit_grid_from_pure_noise(shift):
    """fit_grid on a rectified flow: the teacher takes x̂0 at u = 1 from the score's data prediction
    (the score is −x there), and the fitted grid beats the default one on the fitting loss."""
    sde = fastsde.RectifiedFlow(shift=shift)
    gm = fastsde.problems.mixture_2d(sde)
    grid = fastsde.fit_grid(gm, sde, solver="dpmpp_2m", steps=6, n=64, seed=0, shape=(2,), M=20, refine_iters=2)
    times = grid.times
    assert float(times[0]) == 1.0 and bool((times[1:] < times[:-1]).all())
    assert grid.record["loss_refined"] < 0.7 * grid.record["loss_default"]  # measured: 0.51 (shift 1), 0.13 (shift 3)
    res = fastsde.sample(gm, sde, (8, 2), solver="dpmpp_2m", steps=6, grid=grid, seed=1, dtype=torch.float64)
    assert bool(torch.isfinite(res.samples).all()) and res.nfe == 6.0


# -- t_end = 0: the grid runs to σ = 0 and its last move is the denoise --------------------------------


@pytest.mark.parametrize("grid", ["uniform", "quadratic"])
@pytest.mark.parametrize("sde", [fastsde.RectifiedFlow(shift=3.0), fastsde.VPSDE()], ids=repr)
def test_zero_end_evaluates_the_first_points_of_the_grid_to_zero(sde, grid):
    """t_end=0 with N points: the score is evaluated at the first N points of the N + 1-point grid from T to
    0 (the last of them by the denoise), N NFE as for any t_end; the samples are those of the run to that
    last interior point with the denoise there, except that lower_order_final no longer touches it."""
    from fastsde.grids import time_grid

    gm = mixture_2d(sde)
    seen: list[float] = []

    def score(x, t):
        seen.append(float(t[0]))
        return gm.score(x, t)

    score.data_prediction = gm.data_prediction
    n = 7
    res = fastsde.sample(score, sde, (16, 2), solver="euler", steps=n, grid=grid, t_end=0, dtype=F64)
    full = time_grid(sde, grid, n + 1, sde.T, 0.0)
    assert res.nfe == n and res.options["t_last"] == float(full[-2])
    if float(sde.mean_coeff(torch.tensor([sde.T], dtype=F64))[0]) != 0.0:  # from m = 0 move 0 is x̂0-based
        torch.testing.assert_close(torch.tensor(seen, dtype=F64), full[:-1], rtol=1e-12, atol=0)
    same = fastsde.sample(gm, sde, (16, 2), solver="euler", steps=n, grid=grid, t_end=float(full[-2]), dtype=F64)
    torch.testing.assert_close(res.samples, same.samples, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "sde, kwargs, word",
    [
        (fastsde.VESDE(), {"solver": "euler"}, r"needs σ\(0\) = 0"),
        (fastsde.RectifiedFlow(), {"solver": "euler", "denoise": False}, "denoise=True"),
        (fastsde.RectifiedFlow(), {"solver": "adaptive"}, "fixed-grid"),
        (fastsde.VPSDE(), {"solver": "dpmpp_2m", "grid": "logsnr"}, "grid one of"),
        (fastsde.RectifiedFlow(), {"solver": "euler", "grid": [1.0, 0.5, 0.0], "steps": 3}, "explicit grid"),
    ],
    ids=str,
)
def test_zero_end_refusals_before_compute(sde, kwargs, word):
    calls = []
    gm = mixture_2d(sde)

    def score(x, t):
        calls.append(1)
        return gm.score(x, t)

    score.data_prediction = gm.data_prediction
    with pytest.raises(ValueError, match=word):
        fastsde.sample(score, sde, (4, 2), t_end=0, dtype=F64, **kwargs)
    assert not calls


def test_unipc_own_first_move_and_its_corrector_from_pure_noise():
    """UniPC from u = 1 (λ = −∞) moves itself: x1 = σ1·x + m1·x̂0(x, 1) (its UniP-1 move, e^{−h} = 0),
    then corrects that point with the h → ∞ limit of UniC-1 once x̂0(x1) is known,
    x1c = σ1·x + m1·(x̂0(x, 1) + x̂0(x1, t1))/2, and moves on from x1c in first order (the point at
    λ = −∞ has r = −∞ and drops out of the predictor); the denoise at the last point ends the run."""
    sde = fastsde.RectifiedFlow(shift=3.0)
    gm = mixture_2d(sde)
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    res = fastsde.sample(gm, sde, x.shape, solver="unipc", steps=3, t_end=0, x_init=x, dtype=F64)
    t = [torch.full((32,), v, dtype=F64) for v in (1.0, 2 / 3, 1 / 3)]
    m = [sde.mean_coeff(v)[:, None] for v in t]
    s = [sde.marginal_std(v)[:, None] for v in t]
    d0 = gm.data_prediction(x, t[0])
    x1 = s[1] * x + m[1] * d0
    d1 = gm.data_prediction(x1, t[1])
    x1c = s[1] * x + m[1] * (d0 + d1) / 2
    h = sde.log_snr(t[2]) - sde.log_snr(t[1])
    x2 = s[2] / s[1] * x1c + m[2] * (-torch.expm1(-h))[:, None] * d1
    torch.testing.assert_close(res.samples, gm.data_prediction(x2, t[2]), rtol=0, atol=1e-12)
    assert res.nfe == 3


@pytest.mark.parametrize(
    "sde, kwargs, want",
    [
        (fastsde.RectifiedFlow(shift=3.0), {"solver": "unipc", "steps": 6}, 0.0),
        (fastsde.RectifiedFlow(shift=3.0), {"solver": "euler", "steps": 14, "grid": "quadratic"}, 0.0),
        (fastsde.RectifiedFlow(shift=3.0), {"solver": "unipc", "steps": 15}, 1e-3),  # longer runs keep it
        (fastsde.RectifiedFlow(shift=3.0), {"solver": "unipc", "steps": 6, "denoise": False}, 1e-3),
        (fastsde.RectifiedFlow(shift=3.0), {"solver": "adaptive_sde_dpm_2m"}, 1e-3),
        (fastsde.VPSDE(), {"solver": "unipc", "steps": 6}, 1e-3),  # m(T) > 0: not a flow's pure noise
    ],
    ids=str,
)
def test_default_t_end_of_short_flow_runs_is_zero(sde, kwargs, want):
    """A rectified flow's fixed-grid run of fewer than 15 points on uniform / quadratic ends at σ = 0 by
    default (t_end=0); anything else keeps the process's default_t_end."""
    gm = mixture_2d(sde)
    res = fastsde.sample(gm, sde, (8, 2), dtype=F64, **kwargs)
    assert res.options["t_end"] == want
    assert ("t_last" in res.options) == (want == 0.0)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc"])
def test_long_runs_default_to_the_quadratic_grid(solver):
    """From 15 points on (t_end > 0), a flow's default grid is quadratic: uniform in u ends with one log-SNR
    step many times the previous one, across which multistep solvers extrapolate (std 0.68 at 20 points
    under shift 3 on this problem; the truth is 0.5)."""
    sde = fastsde.RectifiedFlow(3.0)
    gm = fastsde.GaussianMixture([1.0], torch.zeros(1, 2), [0.5], sde)
    res = fastsde.sample(gm.score, sde, (8192, 2), solver, dtype=torch.float64, steps=20, seed=0)
    assert res.options["grid"] == "quadratic" and res.options["t_end"] == sde.default_t_end
    assert abs(float(res.samples.std()) - 0.5) < 0.03
    short = fastsde.sample(gm.score, sde, (16, 2), solver, dtype=torch.float64, steps=8, seed=0)
    assert short.options["grid"] == "uniform" and short.options["t_end"] == 0  # short runs end at σ = 0
    given = fastsde.sample(gm.score, sde, (16, 2), solver, dtype=torch.float64, steps=20, grid="uniform", seed=0)
    assert given.options["grid"] == "uniform"  # a named grid is kept

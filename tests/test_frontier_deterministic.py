"""The deterministic few-NFE steppers of issue 19: ``lms``, ``ipndm``, ``unipc``, ``deis``.

Few-step runs on every process (NFE = N for N grid points, the denoise included), convergence orders
of the non-default options on an exact Gaussian (the defaults are checked on the mixture by
test_convergence), the identities between the methods, bad options refused before any score call,
and, where k-diffusion / diffusers are installed, equality with their samplers on the same σ grid.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import fastsde
from fastsde.problems import mixture_2d
from fastsde.score import GaussianMixture

F64 = torch.float64
NEW = ["lms", "ipndm", "unipc", "deis"]
HAS_KDIFF = importlib.util.find_spec("k_diffusion") is not None
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None

PROCESSES = {
    "vp": lambda: fastsde.VPSDE(),
    "subvp": lambda: fastsde.SubVPSDE(),
    "ve": lambda: fastsde.VESDE(sigma_min=0.01, sigma_max=50.0),
    "edm": lambda: fastsde.EDM(sigma_min=0.002, sigma_max=80.0),
    "vp_discrete": lambda: fastsde.VPSDE.from_betas(fastsde.VPSDE().discrete_betas(1000)),
}


def _start(sde: fastsde.SDE, n: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return sde.prior_sample(torch.randn(n, 2, generator=g, dtype=F64))


def _run(score, sde, x_init, solver, **opts):
    return fastsde.sample(score, sde, x_init.shape, solver=solver, x_init=x_init, dtype=F64, **opts)


def test_declarations():
    s = fastsde.SOLVERS
    assert (s["lms"].order, s["ipndm"].order, s["unipc"].order, s["deis"].order) == (4.0, 2.0, 3.0, 3.0)
    assert s["lms"].order_for({"order": 2}) == 2.0 and s["ipndm"].order_for({"max_order": 1}) == 1.0
    assert s["unipc"].order_for({"order": 3}) == 4.0 and s["unipc"].order_for({"order": 3, "corrector": False}) == 2.0
    for name in NEW:
        assert not s[name].stochastic and s[name].nfe_per_step == 1
        assert s[name].fixed_nfe({"steps": 7}) == 7 and s[name].fixed_nfe({"steps": 7}, denoise=False) == 6


@pytest.mark.parametrize("process", list(PROCESSES))
@pytest.mark.parametrize("solver", NEW)
def test_one_two_three_moves_on_every_process(process, solver):
    """N = 2, 3, 4 grid points (1, 2, 3 moves): finite samples and N NFE per sample."""
    sde = PROCESSES[process]()
    gm = mixture_2d(sde)
    x_init = _start(sde, 8)
    for steps in (2, 3, 4):
        res = _run(gm, sde, x_init, solver, steps=steps)
        assert bool(torch.isfinite(res.samples).all())
        assert bool((res.nfe_per_sample == steps).all()) and res.nfe == steps
        assert float(res.samples.abs().max()) < 5.0  # near the data, not blown up


# ---------------------------------------------------------------------------------------------
# Convergence on an exact Gaussian (the PF-ODE solution is closed-form)
# ---------------------------------------------------------------------------------------------

MU = torch.tensor([[0.3, -0.5]], dtype=F64)
STD = torch.tensor([[0.4, 0.8]], dtype=F64)


def _exact(sde: fastsde.SDE, x_T: torch.Tensor, t_end: float | None = None) -> torch.Tensor:
    """The PF-ODE from x_T at T to t_end for data N(μ, c²): x̃(σ̃) = μ + (x̃_T − μ)·√((c² + σ̃²)/(c² + σ̃_T²))."""
    ends = torch.tensor([sde.T, sde.default_t_end if t_end is None else t_end], dtype=F64)
    sig, m = sde.edm_sigma(ends), sde.mean_coeff(ends)
    xt = x_T / m[0]
    return m[1] * (MU + (xt - MU) * torch.sqrt((STD**2 + sig[1] ** 2) / (STD**2 + sig[0] ** 2)))


def _fitted_order(steps: list[int], errors: list[float]) -> float:
    xs, ys = [math.log(s) for s in steps], [math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return -sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


#: (solver, options, steps): the options test_convergence does not reach (it runs the defaults).
ORDER_CASES = [
    ("lms", {"order": 2}, [16, 32, 64]),
    ("lms", {"order": 3}, [16, 32, 64]),
    ("ipndm", {"max_order": 3}, [16, 32, 64]),
    ("deis", {"order": 2}, [16, 32, 64]),
    ("unipc", {"order": 3, "corrector": False}, [16, 32, 64]),
    ("unipc", {"order": 2, "corrector": False}, [16, 32, 64]),
    ("unipc", {"variant": "bh1"}, [16, 32, 64]),
]


@pytest.mark.parametrize("solver,opts,steps", ORDER_CASES, ids=[f"{c[0]}-{c[1]}" for c in ORDER_CASES])
def test_order_on_an_exact_gaussian(solver, opts, steps):
    """A narrow EDM range (σ from 5 to 0.3) keeps these step counts in the asymptotic regime."""
    sde = fastsde.EDM(sigma_min=0.3, sigma_max=5.0)
    gm = GaussianMixture([1.0], MU, STD, sde)
    x_init = _start(sde, 8)
    ref = _exact(sde, x_init)
    errors = [
        float((_run(gm, sde, x_init, solver, steps=n, denoise=False, **opts).samples - ref).abs().max()) for n in steps
    ]
    declared = fastsde.SOLVERS[solver].order_for(opts)
    order = _fitted_order(steps, errors)
    assert declared - 0.2 <= order <= declared + 0.6, f"{solver} {opts}: errors {errors}, order {order:.2f}"


@pytest.mark.parametrize("process", ["vp", "edm"])
@pytest.mark.parametrize("solver,opts", [("lms", {}), ("unipc", {"order": 3})])
def test_fourth_order_members_on_an_exact_gaussian(process, solver, opts):
    """LMS-4 (the default) and UniPC-3 with its corrector are fourth order (the first-order warm-up's error is damped
    by the flow from σ_max). On the mixture their order shows only beyond 256 steps, where the
    reference solve's accuracy ends, so test_convergence leaves them to this exact reference, from
    σ_max down to σ̃ = 0.3."""
    sde = PROCESSES[process]()
    t_end = float(sde.t_from_edm_sigma(torch.tensor([0.3], dtype=F64))[0])
    gm = GaussianMixture([1.0], MU, STD, sde)
    x_init = _start(sde, 4)
    ref = _exact(sde, x_init, t_end)
    steps = [64, 128, 256]
    errors = [
        float((_run(gm, sde, x_init, solver, steps=n, t_end=t_end, denoise=False, **opts).samples - ref).abs().max())
        for n in steps
    ]
    declared = fastsde.SOLVERS[solver].order_for(opts)
    order = _fitted_order(steps, errors)
    assert declared == 4.0 and declared - 0.2 <= order <= declared + 0.6, (
        f"{solver}: errors {errors}, order {order:.2f}"
    )


# ---------------------------------------------------------------------------------------------
# Identities
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("process", ["vp", "edm", "vp_discrete"])
def test_first_order_members_are_ddim(process):
    """LMS-1 = iPNDM-1 = DEIS-1 = UniP-1 without the corrector = DDIM (η = 0) on the same grid."""
    sde = PROCESSES[process]()
    gm = mixture_2d(sde)
    x_init = _start(sde)
    ddim = _run(gm, sde, x_init, "ddim", steps=9, grid="edm").samples
    for solver, opts in [
        ("lms", {"order": 1}),
        ("ipndm", {"max_order": 1}),
        ("deis", {"order": 1}),
        ("unipc", {"order": 1, "corrector": False}),
    ]:
        x = _run(gm, sde, x_init, solver, steps=9, grid="edm", **opts).samples
        torch.testing.assert_close(x, ddim, rtol=1e-11, atol=1e-11, msg=f"{solver} {opts}")


def test_deis_is_lms_on_edm_and_lms_is_ipndm_on_a_uniform_grid():
    """On EDM (t = σ̃) polynomials in t are polynomials in σ̃: DEIS-tAB-k = LMS-k. On a grid uniform in
    σ̃ the exact variable-step weights are the fixed ones: LMS-k = iPNDM-k."""
    sde = fastsde.EDM()
    gm = mixture_2d(sde)
    x_init = _start(sde)
    for k in (2, 3):
        lms = _run(gm, sde, x_init, "lms", steps=10, grid="edm", order=k).samples
        deis = _run(gm, sde, x_init, "deis", steps=10, grid="edm", order=k).samples
        torch.testing.assert_close(deis, lms, rtol=1e-9, atol=1e-9)
    for k in (2, 3, 4):
        lms = _run(gm, sde, x_init, "lms", steps=10, grid="uniform", order=k).samples
        ipndm = _run(gm, sde, x_init, "ipndm", steps=10, grid="uniform", max_order=k).samples
        torch.testing.assert_close(ipndm, lms, rtol=1e-9, atol=1e-9)
    # on a non-uniform grid they differ (iPNDM's weights are those of uniform steps)
    lms = _run(gm, sde, x_init, "lms", steps=10, order=3).samples
    ipndm = _run(gm, sde, x_init, "ipndm", steps=10, max_order=3).samples
    assert float((lms - ipndm).abs().max()) > 1e-4


def test_unipc_variants_and_corrector_change_the_result():
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)
    x_init = _start(sde)
    base = _run(gm, sde, x_init, "unipc", steps=6).samples
    assert float((base - _run(gm, sde, x_init, "unipc", steps=6, variant="bh1").samples).abs().max()) > 1e-6
    assert float((base - _run(gm, sde, x_init, "unipc", steps=6, corrector=False).samples).abs().max()) > 1e-6


# ---------------------------------------------------------------------------------------------
# Bad options
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "solver,opts",
    [
        ("lms", {"order": 5}),
        ("lms", {"order": 0}),
        ("ipndm", {"max_order": 5}),
        ("unipc", {"order": 4}),
        ("unipc", {"variant": "bh3"}),
        ("unipc", {"corrector": "yes"}),
        ("unipc", {"lower_order_final": 1}),
        ("deis", {"order": 4}),
        ("deis", {"steps": 1}),
    ],
)
def test_bad_options_are_refused_before_any_score_call(solver, opts):
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)
    calls = []

    def score(x, t):
        calls.append(1)
        return gm(x, t)

    name = next(iter(opts))
    with pytest.raises(ValueError, match=name):
        fastsde.sample(score, sde, (4, 2), solver=solver, **opts)
    assert not calls


# ---------------------------------------------------------------------------------------------
# Peers (only where installed)
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_KDIFF, reason="k-diffusion not installed (pip install fastsde[peers])")
@pytest.mark.parametrize("process", ["vp", "edm"])
def test_lms_equals_k_diffusion_sample_lms(process):
    """The same σ̃ grid (no trailing zero: both stop at t_end), the same denoiser; k-diffusion
    integrates its weights with quad to a relative 1e-4, fastsde exactly."""
    from k_diffusion.sampling import sample_lms

    from fastsde.bench.peers import EDMDenoiser
    from fastsde.grids import time_grid

    sde = PROCESSES[process]()
    gm = mixture_2d(sde)
    x_init = _start(sde, 32)
    for order in (2, 4):
        ours = _run(gm, sde, x_init, "lms", steps=10, grid="edm", order=order, denoise=False).samples
        sigmas = sde.edm_sigma(time_grid(sde, "edm", 10, sde.T, sde.default_t_end))
        m = sde.mean_coeff(torch.tensor([sde.T, sde.default_t_end], dtype=F64))
        theirs = sample_lms(EDMDenoiser(gm, sde), x_init / m[0], sigmas, disable=True, order=order) * m[1]
        rel = float((ours - theirs).abs().max() / theirs.abs().max())
        assert rel < 1e-4, f"order {order}: relative difference {rel:.2e}"
    # the bench adapter: k-diffusion's grid with a trailing 0, whose last LMS step replaces the Tweedie
    # denoise at t_end (the same NFE; the two final steps differ by O(σ̃(t_end)))
    from fastsde.bench.peers import PEERS

    peer = PEERS["kdiff_lms"].run(gm, sde, x_init, 10, sde.default_t_end)
    ours = _run(gm, sde, x_init, "lms", steps=10, grid="edm")
    assert peer.nfe == ours.nfe == 10
    assert float((peer.samples - ours.samples).abs().max() / ours.samples.abs().max()) < 1e-2


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers not installed (pip install fastsde[peers])")
@pytest.mark.parametrize("process", ["vp", "edm"])
def test_unipc_equals_diffusers_unipc_on_karras_sigmas(process):
    """diffusers' UniPCMultistepScheduler (its defaults: order 2, bh2) on the same Karras σ̃ grid with a final σ = 0 (its last step
    returns x̂0 at the last predicted point, as fastsde's denoise does); below 15 moves the two apply
    the same lower-order-final rule, so they agree to rounding."""
    from fastsde.bench.peers import PEERS

    sde = PROCESSES[process]()
    gm = mixture_2d(sde)
    x_init = _start(sde, 32)
    for steps in (3, 6, 10):
        peer = PEERS["diffusers_unipc_karras"].run(gm, sde, x_init, steps, sde.default_t_end)
        ours = _run(gm, sde, x_init, "unipc", steps=steps, grid="edm", order=2)
        assert peer.nfe == ours.nfe == steps
        torch.testing.assert_close(ours.samples, peer.samples, rtol=1e-10, atol=1e-10)
    # bh1 (and order 2): diffusers' final step to σ = 0 is NaN for bh1 (B(h) = h = ∞ times 0), so the
    # scheduler is compared at its last predicted point, before that step (fastsde: denoise=False)
    import diffusers

    from fastsde.bench.peers import EDMDenoiser, karras_sigmas

    steps = 8
    sig = karras_sigmas(sde, steps, sde.default_t_end)
    den = EDMDenoiser(gm, sde)
    m = sde.mean_coeff(torch.tensor([sde.T, sde.default_t_end], dtype=F64))
    for order, variant in ((2, "bh1"), (3, "bh1"), (3, "bh2")):
        sched = diffusers.UniPCMultistepScheduler(
            num_train_timesteps=1000, solver_order=order, solver_type=variant, prediction_type="sample"
        )
        sched.set_timesteps(steps)
        sched.sigmas, sched.timesteps = sig.clone(), torch.arange(steps - 1, -1, -1) * 100
        x = x_init / m[0] / float(torch.sqrt(1.0 + sig[0] ** 2))
        for i, tau in enumerate(sched.timesteps[:-1]):
            s_i = float(sig[i])
            x = sched.step(den(x * (1.0 + s_i**2) ** 0.5, torch.full((32,), s_i, dtype=F64)), tau, x).prev_sample
        theirs = x * float(torch.sqrt(1.0 + sig[-2] ** 2)) * m[1]
        ours = _run(gm, sde, x_init, "unipc", steps=steps, grid="edm", order=order, variant=variant, denoise=False)
        torch.testing.assert_close(ours.samples, theirs, rtol=1e-10, atol=1e-10, msg=f"{order} {variant}")


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers not installed (pip install fastsde[peers])")
def test_diffusers_dpmsolver_karras_adapter_reproduces_dpmpp_2m():
    """From 15 moves on diffusers' DPM-Solver++(2M) keeps second order to the end, as dpmpp_2m does."""
    from fastsde.bench.peers import PEERS

    sde = fastsde.EDM()
    gm = mixture_2d(sde)
    x_init = _start(sde, 32)
    peer = PEERS["diffusers_dpmsolver_2m_karras"].run(gm, sde, x_init, 20, sde.default_t_end)
    ours = _run(gm, sde, x_init, "dpmpp_2m", steps=20, grid="edm")
    assert peer.nfe == ours.nfe == 20
    torch.testing.assert_close(ours.samples, peer.samples, rtol=1e-5, atol=1e-5)

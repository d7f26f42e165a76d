"""The diffusers flow-matching peers (issue 31): each drives its scheduler by hand with the velocity
rebuilt from fastsde's score on a RectifiedFlow. FlowMatchEuler equals fastsde's ``euler``; DPM-Solver++(2M)
and UniPC equal fastsde's ``dpmpp_2m`` / ``unipc`` on diffusers' own ``use_flow_sigmas`` grid; every peer
converges to the exact mixture as its steps grow."""

from __future__ import annotations

import pytest
import torch

import fastsde
from fastsde.bench.peers import FLOW_PEERS, PEERS, FlowVelocity, TimedScore
from fastsde.metrics.mixture import mixture_frechet
from fastsde.problems import mixture_2d
from fastsde.score import CountingScore

diffusers = pytest.importorskip("diffusers")

F64 = torch.float64


def _x_T(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _flow_grid(cls_name: str, sde: fastsde.RectifiedFlow, n: int) -> torch.Tensor:
    """The process times of diffusers' ``use_flow_sigmas`` grid with n steps (final σ = 0 dropped)."""
    sched = getattr(diffusers, cls_name)(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=sde.effective_shift
    )
    sched.set_timesteps(n)
    return sde.t_from_sigma(sched.sigmas[:-1].double())


@pytest.mark.parametrize(
    "sched_kw, mu", [({}, None), ({"shift": 3.0}, None), ({"use_dynamic_shifting": True}, 0.8)], ids=str
)
def test_flow_euler_peer_equals_fastsde_euler(sched_kw, mu):
    # the process of diffusers' scheduler (its t_end is the scheduler's σ_min)
    sde = fastsde.RectifiedFlow.from_diffusers_scheduler(diffusers.FlowMatchEulerDiscreteScheduler(**sched_kw), mu=mu)
    gm = mixture_2d(sde)
    x_T = _x_T(32)
    run = PEERS["diffusers_flow_euler"].run(gm.score, sde, x_T, 9, sde.default_t_end)
    res = fastsde.sample(
        gm.score, sde, x_T.shape, solver="euler", steps=9, x_init=x_T, dtype=F64, t_end=sde.default_t_end
    )  # below 15 points a flow's default t_end is 0: diffusers' Euler evaluates down to σ_min
    assert run.nfe == res.nfe == 9 and run.samples.dtype == F64
    torch.testing.assert_close(run.samples, res.samples, rtol=0, atol=2e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [6, 16])
def test_dpmsolver_2m_flow_peer_equals_dpmpp_2m_on_its_grid(shift, n):
    """diffusers' flow grid is uniform in u from 0.999 to 0.999/n; its last step (to σ = 0) is x̂0, which
    is fastsde's final denoise, and its move before that is second order (fastsde: lower_order_final off)."""
    sde = fastsde.RectifiedFlow(shift=shift)
    gm = mixture_2d(sde)
    x_T = _x_T(32)
    grid = _flow_grid("DPMSolverMultistepScheduler", sde, n)
    torch.testing.assert_close(grid, torch.linspace(0.999, 0.999 / n, n, dtype=F64), rtol=0, atol=1e-6)
    run = PEERS["diffusers_dpmsolver_2m_flow"].run(gm.score, sde, x_T, n, sde.default_t_end)
    res = fastsde.sample(
        gm.score, sde, x_T.shape, solver="dpmpp_2m", steps=n, grid="uniform", t_start=0.999, t_end=0.999 / n,
        x_init=x_T, x_init_noised=True, lower_order_final=False, dtype=F64,
    )  # fmt: skip
    assert run.nfe == res.nfe == n
    torch.testing.assert_close(run.samples, res.samples, rtol=0, atol=2e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_unipc_flow_peer_equals_unipc_on_its_grid(shift):
    """diffusers' UniPC starts at σ = 1 − 1e-6 (not at u = 1): from there fastsde's unipc (bh2, corrector,
    order 2) on the same uniform-in-u grid gives its samples."""
    n = 8
    sde = fastsde.RectifiedFlow(shift=shift)
    gm = mixture_2d(sde)
    x_T = _x_T(32)
    grid = _flow_grid("UniPCMultistepScheduler", sde, n)
    run = PEERS["diffusers_unipc_flow"].run(gm.score, sde, x_T, n, sde.default_t_end)
    res = fastsde.sample(
        gm.score, sde, x_T.shape, solver="unipc", steps=n, grid="uniform", t_start=float(grid[0]),
        t_end=float(grid[-1]), x_init=x_T, x_init_noised=True, dtype=F64,
    )  # fmt: skip
    assert run.nfe == res.nfe == n
    torch.testing.assert_close(run.samples, res.samples, rtol=0, atol=2e-6)


def test_heun_flow_peer_counts_and_converges():
    sde = fastsde.RectifiedFlow()
    gm = mixture_2d(sde)
    x_T = _x_T(256)
    ref = fastsde.sample(gm.score, sde, x_T.shape, solver="dpmpp_2m", steps=400, grid="quadratic", x_init=x_T)
    runs = [PEERS["diffusers_flow_heun"].run(gm.score, sde, x_T, b, sde.default_t_end) for b in (10, 20, 40)]
    assert [r.nfe for r in runs] == [9, 19, 39] and [r.setting["steps"] for r in runs] == [5, 10, 20]
    mse = [float(((r.samples - ref.samples) ** 2).mean()) for r in runs]
    assert mse[2] < mse[1] / 5 < mse[0] / 25 and mse[2] < 1e-4, mse


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("name", list(FLOW_PEERS))
def test_flow_peers_converge_to_the_mixture(name, shift):
    """Per-mode FD to the exact mixture falls with the budget (2000 samples; floor ≈ 6e-5)."""
    sde = fastsde.RectifiedFlow(shift=shift)
    gm = mixture_2d(sde)
    x_T = _x_T(2000)
    fd = [mixture_frechet(FLOW_PEERS[name].run(gm.score, sde, x_T, b, 1e-3, seed=1).samples, gm).value for b in (5, 40)]
    assert fd[1] < fd[0] / 5 and fd[1] < 2e-3, fd


def test_sde_flow_peer_is_seeded():
    sde = fastsde.RectifiedFlow()
    gm = mixture_2d(sde)
    peer = PEERS["diffusers_dpmsolver_2m_sde_flow"]
    a, b, c = (peer.run(gm.score, sde, _x_T(16), 6, 1e-3, seed=s) for s in (3, 3, 4))
    assert peer.stochastic and a.nfe == 6
    assert torch.equal(a.samples, b.samples) and not torch.equal(a.samples, c.samples)


def test_flow_peers_only_on_flows_and_need_a_data_prediction():
    for peer in FLOW_PEERS.values():
        assert peer.supports(fastsde.RectifiedFlow(shift=3.0)) and not peer.supports(fastsde.VPSDE())
        assert peer.available()[0]
    vp = fastsde.VPSDE()
    with pytest.raises(ValueError, match="RectifiedFlow"):
        FlowVelocity(CountingScore(mixture_2d(vp).score, 4), vp)
    sde = fastsde.RectifiedFlow()
    gm = mixture_2d(sde)
    with pytest.raises(ValueError, match="data_prediction"):
        FlowVelocity(CountingScore(lambda x, t: gm.score(x, t), 4), sde)
    with pytest.raises(ValueError, match="data_prediction"):
        PEERS["diffusers_flow_euler"].run(lambda x, t: gm.score(x, t), sde, _x_T(4), 4, 1e-3)


def test_timed_score_keeps_the_data_prediction_and_counts_it():
    sde = fastsde.RectifiedFlow()
    gm = mixture_2d(sde)
    timed = TimedScore(gm.score)
    counted = CountingScore(timed, 4)
    x, t = _x_T(4), torch.ones(4, dtype=F64)
    torch.testing.assert_close(counted.data_prediction(x, t), gm.data_prediction(x, t))
    assert counted.nfe == 1 and timed.seconds > 0
    assert not hasattr(TimedScore(lambda x, t: -x), "data_prediction")
    # the velocity at σ = 1 is x − x̂0, at σ = ½ (x − x̂0)/½
    vel = FlowVelocity(CountingScore(timed, 4), sde)
    torch.testing.assert_close(vel(x, 1.0), x - gm.data_prediction(x, t))
    half = torch.full((4,), 0.5, dtype=F64)
    torch.testing.assert_close(vel(x, 0.5), (x - gm.data_prediction(x, half)) / 0.5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [4, 10])
def test_dpmsolver_2m_flow_peer_equals_dpmpp_2m_to_zero(shift, n):
    """``t_end=0`` is diffusers' ``final_sigmas_type="zero"``: the uniform grid of n + 1 points runs to 0,
    the denoise at its last interior point is the move to σ = 0, and the move before it stays second
    order; from diffusers' first σ (0.999) that is its DPM-Solver++(2M), with no explicit grid or option."""
    sde = fastsde.RectifiedFlow(shift=shift)
    gm = mixture_2d(sde)
    x_T = _x_T(32)
    run = PEERS["diffusers_dpmsolver_2m_flow"].run(gm.score, sde, x_T, n, sde.default_t_end)
    res = fastsde.sample(
        gm.score, sde, x_T.shape, solver="dpmpp_2m", steps=n, t_start=0.999, t_end=0, x_init=x_T,
        x_init_noised=True, dtype=F64,
    )  # fmt: skip
    assert run.nfe == res.nfe == n
    assert res.options["t_end"] == 0.0 and res.options["t_last"] == pytest.approx(0.999 / n, rel=1e-12)
    torch.testing.assert_close(run.samples, res.samples, rtol=0, atol=1e-5)  # diffusers' σ are float32

"""Discrete-time VP processes (DDPM schedules): the ᾱ table at the training timesteps, the timestep
mapping, SDE consistency, config round trip, and every kind of solver running on one."""

from __future__ import annotations

import json

import pytest
import torch

import fastsde
from fastsde.score import default_time_input
from fastsde.sde import DiscreteVPSDE, process_by_name, process_name, sde_from_config

torch.set_num_threads(1)
diffusers = pytest.importorskip("diffusers")

SCHEDULES = ["linear", "squaredcos_cap_v2", "scaled_linear"]


def _scheduler(kind: str, n: int = 1000):
    return diffusers.DDPMScheduler(num_train_timesteps=n, beta_schedule=kind)


def _timesteps(n: int) -> torch.Tensor:
    """t_i = (i+1)/N, where timestep i sits."""
    return torch.arange(1, n + 1, dtype=torch.float64) / n


def _max_rel_alpha_bar_error(sde: DiscreteVPSDE, table: torch.Tensor) -> float:
    ab = sde.mean_coeff(_timesteps(table.numel())) ** 2
    ref = table.double()
    return float(((ab - ref).abs() / ref).max())


@pytest.mark.parametrize("kind", SCHEDULES)
def test_alpha_bar_matches_the_scheduler_table(kind):
    sched = _scheduler(kind)
    from_sched = fastsde.VPSDE.from_diffusers_scheduler(sched)
    from_table = fastsde.VPSDE.from_alphas_cumprod(sched.alphas_cumprod)
    assert isinstance(from_sched, fastsde.VPSDE) and from_sched.num_timesteps == 1000
    assert _max_rel_alpha_bar_error(from_sched, sched.alphas_cumprod) < 1e-12
    assert _max_rel_alpha_bar_error(from_table, sched.alphas_cumprod) < 1e-12
    # from the betas, ᾱ is a float64 product; diffusers' own table is a float32 product of the same betas
    assert _max_rel_alpha_bar_error(fastsde.VPSDE.from_betas(sched.betas), sched.alphas_cumprod) < 1e-6
    # m² + σ² = 1 and the betas come back from the grid of N uniform steps
    t = _timesteps(1000)
    assert torch.allclose(from_sched.mean_coeff(t) ** 2 + from_sched.marginal_std(t) ** 2, torch.ones_like(t))
    betas = sched.betas.double()
    assert torch.allclose(fastsde.VPSDE.from_betas(betas).discrete_betas(1000), betas, rtol=1e-9, atol=0)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_timestep_mapping_is_monotone_and_hits_the_table(kind):
    sde = fastsde.VPSDE.from_diffusers_scheduler(_scheduler(kind))
    t = _timesteps(1000)
    assert torch.equal(sde.timestep(t), torch.arange(1000, dtype=torch.float64))
    dense = torch.linspace(1e-6, 1.0, 20001, dtype=torch.float64)
    tau = sde.timestep(dense)
    assert (tau[1:] >= tau[:-1]).all() and tau[0] == 0 and tau[-1] == 999
    lam = sde.log_snr(dense)
    assert (lam[1:] < lam[:-1]).all(), "λ(t) must be strictly decreasing, below t_0 included"
    assert torch.allclose(sde.t_from_lambda(lam), dense, rtol=1e-9, atol=0)
    assert torch.allclose(sde.t_from_edm_sigma(sde.edm_sigma(dense)), dense, rtol=1e-9, atol=0)
    # log σ̃ is linear in the fractional timestep between two table entries (k-diffusion's interpolation)
    mid = (torch.arange(10, 20, dtype=torch.float64) + 1.5) / 1000
    log_sig = torch.log(sde.edm_sigma(mid))
    ends = torch.log(sde.edm_sigma(torch.stack([mid - 0.5e-3, mid + 0.5e-3])))
    assert torch.allclose(log_sig, ends.mean(0), rtol=1e-12)
    # the network label a diffusers UNet gets by default is this timestep
    assert default_time_input(sde) == sde.timestep


def test_sde_coefficients_are_consistent_with_alpha_bar():
    sde = fastsde.VPSDE.from_diffusers_scheduler(_scheduler("squaredcos_cap_v2"))
    t = torch.tensor([2e-4, 5e-4, 0.0105, 0.3335, 0.5005, 0.9985], dtype=torch.float64)  # inside segments
    h = 1e-7
    dlog_ab = (2 * sde.log_alpha(t + h) - 2 * sde.log_alpha(t - h)) / (2 * h)
    assert torch.allclose(sde.diffusion(t) ** 2, -dlog_ab, rtol=1e-6)
    assert torch.allclose(sde.drift_coeff(t), 0.5 * dlog_ab, rtol=1e-6)
    assert (sde.diffusion(_timesteps(1000)) > 0).all()


def test_config_and_name_round_trip():
    sde = fastsde.VPSDE.from_betas(torch.linspace(1e-4, 0.02, 50))
    assert process_name(sde) == "vp_discrete" and sde.default_t_end == pytest.approx(1 / 50)
    back = sde_from_config(json.loads(json.dumps(sde.config())))
    assert isinstance(back, DiscreteVPSDE) and torch.equal(back.alphas_cumprod, sde.alphas_cumprod)
    again = process_by_name("vp_discrete", **sde._params())
    assert torch.equal(again.alphas_cumprod, sde.alphas_cumprod)
    assert "N=50" in repr(sde)
    with pytest.raises(ValueError, match="needs its schedule"):
        process_by_name("vp_discrete")


@pytest.mark.parametrize(
    "table, message",
    [
        ([0.9, 0.95, 0.5], "strictly decreasing"),
        ([0.9, 0.5, 0.0], r"\(0, 1\)"),
        ([0.9], "at least 2"),
        ([[0.9, 0.5]], "1-D"),
        ([0.9, float("nan")], "finite"),
    ],
)
def test_bad_tables_are_clear_errors(table, message):
    with pytest.raises(ValueError, match=message):
        fastsde.VPSDE.from_alphas_cumprod(table)


def test_bad_betas_and_scheduler_are_clear_errors():
    with pytest.raises(ValueError, match=r"betas must all lie in \(0, 1\)"):
        fastsde.VPSDE.from_betas([0.1, 1.0])
    with pytest.raises(ValueError, match="neither alphas_cumprod nor betas"):
        fastsde.VPSDE.from_diffusers_scheduler(object())


@pytest.mark.parametrize(
    "kind, solver",
    [
        ("linear", "dpmpp_2m"),
        ("linear", "em"),
        ("linear", "adaptive_sde_dpm_2m"),
        ("linear", "ddim"),
        ("linear", "ancestral"),
        ("linear", "ode"),
        ("squaredcos_cap_v2", "dpmpp_2m"),
        ("squaredcos_cap_v2", "adaptive_sde_dpm_2m"),
        ("scaled_linear", "dpmpp_2m_sde"),
    ],
)
def test_solvers_sample_the_exact_mixture(kind, solver):
    sde = fastsde.VPSDE.from_diffusers_scheduler(_scheduler(kind))
    gm = fastsde.problems.mixture_2d(sde)
    steps = {"em": 200, "ancestral": 200}.get(solver)
    opts = {"steps": steps} if steps else {}
    res = fastsde.sample(gm.score, sde, (512, 2), solver=solver, seed=0, **opts)
    x = res.samples
    assert torch.isfinite(x).all()
    ref = gm.sample(20000, generator=torch.Generator().manual_seed(1))
    assert (x.mean(0) - ref.mean(0)).abs().max() < 0.12
    assert (x.std(0) - ref.std(0)).abs().max() < 0.1


@pytest.mark.parametrize("solver", sorted(fastsde.SOLVERS))
def test_every_solver_runs_on_a_discrete_process(solver):
    sde = fastsde.VPSDE.from_diffusers_scheduler(_scheduler("linear"))
    gm = fastsde.problems.mixture_2d(sde)
    opts = {"steps": 30} if "steps" in fastsde.SOLVERS[solver].options else {}
    res = fastsde.sample(gm.score, sde, (32, 2), solver=solver, seed=0, **opts)
    assert torch.isfinite(res.samples).all() and res.samples.shape == (32, 2)

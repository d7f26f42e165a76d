"""fastsde.diffusers.FastSDEScheduler inside diffusers pipelines: equal to diffusers' own schedulers where
the methods coincide, equal to fastsde.sample always, per-sample keyed noise, clean errors.

The network is a tiny UNet2DModel whose output is the exact noise prediction of N(0, 0.25·I) data plus a
small random UNet term, so that images are not saturated and a wrong coefficient shows."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers_models import DATA_VAR, GaussianUNet, tiny_unet

import fastsde
from fastsde.diffusers import FastSDEScheduler
from fastsde.score import DiffusersUNetScore

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def unet() -> GaussianUNet:
    return tiny_unet()


def run(pipe, steps: int, n: int = 3, seed: int = 1, **kw) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(seed)
    return pipe(batch_size=n, num_inference_steps=steps, generator=gen, output_type="np", **kw).images


def test_ddim_solver_gives_ddim_schedulers_images(unet):
    # diffusers' DDIM moves from timestep t to t − N // n, which is its next timestep for "leading" and
    # "trailing" spacing (with N / n whole) but not for "linspace" (999 → 899, then evaluated at 888)
    for spacing, offset in (("leading", 0), ("leading", 1), ("trailing", 0)):
        ddim = DDIMScheduler(clip_sample=False, timestep_spacing=spacing, steps_offset=offset)
        pipe = DDIMPipeline(unet, ddim)
        ref = run(pipe, 10)
        ref_timesteps = pipe.scheduler.timesteps.clone()
        pipe.scheduler = FastSDEScheduler.from_config(ddim.config, solver="ddim")
        got = run(pipe, 10)
        assert torch.equal(pipe.scheduler.timesteps, ref_timesteps), spacing
        assert np.abs(ref - got).max() < 2e-5, (spacing, offset, np.abs(ref - got).max())
        assert 0.05 < ref.std()  # not saturated: a wrong coefficient would show
        assert pipe.scheduler.result.nfe == 10.0


def test_dpmpp_2m_gives_dpmsolver_multistep_images(unet):
    for steps in (5, 6, 10, 16, 20):  # below and above diffusers' 15-step lower-order rule
        dpm = DPMSolverMultistepScheduler()
        pipe = DDPMPipeline(unet, dpm)
        ref = run(pipe, steps)
        pipe.scheduler = FastSDEScheduler.from_config(dpm.config, solver="dpmpp_2m")
        got = run(pipe, steps)
        assert torch.equal(pipe.scheduler.timesteps, dpm.timesteps)
        assert np.abs(ref - got).max() < 5e-6, (steps, np.abs(ref - got).max())


def loop(scheduler, steps: int, x: torch.Tensor, net) -> torch.Tensor:
    """A pipeline's denoising loop without a pipeline (for schedulers whose step takes no generator)."""
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, t).sample, t, x).prev_sample
    return x


def test_unipc_gives_unipc_multistep_samples(unet):
    x_t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for steps in (5, 6, 10, 16, 20):
        uni = UniPCMultistepScheduler()
        ref = loop(uni, steps, x_t, unet)
        got = loop(FastSDEScheduler.from_config(uni.config, solver="unipc"), steps, x_t, unet)
        assert (ref - got).abs().max() < 5e-6, (steps, (ref - got).abs().max())


@pytest.mark.parametrize("solver", ["heun", "unipc", "dpmpp_2m_sde", "er_sde", "pc", "ode_corrector", "lms"])
def test_pipeline_samples_equal_fastsde_sample(unet, solver):
    """Inside a pipeline the solve is fastsde.sample's: same network, grid, seed, samples."""
    sched = FastSDEScheduler.from_config(DPMSolverMultistepScheduler().config, solver=solver, seed=5)
    pipe = DDPMPipeline(unet, sched)
    pipe.set_progress_bar_config(disable=True)
    x_t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    sched.set_timesteps(6)
    x = x_t
    for t in sched.timesteps:
        x = sched.step(unet(x, t).sample, t, x).prev_sample
    res = sched.result
    assert res.nfe == len(sched.timesteps)
    grid = sched._plan["grid"]
    score = DiffusersUNetScore(unet, sched.sde, "epsilon")
    ref = fastsde.sample(score, sched.sde, (3, 1, 8, 8), solver, seed=5, x_init=x_t, x_init_noised=True,
                         t_end=0, grid=grid, steps=6)  # fmt: skip
    assert torch.allclose(x, ref.samples, atol=1e-6, rtol=0)
    assert ref.nfe == res.nfe


def test_multi_evaluation_solver_lists_every_evaluation(unet):
    sched = FastSDEScheduler(solver="heun")
    sched.set_timesteps(5)
    # heun: two evaluations per move (4 moves) and the final denoise
    assert len(sched.timesteps) == 9
    assert sched.timesteps.dtype == torch.int64


def test_set_timesteps_ends_a_solve_in_flight(unet):
    sched = FastSDEScheduler(solver="dpmpp_2m")
    x_t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def loop(stop=None):
        sched.set_timesteps(8)
        x = x_t
        for i, t in enumerate(sched.timesteps):
            if i == stop:
                return None
            x = sched.step(unet(x, t).sample, t, x).prev_sample
        return x

    first = loop()
    loop(stop=3)  # abandoned half-way: its history must not leak into the next call
    again = loop()
    assert torch.equal(first, again)


def test_stochastic_solver_noise_from_generators_is_keyed_per_sample(unet):
    cfg = DPMSolverMultistepScheduler().config
    pipe = DDPMPipeline(unet, FastSDEScheduler.from_config(cfg, solver="dpmpp_2m_sde"))
    gens = [torch.Generator().manual_seed(s) for s in (11, 12, 13)]
    pipe.set_progress_bar_config(disable=True)
    x_t = torch.cat([torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3)])

    def solve(rows):
        s = pipe.scheduler
        s.set_timesteps(6)
        x = x_t[rows]
        g = [torch.Generator().manual_seed(11 + r) for r in rows]
        for t in s.timesteps:
            x = s.step(unet(x, t).sample, t, x, generator=g).prev_sample
        return x

    both = solve([0, 1, 2])
    alone = solve([2])
    assert torch.allclose(both[2:], alone, atol=1e-6, rtol=0)
    again = solve([0, 1, 2])
    assert torch.equal(both, again)
    assert len(gens) == 3


def test_prediction_types_agree(unet):
    images = {}
    for prediction in ("epsilon", "sample", "v_prediction"):
        net = tiny_unet(prediction)
        dpm = DPMSolverMultistepScheduler(prediction_type=prediction)
        pipe = DDPMPipeline(net, FastSDEScheduler.from_config(dpm.config, solver="unipc"))
        images[prediction] = run(pipe, 8)
    assert np.abs(images["epsilon"] - images["sample"]).max() < 1e-3
    assert np.abs(images["epsilon"] - images["v_prediction"]).max() < 1e-3


def flow_velocity(x, timestep):
    """The exact v = ε − x0 of N(0, 0.25) data at σ = timestep / 1000 (diffusers' flow timesteps)."""
    s = (torch.as_tensor(timestep, dtype=x.dtype) / 1000).reshape(-1, *([1] * (x.dim() - 1)))
    m = 1 - s
    var = m * m * DATA_VAR + s * s
    return (s - m * DATA_VAR) * x / var


def test_flow_matching_euler_gives_flowmatch_euler_samples():
    x_t = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for shift in (1.0, 3.0):
        cfg = FlowMatchEulerDiscreteScheduler(shift=shift).config
        sched = FastSDEScheduler.from_config(cfg, solver="euler")
        assert sched.config.process == "flow" and sched.config.prediction_type == "flow_prediction"
        for steps in (4, 8, 28):
            ref_sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
            ref = loop(ref_sched, steps, x_t, lambda x, t: UNet2DOutput(sample=flow_velocity(x, t)))
            got = loop(sched, steps, x_t, lambda x, t: UNet2DOutput(sample=flow_velocity(x, t)))
            assert torch.allclose(sched.timesteps, ref_sched.timesteps[: len(sched.timesteps)])
            assert (ref - got).abs().max() < 1e-6, (shift, steps, (ref - got).abs().max())


def test_flow_matching_solver_equals_fastsde_sample():
    sched = FastSDEScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, solver="dpmpp_2m")
    x_t = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = loop(sched, 8, x_t, lambda x, t: UNet2DOutput(sample=flow_velocity(x, t)))
    score = fastsde.VelocityScore(flow_velocity, sched.sde, time_input="timestep")
    grid = sched._plan["grid"]
    ref = fastsde.sample(score, sched.sde, tuple(x_t.shape), "dpmpp_2m", x_init=x_t, dtype=torch.float64,
                         steps=8, grid=grid, t_end=0)  # fmt: skip
    assert torch.allclose(got, ref.samples, atol=1e-6, rtol=0)  # the pipeline's timesteps are float32


def test_save_and_load_keep_solver_and_options(tmp_path):
    sched = FastSDEScheduler.from_config(
        DDIMScheduler(clip_sample=False).config, solver="unipc", solver_options={"order": 2}
    )
    sched.save_pretrained(tmp_path)
    back = FastSDEScheduler.from_pretrained(tmp_path)
    assert back.config.solver == "unipc" and dict(back.config.solver_options) == {"order": 2}
    assert back.config.timestep_rule == "ddim" and back.config.timestep_spacing == "leading"
    back.set_timesteps(7)
    sched.set_timesteps(7)
    assert torch.equal(back.timesteps, sched.timesteps)


def test_fitted_grid_needs_and_checks_the_model(unet):
    sde = fastsde.VPSDE.from_diffusers_scheduler(DDIMScheduler())
    score = DiffusersUNetScore(unet, sde)
    grid = fastsde.fit_grid(
        score, sde, solver="dpmpp_2m", steps=4, n=8, seed=0, shape=(1, 8, 8), M=12, refine=False, dtype=torch.float32
    )
    sched = FastSDEScheduler(solver="dpmpp_2m", grid=grid)
    sched.set_timesteps(4)
    x = torch.randn(2, 1, 8, 8)
    t = sched.timesteps[0]
    with pytest.raises(ValueError, match="model="):
        sched.step(unet(x, t).sample, t, x)
    sched = FastSDEScheduler(solver="dpmpp_2m", grid=grid, model=unet)
    sched.set_timesteps(4)
    assert len(sched.timesteps) == 4
    for t in sched.timesteps:
        x = sched.step(unet(x, t).sample, t, x).prev_sample
    assert torch.isfinite(x).all()
    other = tiny_unet()
    with torch.no_grad():
        other.conv_out.weight.add_(1.0)
    sched = FastSDEScheduler(solver="dpmpp_2m", grid=grid, model=other)
    sched.set_timesteps(4)
    x = torch.randn(2, 1, 8, 8)
    t = sched.timesteps[0]
    with pytest.raises(ValueError, match="does not match"):
        sched.step(other(x, t).sample, t, x)


def test_image_to_image_begins_part_way(unet):
    """An img2img pipeline's protocol: set_timesteps, set_begin_index, add_noise at the first kept timestep."""
    sched = FastSDEScheduler(solver="dpmpp_2m")
    sched.set_timesteps(10)
    sched.set_begin_index(4)
    x0 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 0.5
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    x = x_start = sched.add_noise(x0, noise, sched.timesteps[4:5])
    for t in sched.timesteps[4:]:
        x = sched.step(unet(x, t).sample, t, x).prev_sample
    assert sched.result.nfe == 6
    grid = sched._plan["grid"][4:]
    ref = fastsde.sample(DiffusersUNetScore(unet, sched.sde), sched.sde, (2, 1, 8, 8), "dpmpp_2m", x_init=x_start,
                         x_init_noised=True, t_start=float(grid[0]), grid=grid, steps=6, t_end=0)  # fmt: skip
    assert torch.allclose(x, ref.samples, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="one evaluation per move"):
        FastSDEScheduler(solver="heun").set_begin_index(2)


def test_dynamic_shifting_needs_mu():
    cfg = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config
    sched = FastSDEScheduler.from_config(cfg, solver="euler")
    with pytest.raises(ValueError, match="mu="):
        sched.set_timesteps(8)
    sched.set_timesteps(8, mu=0.8)
    assert sched.sde.mu == 0.8 and len(sched.timesteps) == 8


def test_iia_table_in_the_scheduler_equals_fastsde_sample(unet):
    sde = fastsde.VPSDE.from_diffusers_scheduler(DDIMScheduler())
    score = DiffusersUNetScore(unet, sde)
    table = fastsde.fit_iia(score, sde, solver="ddim", steps=5, n=16, seed=0, shape=(1, 8, 8), dtype=torch.float32)
    sched = FastSDEScheduler(solver="iia_ddim", table=table, model=unet)
    with pytest.raises(ValueError, match="fitted for 5 steps"):
        sched.set_timesteps(6)
    sched.set_timesteps(5)
    x_t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    got = loop(sched, 5, x_t, unet)
    ref = fastsde.sample(score, sde, (2, 1, 8, 8), "iia_ddim", x_init=x_t, steps=5, table=table)
    assert torch.allclose(got, ref.samples, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"solver": "adaptive"}, "no fixed number of evaluations"),
        ({"solver": "nope"}, "solver must be one of"),
        ({"solver": "dpmpp_2m", "solver_options": {"steps": 4}}, "set by the scheduler"),
        ({"solver": "dpmpp_2m", "solver_options": {"bogus": 1}}, "unknown option"),
        ({"prediction_type": "flow_prediction"}, "does not fit"),
        ({"timestep_spacing": "odd"}, "timestep_spacing"),
    ],
)
def test_bad_configuration_is_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FastSDEScheduler(**kwargs)


def test_misuse_of_step_is_a_clear_error(unet):
    sched = FastSDEScheduler(solver="dpmpp_2m")
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(x, 999, x)
    sched.set_timesteps(5)
    with pytest.raises(ValueError, match="next evaluation is at 999"):
        sched.step(x, 500, x)
    t = sched.timesteps[0]
    y = sched.step(unet(x, t).sample, t, x).prev_sample
    t = sched.timesteps[1]
    with pytest.raises(ValueError, match="changed the sample"):
        sched.step(unet(y, t).sample, t, y + 1.0)
    with pytest.raises(ValueError, match="eta"):
        sched.step(unet(y, t).sample, t, y, eta=0.5)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(1)


def test_clip_sample_source_warns():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        FastSDEScheduler.from_config(DDIMScheduler(clip_sample=True).config, solver="ddim")
    assert any("clip" in str(w.message) for w in caught)


def test_add_noise_is_the_forward_process():
    sched = FastSDEScheduler()
    x0, noise = torch.randn(3, 2, 2), torch.randn(3, 2, 2)
    ts = torch.tensor([0, 499, 999])
    ref = DDIMScheduler().add_noise(x0, noise, ts)
    assert torch.allclose(sched.add_noise(x0, noise, ts), ref, atol=1e-6)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_pred_original_sample_is_diffusers(prediction):
    net = tiny_unet(prediction)
    ddim = DDIMScheduler(clip_sample=False, prediction_type=prediction)
    ddim.set_timesteps(5)
    sched = FastSDEScheduler.from_config(ddim.config, solver="ddim")
    sched.set_timesteps(5)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    t = sched.timesteps[0]
    out = net(x, t).sample
    want = ddim.step(out, t, x).pred_original_sample
    got = sched.step(out, t, x).pred_original_sample
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)

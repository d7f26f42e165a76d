"""Whole diffusers pipelines with fastsde: tiny random-weight pipelines built locally (no download) — an
unconditional DDPM pipeline and a Stable-Diffusion text-to-image pipeline (UNet2DConditionModel, tiny
AutoencoderKL, prompt embeddings given) — sampled with a FastSDEScheduler inside and with
``sample_pipeline`` (adaptive solvers, per-sample negative prompts): right shapes, finite, batch-size
independent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMPipeline, DDPMScheduler, PNDMScheduler, UNet2DConditionModel
from diffusers_models import tiny_unet

from fastsde.diffusers import FastSDEScheduler, sample_pipeline

torch.set_num_threads(1)
pytest.importorskip("transformers")  # diffusers' StableDiffusionPipeline class needs it (no text encoder is used)
from diffusers import StableDiffusionPipeline  # noqa: E402


@pytest.fixture(scope="module")
def sd_pipe() -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2,
    ).eval()  # fmt: skip
    with torch.no_grad():  # a small output: the random network stays a tame ε-model
        unet.conv_out.weight.mul_(0.05)
        unet.conv_out.bias.zero_()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), norm_num_groups=4,
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    ).eval()  # fmt: skip
    sched = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True,
                          steps_offset=1)  # fmt: skip
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeds(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 5, 16, generator=torch.Generator().manual_seed(seed))


def test_text_to_image_with_the_scheduler_inside(sd_pipe):
    cfg = sd_pipe.scheduler.config
    sd_pipe.scheduler = FastSDEScheduler.from_config(cfg, solver="unipc")
    try:
        lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        out = sd_pipe(prompt_embeds=embeds(2, 1), negative_prompt_embeds=embeds(2, 2), num_inference_steps=5,
                      guidance_scale=3.0, output_type="np", height=16, width=16, latents=lat)  # fmt: skip
        assert out.images.shape == (2, 16, 16, 3) and np.isfinite(out.images).all()
        assert sd_pipe.scheduler.result.nfe == 5
        # the same solve by sample_pipeline (CFG as fastsde's score, the same grid) gives the same images
        grid = sd_pipe.scheduler._plan["grid"]
        res = sample_pipeline(sd_pipe, "unipc", prompt_embeds=embeds(2, 1), negative_prompt_embeds=embeds(2, 2),
                              guidance_scale=3.0, output_type="np", height=16, width=16, latents=lat,
                              steps=5, grid=grid, t_end=0, t_start=float(grid[0]), x_init_noised=True)  # fmt: skip
        assert np.abs(res.images - out.images).max() < 1e-4
        assert res.nfe == 5 and res.network_evals == 10
    finally:
        sd_pipe.scheduler = PNDMScheduler.from_config(cfg)


@pytest.mark.parametrize("solver, options", [("adaptive_dpmpp_3m", {"eps_rel": 0.05}), ("dpmpp_2m", {"steps": 6})])
def test_text_to_image_with_any_solver_per_sample_negatives_and_batch_independence(sd_pipe, solver, options):
    pos, neg = embeds(3, 1), embeds(3, 2)  # one negative prompt per image
    kw = dict(guidance_scale=4.0, output_type="np", height=16, width=16, seed=[7, 8, 9], **options)
    both = sample_pipeline(sd_pipe, solver, prompt_embeds=pos, negative_prompt_embeds=neg, **kw)
    assert both.images.shape == (3, 16, 16, 3) and np.isfinite(both.images).all()
    assert both.network_evals == 2 * both.nfe
    kw["seed"] = [9]
    alone = sample_pipeline(sd_pipe, solver, prompt_embeds=pos[2:], negative_prompt_embeds=neg[2:], **kw)
    assert np.abs(both.images[2:] - alone.images).max() < 1e-4
    other = sample_pipeline(sd_pipe, solver, prompt_embeds=pos[2:], negative_prompt_embeds=neg[:1], **kw)
    assert np.abs(other.images - alone.images).max() > 1e-4  # the negative prompt matters, row by row


def test_text_to_image_needs_a_prompt(sd_pipe):
    with pytest.raises(ValueError, match="prompt"):
        sample_pipeline(sd_pipe, "dpmpp_2m", steps=4)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        sample_pipeline(sd_pipe, "dpmpp_2m", steps=4, prompt_embeds=embeds(1, 0))


def test_unconditional_pipeline_with_an_adaptive_solver():
    pipe = DDPMPipeline(tiny_unet(), DDPMScheduler())
    res = sample_pipeline(pipe, "adaptive_sde_dpm_2m", batch_size=3, seed=[1, 2, 3], output_type="np")
    assert res.images.shape == (3, 8, 8, 1) and np.isfinite(res.images).all()
    alone = sample_pipeline(pipe, "adaptive_sde_dpm_2m", batch_size=1, seed=[3], output_type="np")
    assert np.abs(res.images[2:] - alone.images).max() < 1e-3
    assert res.result.config()["solver"] == "adaptive_sde_dpm_2m"
    with pytest.raises(ValueError, match="batch_size"):
        sample_pipeline(pipe, "dpmpp_2m", batch_size=0)

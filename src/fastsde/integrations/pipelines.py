"""Whole diffusers pipelines sampled by any fastsde solver (adaptive ones and compaction included).

A pipeline's own loop asks its scheduler for a fixed list of timesteps, which an adaptive solver does not
have; here the pipeline is taken apart instead: its network becomes a fastsde score (with the pipeline's
classifier-free guidance as :class:`~fastsde.guidance.CFGScore`, per-sample prompts and negative prompts
following the rows), ``fastsde.sample`` solves, and the pipeline's own decoder and post-processing
make the images.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..api import DEFAULT_SOLVER, SampleResult, sample
from ..guidance import CFGScore
from ..score import DiffusersUNetScore
from ..sde import SDE, VPSDE, RectifiedFlow

__all__ = ["PipelineResult", "sample_pipeline"]


@dataclass
class PipelineResult:
    """A pipeline sampled by fastsde: ``images`` as the pipeline returns them (its ``output_type``),
    ``output`` the pipeline's usual output object, ``result`` fastsde's accounting (``result.nfe``,
    ``result.network_evals``, ``result.config()``)."""

    images: Any
    output: Any
    result: SampleResult

    @property
    def nfe(self) -> float:
        return self.result.nfe

    @property
    def network_evals(self) -> float:
        return float(self.result.network_evals if self.result.network_evals is not None else self.result.nfe)


def pipeline_process(pipe: Any) -> tuple[SDE, str]:
    """The process and prediction type of a pipeline's scheduler (a FastSDEScheduler's own process)."""
    sched = getattr(pipe, "scheduler", None)
    if sched is None:
        raise ValueError(f"{type(pipe).__name__} has no scheduler to read the process from")
    own = getattr(sched, "sde", None)
    if isinstance(own, SDE):
        return own, sched.config.prediction_type
    if type(sched).__name__.startswith("FlowMatch"):
        return RectifiedFlow.from_diffusers_scheduler(sched), "flow_prediction"
    return VPSDE.from_diffusers_scheduler(sched), getattr(sched.config, "prediction_type", "epsilon")


def _size(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value), int(value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ValueError(f"{name} must be an int or (height, width), got {value!r}")


def sample_pipeline(
    pipe: Any,
    solver: str = DEFAULT_SOLVER,
    seed: int | list[int] = 0,
    *,
    batch_size: int = 1,
    prompt: str | list[str] | None = None,
    negative_prompt: str | list[str] | None = None,
    prompt_embeds: Tensor | None = None,
    negative_prompt_embeds: Tensor | None = None,
    guidance_scale: float = 7.5,
    num_images_per_prompt: int = 1,
    height: int | None = None,
    width: int | None = None,
    latents: Tensor | None = None,
    cond: dict[str, Tensor] | None = None,
    output_type: str = "pil",
    progress: bool = False,
    **options: Any,
) -> PipelineResult:
    """Sample a diffusers pipeline with a fastsde solver.

    Unconditional image pipelines (``DDPMPipeline``, ``DDIMPipeline``: a ``UNet2DModel``): ``batch_size``
    images, ``cond=`` per-sample keywords for the UNet (e.g. ``class_labels``). Text-to-image pipelines
    (``StableDiffusionPipeline`` and those with the same ``encode_prompt`` / ``vae`` / ``unet``):
    ``prompt`` or ``prompt_embeds``, ``negative_prompt`` / ``negative_prompt_embeds`` (one per image
    allowed), ``guidance_scale`` (classifier-free guidance when > 1; 2 network evaluations per NFE),
    ``height`` / ``width``, ``latents`` (the starting state). ``solver``, ``seed`` and ``options`` are
    ``fastsde.sample``'s (``steps=``, ``eps_rel=``, ...). The safety checker is not run.
    """
    if not hasattr(pipe, "unet"):
        raise ValueError(
            f"{type(pipe).__name__} has no unet: sample_pipeline takes UNet pipelines (DDPM, DDIM, Stable Diffusion)"
        )
    sde, prediction_type = pipeline_process(pipe)
    unet = pipe.unet
    device = unet.device
    if hasattr(pipe, "vae") and hasattr(pipe, "encode_prompt"):
        request = TextToImage(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, guidance_scale, num_images_per_prompt,
            height, width, latents, cond, output_type,
        )  # fmt: skip
        return _text_to_image(
            pipe, sde, prediction_type, request, dict(solver=solver, seed=seed, progress=progress, **options)
        )
    if prompt is not None or prompt_embeds is not None:
        raise ValueError(f"{type(pipe).__name__} takes no prompt (an unconditional pipeline)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    h, w = _size(unet.config.sample_size, "unet.config.sample_size")
    shape = (int(batch_size), unet.config.in_channels, h, w)
    score = DiffusersUNetScore(unet, sde, prediction_type)
    res = sample(
        score, sde, shape, solver, seed, device=device, x_init=latents, cond=cond, progress=progress, **options
    )
    from diffusers import ImagePipelineOutput

    image = (res.samples / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "pil":
        image = pipe.numpy_to_pil(image)
    elif output_type == "pt":
        image = (res.samples / 2 + 0.5).clamp(0, 1)
    elif output_type != "np":
        raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
    return PipelineResult(images=image, output=ImagePipelineOutput(images=image), result=res)


@dataclass
class TextToImage:
    """What a text-to-image call asks for (see :func:`sample_pipeline`)."""

    prompt: Any
    negative_prompt: Any
    prompt_embeds: Tensor | None
    negative_prompt_embeds: Tensor | None
    guidance_scale: float
    num_images_per_prompt: int
    height: int | None
    width: int | None
    latents: Tensor | None
    cond: dict[str, Tensor] | None
    output_type: str


def _text_to_image(pipe: Any, sde: SDE, prediction_type: str, r: TextToImage, run: dict[str, Any]) -> PipelineResult:
    """A Stable-Diffusion-style pipeline: its prompt encoding, CFG as a fastsde score, its VAE decode."""
    if r.prompt is None and r.prompt_embeds is None:
        raise ValueError("give prompt= or prompt_embeds=")
    if isinstance(r.guidance_scale, bool) or not isinstance(r.guidance_scale, numbers.Real):
        raise ValueError(f"guidance_scale must be a number, got {r.guidance_scale!r}")
    guided = r.guidance_scale > 1.0
    if guided and r.negative_prompt_embeds is None and getattr(pipe, "tokenizer", None) is None:
        raise ValueError("this pipeline has no tokenizer: give negative_prompt_embeds= with guidance_scale > 1")
    unet, device = pipe.unet, pipe.unet.device
    embeds, negative = pipe.encode_prompt(
        r.prompt, device, r.num_images_per_prompt, guided, r.negative_prompt,
        prompt_embeds=r.prompt_embeds, negative_prompt_embeds=r.negative_prompt_embeds,
    )  # fmt: skip
    n = embeds.shape[0]
    scale = pipe.vae_scale_factor
    height = r.height or unet.config.sample_size * scale
    width = r.width or unet.config.sample_size * scale
    if height % scale or width % scale:
        raise ValueError(
            f"height and width must be multiples of {scale} (the VAE's scale factor), got {height} × {width}"
        )
    shape = (n, unet.config.in_channels, height // scale, width // scale)
    rows = {"encoder_hidden_states": embeds, **(r.cond or {})}
    score: Any = DiffusersUNetScore(unet, sde, prediction_type)
    if guided:
        score = CFGScore(score, float(r.guidance_scale), {"encoder_hidden_states": negative}, sde=sde)
    latents = None if r.latents is None else r.latents.to(device)
    res = sample(score, sde, shape, device=device, x_init=latents, cond=rows, **run)
    vae = pipe.vae
    x = res.samples.to(vae.dtype) / vae.config.scaling_factor
    with torch.no_grad():
        image = vae.decode(x, return_dict=False)[0]
    image = pipe.image_processor.postprocess(image, output_type=r.output_type, do_denormalize=[True] * n)
    from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

    return PipelineResult(
        images=image, output=StableDiffusionPipelineOutput(images=image, nsfw_content_detected=None), result=res
    )

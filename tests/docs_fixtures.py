"""Offline stand-ins for the documentation's code blocks (tests/test_docs.py): what a page's
``<!-- docs-test-setup: ... -->`` comment may call so that its visible code runs as written, with
nothing downloaded."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["offline_hub", "tiny_flow_pipeline", "ddpm_digits_folder", "restore"]


def offline_hub(size: int = 8, channels: int = 3) -> None:
    """Make ``from_pretrained`` of diffusers' DDPM / DDIM pipelines, ``DiffusionPipeline`` and
    ``UNet2DModel`` build a tiny local model (a UNet near the exact score of N(0, 0.25·I) data, with
    the scheduler the name would bring), whatever name is asked for. Nothing is downloaded."""
    from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel
    from diffusers_models import tiny_unet

    def unet() -> UNet2DModel:
        net = tiny_unet(channels=channels)
        net.config.sample_size = size
        return net

    def pipeline(cls: type, name: Any = None, **kwargs: Any):
        target = DDPMPipeline if cls in (DiffusionPipeline, DDPMPipeline) else cls
        return target(unet(), DDPMScheduler())

    for cls in (DDPMPipeline, DDIMPipeline, DiffusionPipeline):
        _patch(cls, "from_pretrained", classmethod(pipeline))
    _patch(UNet2DModel, "from_pretrained", classmethod(lambda cls, name=None, **kw: unet()))


#: (owner, attribute, original value) of every attribute a stand-in replaced; ``restore`` puts them back
_PATCHED: list[tuple[Any, str, Any]] = []


def _patch(owner: Any, name: str, value: Any) -> None:
    _PATCHED.append((owner, name, owner.__dict__.get(name)))
    setattr(owner, name, value)  # noqa: B010 - the attribute is named in a variable of the caller


def restore() -> None:
    """Undo every patch of this module (tests/test_docs.py calls it after each page)."""
    while _PATCHED:
        owner, name, original = _PATCHED.pop()
        if original is None:
            delattr(owner, name)
        else:
            setattr(owner, name, original)


def tiny_flow_pipeline() -> Any:
    """A stand-in for a flow-matching network: velocity v(x, σ) exact for N(0, 0.25·I) data."""

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        var = (1 - s) ** 2 * 0.25 + s**2
        return (s - (1 - s) * 0.25) * x / var

    return velocity


def ddpm_digits_folder(path: str = "ddpm-digits") -> str:
    """Write a diffusers ``save_pretrained`` folder (``config.json``, ``diffusion_pytorch_model.safetensors``,
    ``scheduler_config.json``) holding the shipped ``digits`` UNet with a default ``DDPMScheduler`` config: a
    stand-in for a user's DDPM checkpoint on disk. The UNet was trained on ``VPSDE(0.1, 20)`` with the label
    999·t; DDPM's linear β table and fractional timesteps are close to that, so its samples are digits too."""
    from diffusers import DDPMScheduler

    import fastsde

    fastsde.load_model("digits").network.unet.save_pretrained(path)
    DDPMScheduler().save_pretrained(path)
    return path

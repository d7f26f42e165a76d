"""Tiny diffusers networks with known outputs for the integration tests (no download)."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput

DATA_VAR = 0.25


class GaussianUNet(UNet2DModel):
    """ε̂(x, i) = σ_i·x/(ᾱ_i·0.25 + σ_i²) (exact for N(0, 0.25) data) + 0.02·UNet(x, i); v / x0 on request."""

    def setup(self, alphas_cumprod: torch.Tensor, prediction: str = "epsilon") -> GaussianUNet:
        self.table = alphas_cumprod.to(torch.float64)
        self.prediction = prediction
        return self

    def forward(self, sample, timestep, class_labels=None, return_dict=True):  # noqa: D401
        ts = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1)
        n = self.table.numel()
        pos = ts.clamp(0, n - 1)
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=n - 1)
        frac = pos - lo
        log_snr = (1 - frac) * (self.table[lo] / (1 - self.table[lo])).log() + frac * (
            self.table[hi] / (1 - self.table[hi])
        ).log()
        a2 = torch.sigmoid(log_snr).to(sample.dtype).expand(sample.shape[0]).reshape(-1, 1, 1, 1)
        m, s = a2.sqrt(), (1 - a2).sqrt()
        eps = s * sample / (a2 * DATA_VAR + s * s) + 0.02 * super().forward(sample, timestep).sample
        if self.prediction == "epsilon":
            out = eps
        elif self.prediction == "sample":
            out = (sample - s * eps) / m
        else:  # v = m ε − σ x0
            out = m * eps - s * (sample - s * eps) / m
        return UNet2DOutput(sample=out) if return_dict else (out,)


def tiny_unet(prediction: str = "epsilon", channels: int = 1) -> GaussianUNet:
    torch.manual_seed(0)
    unet = GaussianUNet(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()
    return unet.setup(DDIMScheduler().alphas_cumprod, prediction)

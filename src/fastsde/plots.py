"""Pictures of samples: a grid of digit images and a 2-D scatter over the true mixture density."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["image_grid", "save_image_grid", "save_mixture_scatter"]


def image_grid(samples: Tensor, ncol: int | None = None, scale: int = 6, pad: int = 1) -> np.ndarray:
    """Samples (n, C, H, W) in [−1, 1] as one array (rows·(H+pad)·scale, cols·(W+pad)·scale[, 3]) in [0, 1].

    Each pixel is repeated ``scale`` times so that 8×8 digits are readable; cells are separated by a
    light padding.
    """
    x = samples.detach().double().cpu().clamp(-1, 1)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"image samples must be (n, 1 or 3, H, W), got {tuple(samples.shape)}")
    n, c, h, w = x.shape
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = math.ceil(n / ncol)
    arr = ((x + 1.0) / 2.0).numpy().transpose(0, 2, 3, 1)  # n, h, w, c in [0, 1]
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 0.5)
    for i in range(n):
        r, col = divmod(i, ncol)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[y0 : y0 + h, x0 : x0 + w] = arr[i]
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    return grid[..., 0] if c == 1 else grid


def save_image_grid(samples: Tensor, path: str | Path, ncol: int | None = None, scale: int = 6) -> None:
    """Write a PNG grid of image samples (ink dark on a white background for one channel)."""
    import matplotlib.image as mpimg

    grid = image_grid(samples, ncol=ncol, scale=scale)
    if grid.ndim == 2:
        mpimg.imsave(str(path), 1.0 - grid, cmap="gray", vmin=0.0, vmax=1.0)
    else:
        mpimg.imsave(str(path), grid)


def save_mixture_scatter(samples: Tensor, mixture, path: str | Path, title: str = "") -> None:
    """Scatter 2-D samples over contours of the exact mixture density at t = 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = samples.detach().double().cpu().reshape(samples.shape[0], -1).numpy()
    if pts.shape[1] != 2:
        raise ValueError(f"a mixture scatter needs 2-D samples, got {pts.shape[1]} dimensions")
    finite = np.isfinite(pts).all(1)
    means = mixture.means.reshape(-1, 2).numpy()
    stds = mixture.stds.reshape(-1, 2).numpy()
    lo, hi = (means - 4 * stds).min(0), (means + 4 * stds).max(0)
    if finite.any():
        lo = np.minimum(lo, np.quantile(pts[finite], 0.005, axis=0))
        hi = np.maximum(hi, np.quantile(pts[finite], 0.995, axis=0))
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 300), np.linspace(lo[1], hi[1], 300))
    grid = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], 1))
    logp = mixture.log_prob(grid, 0.0).reshape(gx.shape).numpy()
    top = float(logp.max())
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.contour(gx, gy, logp, levels=np.linspace(top - 9.0, top, 10), cmap="viridis", linewidths=0.8)
    ax.scatter(pts[finite, 0], pts[finite, 1], s=4, c="crimson", alpha=0.6, label=f"{int(finite.sum())} samples")
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_aspect("equal")
    ax.legend(loc="best")
    ax.set_title(title or "samples over the exact mixture density")
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)

"""Exact test problems: Gaussian mixtures whose diffused score and density are closed-form.

Used by the tests, the benchmarks and the main job before any trained model exists.
"""

from __future__ import annotations

import torch

from .score import GaussianMixture
from .sde import SDE

__all__ = ["mixture_2d", "mixture_nd"]


def mixture_2d(sde: SDE, scale: float = 1.0) -> GaussianMixture:
    """A 2-D, three-mode mixture with unequal weights and stds (data roughly in [-1, 1]·scale)."""
    means = torch.tensor([[-0.6, -0.3], [0.5, 0.5], [0.4, -0.6]], dtype=torch.float64) * scale
    stds = torch.tensor([[0.10, 0.15], [0.12, 0.08], [0.06, 0.10]], dtype=torch.float64) * scale
    return GaussianMixture([0.5, 0.3, 0.2], means, stds, sde)


def mixture_nd(sde: SDE, dim: int = 16, modes: int = 4, seed: int = 0) -> GaussianMixture:
    """A d-dimensional mixture with well-separated modes inside [-1, 1]^d (a harder benchmark)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(modes, dim, generator=g, dtype=torch.float64) * 1.2 - 0.6
    stds = 0.05 + 0.1 * torch.rand(modes, dim, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(modes, generator=g, dtype=torch.float64)
    return GaussianMixture(weights, means, stds, sde)

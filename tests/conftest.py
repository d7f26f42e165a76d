"""Shared test set-up: one thread (two threads against a busy core can be 100x slower), float64
exact mixtures under every process."""

from __future__ import annotations

import pytest
import torch

import fastsde

torch.set_num_threads(1)


def make_mixture(sde: fastsde.SDE, scale: float = 1.0) -> fastsde.GaussianMixture:
    """A 2-D, three-mode mixture with unequal weights and stds (data roughly in [-1, 1]·scale)."""
    means = torch.tensor([[-0.6, -0.3], [0.5, 0.5], [0.4, -0.6]], dtype=torch.float64) * scale
    stds = torch.tensor([[0.10, 0.15], [0.12, 0.08], [0.06, 0.10]], dtype=torch.float64) * scale
    return fastsde.GaussianMixture([0.5, 0.3, 0.2], means, stds, sde)


PROCESSES = {
    "vp": lambda: fastsde.VPSDE(),
    "subvp": lambda: fastsde.SubVPSDE(),
    "ve": lambda: fastsde.VESDE(sigma_min=0.01, sigma_max=50.0),
    "edm": lambda: fastsde.EDM(sigma_min=0.002, sigma_max=80.0),
}


@pytest.fixture(params=list(PROCESSES))
def process(request) -> fastsde.SDE:
    return PROCESSES[request.param]()

"""Shared test set-up: one thread (two threads against a busy core can be 100x slower), float64
exact mixtures under every process."""

from __future__ import annotations

import pytest
import torch

import fastsde

torch.set_num_threads(1)


make_mixture = fastsde.problems.mixture_2d


PROCESSES = {
    "vp": lambda: fastsde.VPSDE(),
    "subvp": lambda: fastsde.SubVPSDE(),
    "ve": lambda: fastsde.VESDE(sigma_min=0.01, sigma_max=50.0),
    "edm": lambda: fastsde.EDM(sigma_min=0.002, sigma_max=80.0),
}


@pytest.fixture(params=list(PROCESSES))
def process(request) -> fastsde.SDE:
    return PROCESSES[request.param]()

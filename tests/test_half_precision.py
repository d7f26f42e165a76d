"""Half-precision solves (float16 / bfloat16, as pipelines run latents on accelerators) stay finite and
near the float32 solve: per-grid coefficient tables are made in float32 and a discrete schedule's
log-SNR is looked up in float32 (bfloat16 cannot even name timestep 998 of 1000)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

import fastsde

torch.set_num_threads(1)
SOLVERS = ["ddim", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "deis", "lms", "dpmpp_2m_sde"]


def processes():
    return {
        "discrete-vp": fastsde.VPSDE.from_diffusers_scheduler(DDPMScheduler()),
        "vp": fastsde.VPSDE(),
        "edm": fastsde.EDM(),
        "flow": fastsde.RectifiedFlow(3.0),
    }


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("process", ["discrete-vp", "vp", "edm", "flow"])
def test_half_precision_solves_track_float32(dtype, process):
    sde = processes()[process]
    gm = fastsde.GaussianMixture([1.0], torch.zeros(1, 16), [0.5], sde)

    def score(x, t):  # the exact score, evaluated in float32 and returned in the run's dtype (a half network)
        return gm.score(x.double(), t.double()).to(x.dtype)

    score.data_prediction = lambda x, t: gm.data_prediction(x.double(), t.double()).to(x.dtype)
    for solver in SOLVERS:
        ref = fastsde.sample(score, sde, (64, 16), solver, seed=0, steps=10, dtype=torch.float32).samples
        got = fastsde.sample(score, sde, (64, 16), solver, seed=0, steps=10, dtype=dtype).samples
        assert got.dtype == dtype, solver
        assert torch.isfinite(got).all(), solver
        rel = float((got.float() - ref).norm() / ref.norm())
        assert rel < 0.05, (solver, rel)

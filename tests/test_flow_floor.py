"""Issue 31's exactness check at scale: every solver, run from pure noise (u = 1) on a rectified flow,
reaches the exact-sample floor of a 16-D and a 64-D Gaussian mixture (4096 samples, shift 1 and 3).

The statistic is the per-mode Fréchet distance to the exact mixture (``mixture_frechet``); its floor is
the same statistic on sets of 4096 exact draws (mean and spread over 20 sets). A solver passes when its
samples sit within ``FLOOR_SDS`` spreads of that floor — a first-order sampler with too few steps lands
tens of spreads above it (ancestral at 40 steps: 23 spreads in 16-D). The table-based solvers (IIA, ML-EM)
need a fitted table or a hierarchy and have their own flow tests in test_flow.py. Shift 3 runs in
test_flow_floor_shifted.py (a file per half, so that the two test workers share the work)."""

from __future__ import annotations

import functools

import pytest
import torch

import fastsde
from fastsde.metrics.mixture import mixture_frechet, mixture_frechet_floor
from fastsde.problems import mixture_nd

F64 = torch.float64
N = 4096
#: how many floor spreads above the floor mean a sampler may land (measured worst: 3.4, pc at 160 steps)
FLOOR_SDS = 5.0
#: solvers with their own flow tests (they need a fitted table or a model hierarchy)
OWN_TESTS = ("mlem", "iia_heun", "iia_ddim", "iia_dpmpp_2m")
SOLVERS = [name for name in fastsde.SOLVERS if name not in OWN_TESTS]


def _options(name: str) -> dict:
    """Adaptive solvers at their defaults; fixed grids on the quadratic grid, 160 points for first-order
    methods and 40 for the others."""
    spec = fastsde.SOLVERS[name]
    if spec.adaptive:
        return {}
    return {"steps": 160 if spec.stepper.order <= 1.0 else 40, "grid": "quadratic"}


@functools.cache
def _problem(shift: float, dim: int):
    sde = fastsde.RectifiedFlow(shift=shift)
    gm = mixture_nd(sde, dim=dim)
    return sde, gm, mixture_frechet_floor(gm, N, draws=20)


def check_floor(name: str, shift: float, dim: int) -> None:
    """One solver on one problem: finite samples within FLOOR_SDS spreads of the floor."""
    torch.set_num_threads(1)
    sde, gm, (floor, spread) = _problem(shift, dim)
    res = fastsde.sample(gm, sde, (N, dim), solver=name, seed=1, dtype=F64, **_options(name))
    assert torch.isfinite(res.samples).all()
    fd = mixture_frechet(res.samples, gm).value
    assert fd <= floor + FLOOR_SDS * spread, (
        f"{name} (NFE {res.nfe:g}) on the {dim}-D mixture, shift {shift}: FD {fd:.4g} is "
        f"{(fd - floor) / spread:.1f} spreads above the floor {floor:.4g} ± {spread:.2g}"
    )


@pytest.mark.parametrize("dim", [16, 64])
@pytest.mark.parametrize("name", SOLVERS)
def test_every_solver_reaches_the_exact_floor_unshifted(name, dim):
    check_floor(name, 1.0, dim)

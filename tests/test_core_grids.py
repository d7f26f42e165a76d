"""Time grids (uniform in t, EDM ρ-schedule, uniform in log-SNR, quadratic): their defining formulas,
their defaults per process and solver family, and that every fixed-step solver evaluates the score
exactly on the grid it was given."""

from __future__ import annotations

import pytest
import torch

import fastsde
from fastsde.grids import GRIDS, default_grid, time_grid
from fastsde.problems import mixture_2d

F64 = torch.float64
FIXED_STEP = sorted(name for name, spec in fastsde.SOLVERS.items() if "steps" in spec.options)


def _ends(sde: fastsde.SDE) -> tuple[float, float]:
    return sde.T, sde.default_t_end


def _equally_spaced(v: torch.Tensor) -> None:
    d = v[1:] - v[:-1]
    torch.testing.assert_close(d, torch.full_like(d, float(d.mean())), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", GRIDS)
def test_grid_is_float64_decreasing_with_exact_ends(process, kind):
    t0, t1 = _ends(process)
    g = time_grid(process, kind, 13, t0, t1)
    assert g.dtype == F64 and g.shape == (13,)
    assert float(g[0]) == t0 and float(g[-1]) == t1
    assert bool((g[1:] < g[:-1]).all())


def test_each_grid_is_uniform_in_its_variable(process):
    t0, t1 = _ends(process)
    n = 17
    _equally_spaced(time_grid(process, "uniform", n, t0, t1))
    _equally_spaced(time_grid(process, "quadratic", n, t0, t1).sqrt())
    _equally_spaced(process.log_snr(time_grid(process, "logsnr", n, t0, t1)))
    for rho in (7.0, 3.0):
        _equally_spaced(process.edm_sigma(time_grid(process, "edm", n, t0, t1, rho=rho)) ** (1.0 / rho))


def test_edm_grid_is_karras_schedule():
    """On the EDM process: t_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ (EDM eq. 5)."""
    sde = fastsde.EDM(sigma_min=0.002, sigma_max=80.0)
    n, rho = 18, 7.0
    i = torch.arange(n, dtype=F64)
    karras = (80.0 ** (1 / rho) + i / (n - 1) * (0.002 ** (1 / rho) - 80.0 ** (1 / rho))) ** rho
    torch.testing.assert_close(time_grid(sde, "edm", n, 80.0, 0.002), karras, rtol=1e-12, atol=0.0)


def test_default_grids_per_process_and_family():
    vp, ve, sub, edm = fastsde.VPSDE(), fastsde.VESDE(), fastsde.SubVPSDE(), fastsde.EDM()
    for sde in (vp, ve, sub):
        assert (default_grid(sde, "sde"), default_grid(sde, "ode"), default_grid(sde, "exp")) == (
            "uniform",
            "edm",
            "logsnr",
        )
    assert {default_grid(edm, f) for f in ("sde", "ode", "exp")} == {"edm"}
    expected = {
        "em": "uniform",
        "heun": "edm",
        "euler": "edm",
        "dpmpp_2m": "logsnr",
        "ddim": "uniform",
        "pc": "uniform",
    }
    for name, grid in expected.items():
        assert fastsde.SOLVERS[name].options["grid"].default_for(vp) == grid
        assert fastsde.SOLVERS[name].options["grid"].default_for(edm) == "edm"


@pytest.mark.parametrize("kind", GRIDS)
@pytest.mark.parametrize("solver", FIXED_STEP)
def test_fixed_step_solvers_evaluate_exactly_on_their_grid(solver, kind):
    """Every score call of a fixed-step solver is at a grid point, and every grid point is used
    (the last one by the denoise)."""
    sde = fastsde.SubVPSDE()
    gm = mixture_2d(sde)
    times: set[float] = set()

    def score(x, t):
        times.update(t.tolist())
        return gm(x, t)

    fastsde.sample(score, sde, (2, 2), solver=solver, dtype=F64, steps=6, grid=kind, rho=5.0)
    grid = time_grid(sde, kind, 6, sde.T, sde.default_t_end, rho=5.0).tolist()
    assert sorted(times, reverse=True) == pytest.approx(grid, rel=1e-12)


def test_bad_grid_arguments():
    sde = fastsde.VPSDE()
    with pytest.raises(ValueError, match=r"grid must be one of \['uniform', 'edm', 'logsnr', 'quadratic'\], got 'x'"):
        time_grid(sde, "x", 5, 1.0, 1e-3)
    with pytest.raises(ValueError, match="a grid needs at least 2 points, got 1"):
        time_grid(sde, "uniform", 1, 1.0, 1e-3)
    for rho in (0.0, -7.0):
        with pytest.raises(ValueError, match=rf"rho must be > 0, got {rho}"):
            fastsde.sample(lambda x, t: -x, sde, (2, 2), solver="heun", rho=rho)


@pytest.mark.parametrize("rho", [2.0**-8, 1e-3])
def test_a_degenerate_edm_grid_is_refused_naming_rho(rho):
    """A tiny rho overflows σ_max^(1/rho) (found by the property tests: heun with rho = 2^-8 gave NaN
    times): a ValueError naming rho, before any evaluation."""
    calls = []

    def score(x, t):
        calls.append(1)
        return -x

    with pytest.raises(ValueError, match="rho"):
        fastsde.sample(score, fastsde.EDM(), (3, 2), solver="heun", steps=6, rho=rho, seed=0)
    assert calls == []

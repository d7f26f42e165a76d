"""Issue 21, first-user reliability: what a new user runs into, each item pinned by a test that fails
on the old behaviour (NaN scores burning the budget, numpy numbers refused, silent mismatches, broken
model files breaking every model, half-written outputs, missing records)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import fastsde
from fastsde.problems import mixture_2d
from fastsde.solvers.driver import NonFiniteSolveError

# -- item 2: a NaN score stops a sample after a bounded run, and says so -------------------------

ADAPTIVE_SOLVERS = ["adaptive", "adaptive_sde_dpm", "adaptive_sde_dpm_2m", "ode", "adaptive_dpmpp_3m"]


def _nan_between(lo: float, hi: float):
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)

    def score(x, t):
        return torch.where(((t > lo) & (t < hi))[:, None], torch.nan, gm(x, t))

    return score, sde


@pytest.mark.parametrize("solver", ADAPTIVE_SOLVERS)
def test_nan_score_stops_adaptive_solvers_early_naming_nan_time_and_count(solver):
    score, sde = _nan_between(0.4, 0.6)
    calls = []

    def counted(x, t):
        calls.append(x.shape[0])
        return score(x, t)

    with pytest.raises(NonFiniteSolveError, match=r"NaN or Inf: 4 of 4 samples stopped at t = \[0\.[456]") as err:
        fastsde.sample(counted, sde, (4, 2), solver=solver, seed=0)
    assert isinstance(err.value, fastsde.NonFiniteScoreError)  # the same class fixed-step solvers raise
    assert "max_nfe" in str(err.value) and "would not help" in str(err.value)
    # bounded: a few hundred evaluations per sample at most, not the 10 000 of the budget
    assert sum(calls) / 4 < 500


def test_nan_score_partial_results_report_status_nonfinite():
    score, sde = _nan_between(0.4, 0.6)
    res = fastsde.sample(score, sde, (3, 2), solver="adaptive_sde_dpm_2m", on_budget="partial")
    assert res.stats["status"] == ["nonfinite"] * 3
    assert bool((res.stats["t_final"] >= 0.6 - 1e-6).all())


def test_a_working_score_never_trips_the_nonfinite_stop():
    sde = fastsde.VPSDE()
    res = fastsde.sample(mixture_2d(sde), sde, (16, 2), solver="adaptive", seed=0)
    assert res.stats["status"] == ["done"] * 16 and int(res.stats["nonfinite_rejections"].sum()) == 0


# -- item 5: silent garbage and silent mismatches are errors ---------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, "float32", np.float64])
def test_non_floating_dtype_is_refused(dtype):
    sde = fastsde.VPSDE()
    with pytest.raises(ValueError, match="dtype must be a floating torch dtype"):
        fastsde.sample(mixture_2d(sde), sde, (4, 2), solver="em", steps=5, dtype=dtype)


def test_denoiser_score_without_process_is_refused_under_another_process():
    def denoiser(x, sigma):
        return x / (1 + sigma[:, None] ** 2)  # exact for N(0, I) data in EDM coordinates

    with pytest.raises(ValueError, match=r"built for EDM.*without sde= assumes EDM.*sampled under VPSDE"):
        fastsde.sample(fastsde.DenoiserScore(denoiser), fastsde.VPSDE(), (4, 2), solver="em", steps=5)
    vp = fastsde.VPSDE()
    res = fastsde.sample(fastsde.DenoiserScore(denoiser, vp), vp, (2000, 2), solver="dpmpp_2m", seed=0)
    assert abs(float(res.samples.std()) - 1.0) < 0.05
    edm = fastsde.EDM()
    fastsde.sample(fastsde.DenoiserScore(denoiser), edm, (4, 2), solver="em", steps=5)  # EDM: as documented


def test_mixture_built_for_one_process_is_refused_under_another():
    gm = mixture_2d(fastsde.VPSDE())
    with pytest.raises(ValueError, match=r"built for VPSDE.*sampled under VESDE"):
        fastsde.sample(gm, fastsde.VESDE(), (4, 2), solver="em", steps=5)
    with pytest.raises(ValueError, match=r"built for VPSDE.*sampled under VPSDE"):
        fastsde.sample(gm, fastsde.VPSDE(beta_max=10.0), (4, 2), solver="em", steps=5)
    fastsde.sample(gm, fastsde.VPSDE(), (4, 2), solver="em", steps=5)  # an equal process is fine


def test_v_prediction_needs_vp():
    unet = torch.nn.Linear(1, 1)
    for sde in (fastsde.SubVPSDE(), fastsde.VESDE(), fastsde.EDM()):
        with pytest.raises(ValueError, match="v_prediction.*needs a VPSDE"):
            fastsde.DiffusersUNetScore(unet, sde, prediction_type="v_prediction")
    fastsde.DiffusersUNetScore(unet, fastsde.VPSDE(), prediction_type="v_prediction")


# -- item 6: numbers as people pass them -----------------------------------------------------------


def test_numpy_numbers_are_accepted_like_python_numbers():
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)
    want = fastsde.sample(gm, sde, (8, 2), solver="em", steps=10, seed=3, t_end=1e-3)
    got = fastsde.sample(
        gm, sde, (np.int64(8), np.int32(2)), solver="em", steps=np.int64(10), seed=np.int64(3), t_end=np.float32(1e-3)
    )
    assert got.samples.shape == (8, 2)
    # t_end given as float32 is float32's nearest value of 1e-3, so the last step differs in the last bits
    torch.testing.assert_close(got.samples, want.samples, rtol=0, atol=1e-5)
    res = fastsde.sample(gm, sde, (4, 2), solver="adaptive", eps_rel=np.float32(0.05), max_nfe=np.int16(500))
    assert res.options["eps_rel"] == pytest.approx(0.05) and type(res.options["max_nfe"]) is int
    seeds = fastsde.sample(gm, sde, (2, 2), solver="em", steps=5, seed=np.array([5, 9]))
    assert torch.equal(seeds.samples, fastsde.sample(gm, sde, (2, 2), solver="em", steps=5, seed=[5, 9]).samples)


@pytest.mark.parametrize("seed", [-1, 2**64, [0, -5], True, 1.5, "3", np.float64(2.0)])
def test_seeds_outside_the_64_bit_range_or_not_integers_are_refused(seed):
    sde = fastsde.VPSDE()
    n = len(seed) if isinstance(seed, list) else 2
    with pytest.raises(ValueError, match=r"seed"):
        fastsde.sample(mixture_2d(sde), sde, (n, 2), solver="em", steps=5, seed=seed)


def test_seed_limits_are_inclusive_of_zero_and_two_to_the_64_minus_one():
    sde = fastsde.VPSDE()
    for seed in (0, 2**64 - 1):
        assert fastsde.sample(mixture_2d(sde), sde, (2, 2), solver="em", steps=5, seed=seed).samples.shape == (2, 2)


def test_load_model_accepts_dtype_names_and_refuses_others():
    model = fastsde.load_model("digits-small", dtype="float64")
    assert next(model.network.parameters()).dtype == torch.float64
    with pytest.raises(ValueError, match="dtype must be a floating dtype"):
        fastsde.load_model("digits-small", dtype="cuda")
    with pytest.raises(ValueError, match="dtype must be a floating torch dtype"):
        fastsde.load_model("digits-small", dtype=torch.int64)


# -- item 9: the record of a result ----------------------------------------------------------------


def test_config_records_seed_dtype_and_device():
    sde = fastsde.VPSDE()
    res = fastsde.sample(mixture_2d(sde), sde, (3, 2), solver="em", steps=5, seed=7, dtype=torch.float64)
    cfg = res.config()
    assert cfg["seed"] == 7 and cfg["dtype"] == "float64" and cfg["device"] == "cpu"
    assert cfg["solver"] == "em" and cfg["steps"] == 5 and cfg["sde"]["type"] == "VPSDE" and cfg["n"] == 3
    json.dumps(cfg)  # a record: JSON-ready
    listed = fastsde.sample(mixture_2d(sde), sde, (2, 2), solver="em", steps=5, seed=np.array([4, 2]))
    assert listed.config()["seed"] == [4, 2]
    src = fastsde.sample(mixture_2d(sde), sde, (2, 2), solver="em", steps=5, seed=fastsde.NoiseSource([1, 2]))
    assert src.config()["seed"] is None
    assert math.isfinite(res.nfe)

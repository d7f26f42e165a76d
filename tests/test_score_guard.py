"""The score wrapper guards the solver's state: a score that writes into its input, or returns another
dtype or device than x, is refused at its first call with an error that says what to do."""

from __future__ import annotations

import pytest
import torch

import fastsde

SDE = fastsde.VPSDE()
GM = fastsde.problems.mixture_2d(SDE)


def _in_place_x(x, t):
    out = GM.score(x, t)
    x.mul_(0.5)  # e.g. a preprocessing step written with an in-place op
    return out


def _in_place_t(x, t):
    out = GM.score(x, t)
    t.clamp_(min=0.5)
    return out


@pytest.mark.parametrize("solver", ["ddim", "heun", "dpmpp_2m", "adaptive_sde_dpm_2m", "ode", "em"])
def test_a_score_that_modifies_x_in_place_is_refused(solver):
    with pytest.raises(ValueError, match=r"modified its input x in place.*x = x\.clone\(\)"):
        fastsde.sample(_in_place_x, SDE, (4, 2), solver=solver, dtype=torch.float64)


def test_a_score_that_modifies_t_in_place_is_refused():
    with pytest.raises(ValueError, match=r"modified its input t in place"):
        fastsde.sample(_in_place_t, SDE, (4, 2), solver="ddim", steps=5, dtype=torch.float64)


def test_in_place_work_on_a_copy_is_fine():
    def score(x, t):
        y = x.clone()
        y.mul_(1.0)
        return GM.score(y, t)

    ref = fastsde.sample(GM.score, SDE, (4, 2), solver="heun", steps=5, dtype=torch.float64)
    res = fastsde.sample(score, SDE, (4, 2), solver="heun", steps=5, dtype=torch.float64)
    assert torch.equal(res.samples, ref.samples)


@pytest.mark.parametrize("out_dtype", [torch.float64, torch.int64, torch.bool, torch.float16])
def test_a_score_returning_another_dtype_is_refused(out_dtype):
    def score(x, t):
        return GM.score(x.double(), t.double()).to(out_dtype)

    name = str(out_dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=rf"x's dtype and device \(float32 on cpu\), got {name} on cpu"):
        fastsde.sample(score, SDE, (4, 2), solver="ddim", steps=5, dtype=torch.float32)


def test_a_score_returning_another_device_is_refused():
    def score(x, t):
        return torch.empty(x.shape, dtype=x.dtype, device="meta")

    with pytest.raises(ValueError, match=r"got float64 on meta"):
        fastsde.sample(score, SDE, (4, 2), solver="ddim", steps=5, dtype=torch.float64)


@pytest.mark.parametrize("solver", ["ddim", "adaptive_sde_dpm_2m"])
def test_sampling_under_inference_mode_works(solver):
    """Inference tensors keep no write counter: the guard steps aside, the samples are the usual ones."""
    kw = dict(solver=solver, dtype=torch.float64, seed=2, **({"steps": 5} if solver == "ddim" else {}))
    ref = fastsde.sample(GM.score, SDE, (4, 2), **kw)
    with torch.inference_mode():
        res = fastsde.sample(GM.score, SDE, (4, 2), **kw)
    assert torch.equal(res.samples, ref.samples)

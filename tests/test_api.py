"""The front door: the contract of fastsde.sample, its accounting, and its errors before compute."""

from __future__ import annotations

import pytest
import torch

import fastsde
from fastsde.problems import mixture_2d


def _counting(score):
    calls = []

    def wrapped(x, t):
        calls.append(x.shape[0])
        return score(x, t)

    return wrapped, calls


def test_result_fields_and_nfe_accounting():
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)
    res = fastsde.sample(gm, sde, (8, 2), solver="em", seed=0, steps=20)
    assert res.samples.shape == (8, 2) and res.samples.dtype == torch.float32
    assert res.nfe == 20.0 and res.calls == 20
    assert res.nfe_per_sample.tolist() == [20.0] * 8
    assert res.options["steps"] == 20 and res.options["t_end"] == 1e-3 and res.options["denoise"] is True
    assert res.config()["solver"] == "em" and res.options["sde"] == {"type": "VPSDE", "beta_min": 0.1, "beta_max": 20.0}
    no_denoise = fastsde.sample(gm, sde, (8, 2), solver="em", seed=0, steps=20, denoise=False)
    assert no_denoise.nfe == 19.0


def test_seed_determinism_list_of_seeds_and_float64():
    sde = fastsde.VESDE()
    gm = mixture_2d(sde)
    a = fastsde.sample(gm, sde, (6, 2), solver="em", seed=3, steps=30, dtype=torch.float64)
    b = fastsde.sample(gm, sde, (6, 2), solver="em", seed=3, steps=30, dtype=torch.float64)
    assert a.samples.dtype == torch.float64 and torch.equal(a.samples, b.samples)
    big = fastsde.sample(gm, sde, (20, 2), solver="em", seed=3, steps=30, dtype=torch.float64)
    assert torch.equal(a.samples, big.samples[:6])
    seeds = fastsde.sample(gm, sde, (2, 2), solver="em", seed=[5, 9], steps=30, dtype=torch.float64)
    swapped = fastsde.sample(gm, sde, (2, 2), solver="em", seed=[9, 5], steps=30, dtype=torch.float64)
    assert torch.equal(seeds.samples, swapped.samples.flip(0))


def test_callback_sees_every_step_and_can_stop():
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)
    seen = []
    fastsde.sample(gm, sde, (4, 2), solver="em", steps=10, callback=lambda info: seen.append((info.step, info.nfe)))
    assert [s for s, _ in seen] == list(range(9)) and seen[-1][1] == 9.0
    res = fastsde.sample(gm, sde, (4, 2), solver="em", steps=10, callback=lambda info: info.step < 2)
    assert res.stopped_early and res.nfe == 3.0


def test_x_init_and_progress_bar():
    sde = fastsde.SubVPSDE()
    gm = mixture_2d(sde)
    x0 = torch.zeros(3, 2)
    res = fastsde.sample(gm, sde, (3, 2), solver="em", steps=5, x_init=x0, progress=True)
    assert res.samples.shape == (3, 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(shape=(0, 2)), r"shape must be a tuple \(n, \*dims\)"),
        (dict(shape=(4,)), r"shape must be a tuple \(n, \*dims\)"),
        (dict(shape=(4, 2.5)), r"shape must be a tuple"),
        (dict(solver="rk9"), r"unknown solver 'rk9'; valid solvers: \[.*'em'"),
        (dict(solver="em", stepz=3), r"unknown option\(s\) \['stepz'\] for solver 'em'; valid options: \[.*'steps'"),
        (dict(solver="em", steps=0), r"steps must be an integer >= 2, got 0"),
        (dict(solver="em", steps=-3), r"steps must be an integer >= 2, got -3"),
        (dict(solver="em", steps=10.0), r"steps must be an integer >= 2, got 10.0"),
        (
            dict(solver="em", grid="cubic"),
            r"grid must be one of \['uniform', 'edm', 'logsnr', 'quadratic'\] or a decreasing 1-D tensor of times, "
            r"got 'cubic'",
        ),
        (dict(solver="em", t_end=2.0), r"t_end must lie in \(0, 1\]"),
        (dict(solver="em", t_end=-0.1), r"t_end must lie in \(0, 1\]"),
        (dict(solver="em", t_end=0.0, denoise=False), r"t_end=0 makes the denoise the grid.s last move"),
        (dict(solver="em", t_end=1.0), r"t_end must be < T = 1"),
        (dict(solver="em", denoise="yes"), r"denoise must be True or False"),
        (dict(solver="em", seed=[1, 2]), r"one seed per sample: expected 4, got 2"),
    ],
)
def test_bad_input_is_a_value_error_before_any_compute(kwargs, message):
    sde = fastsde.VPSDE()
    score, calls = _counting(mixture_2d(sde))
    args = dict(shape=(4, 2), solver="em")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        fastsde.sample(score, sde, **args)
    assert calls == []


def test_score_of_wrong_shape_and_non_finite_score():
    sde = fastsde.VPSDE()
    with pytest.raises(ValueError, match=r"shaped like x \(4, 2\), got \(4,\)"):
        fastsde.sample(lambda x, t: x.sum(1), sde, (4, 2), solver="em", steps=5)

    def nan_in_the_middle(x, t):
        return torch.where(((t - 0.5).abs() < 0.1)[:, None], torch.nan, -x)

    with pytest.raises(fastsde.NonFiniteScoreError, match=r"t = \[0\.500"):
        fastsde.sample(nan_in_the_middle, sde, (4, 2), solver="em", steps=3)


def test_not_a_process_or_not_callable():
    with pytest.raises(ValueError, match="sde must be a fastsde process"):
        fastsde.sample(lambda x, t: x, "vp", (2, 2), solver="em")
    with pytest.raises(ValueError, match="score must be callable"):
        fastsde.sample(None, fastsde.VPSDE(), (2, 2), solver="em")


@pytest.mark.parametrize(
    ("kw", "shape", "match"),
    [
        (dict(device="meta"), (4, 2), "device 'meta' is not available on this machine; available: cpu"),
        (dict(device="foo"), (4, 2), "device must be a torch device available here"),
        (dict(steps=10**11), (4, 2), r"steps must be an integer <= 1000000 \(the limit fastsde sets\)"),
        (dict(), (10**12, 2), r"needs 7\.45e\+03 GiB for the samples alone, more than this machine's memory"),
    ],
    ids=["meta", "unknown-device", "steps", "n"],
)
def test_devices_steps_and_sizes_are_refused_before_any_allocation(kw, shape, match):
    sde = fastsde.VPSDE()
    calls = []
    gm = fastsde.problems.mixture_2d(sde)

    def score(x, t):
        calls.append(1)
        return gm(x, t)

    with pytest.raises(ValueError, match=match):
        fastsde.sample(score, sde, shape, solver="ddim", **({"steps": 4} | kw))
    assert not calls

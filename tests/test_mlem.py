"""Multilevel Euler–Maruyama (issue 15): unbiasedness, the p = 1 limit, the Brownian path, counts,
determinism, the probability rules, and bad levels or probabilities refused before compute."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import fastsde
from fastsde.noise import NoiseSource, Stream
from fastsde.problems import mixture_2d

F64 = torch.float64
SDE = fastsde.VPSDE()
GM = mixture_2d(SDE)


def level(k: int, sde: fastsde.SDE = SDE):
    """A synthetic level: the exact mixture score plus a deterministic error of size 2^−k / σ(t)."""
    gm = mixture_2d(sde)

    def f(x: Tensor, t: Tensor) -> Tensor:
        return gm(x, t) + 2.0**-k * torch.sin(3.0 * x + k) / sde.marginal_std(t)[:, None]

    return f


class Recorder:
    """A score that records the rows of each call."""

    def __init__(self, f):
        self.f = f
        self.rows: list[int] = []

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.rows.append(x.shape[0])
        return self.f(x, t)


def three_levels(costs=(1.0, 4.0, 16.0)) -> fastsde.Levels:
    return fastsde.Levels([level(1), level(2), level(3)], costs=list(costs))


# ---------------------------------------------------------------------------------------------
# The estimator
# ---------------------------------------------------------------------------------------------


def test_expectation_is_the_finest_level_at_a_fixed_x():
    """One EM move from the same x for 40 000 samples (each its own draws): the move is affine in the
    score, so (ML-EM − EM with f_K)/(h·g²) is f̃ − f_K per sample; its mean is 0 within Monte Carlo
    error, while weights B_k instead of B_k/p_k would be off by many standard errors."""
    n = 40_000
    x = torch.tensor([[0.7, -0.4]], dtype=F64).expand(n, 2).clone()
    p = [0.3, 0.1]
    kw = dict(steps=2, t_end=0.4, x_init=x, seed=11, dtype=F64, denoise=False)
    ml = fastsde.sample(three_levels(), SDE, (n, 2), solver="mlem", p=p, **kw)
    em = fastsde.sample(level(3), SDE, (n, 2), solver="em", **kw)
    t = torch.ones(1, dtype=F64)
    gain = float((1.0 - 0.4) * SDE.diffusion(t) ** 2)
    dev = (ml.samples - em.samples) / gain  # f̃ − f_K
    se = dev.std(0) / math.sqrt(n)
    assert bool((dev.mean(0).abs() < 5 * se).all()), (dev.mean(0), se)
    # the test can fail: the unweighted sum is biased by (1 − p_k)·(f_{k+1} − f_k) summed
    f = [level(k)(x[:1], t) for k in (1, 2, 3)]
    unweighted_bias = (1 - p[0]) * (f[1] - f[0]) + (1 - p[1]) * (f[2] - f[1])
    assert bool((unweighted_bias.abs().reshape(-1) > 20 * se).all())
    # and the draws were really random: the correction's variance is there
    assert bool((dev.std(0) > 0.1).all())


@pytest.mark.parametrize("base,steps,solver,extra", [("em", 60, "em", {}), ("ddim", 25, "ddim", {"eta": 0.0})])
def test_every_p_one_is_plain_solver_with_the_finest_level(base, steps, solver, extra):
    kw = dict(steps=steps, seed=0, dtype=F64)
    ml = fastsde.sample(three_levels(), SDE, (16, 2), solver="mlem", p=[1.0, 1.0], base=base, **kw, **extra)
    ref = fastsde.sample(level(3), SDE, (16, 2), solver=solver, **kw, **extra)
    torch.testing.assert_close(ml.samples, ref.samples, rtol=1e-12, atol=1e-12)  # summation order only
    assert ml.nfe_per_level.tolist() == [steps - 1, steps - 1, steps]  # + the denoise on f_K
    assert ml.cost == pytest.approx((steps - 1) * (1 + 4) + steps * 16)
    record = ml.config()["multilevel"]
    assert record["expected_cost"] == pytest.approx(ml.cost) and record["realised_cost"] == ml.cost


def test_the_brownian_path_is_unchanged_by_the_bernoulli_draws():
    """With three identical levels every correction is exactly 0, so ML-EM with any p is EM bit for
    bit: the draws take nothing from the Brownian stream, although they do happen."""
    same = fastsde.Levels([GM, GM, GM], costs=[1.0, 2.0, 4.0])
    em = fastsde.sample(GM, SDE, (12, 2), solver="em", steps=40, seed=5, dtype=F64)
    for p in ([0.5, 0.2], [0.05, 0.9]):
        ml = fastsde.sample(same, SDE, (12, 2), solver="mlem", steps=40, p=p, seed=5, dtype=F64)
        assert torch.equal(ml.samples, em.samples)
        assert 0 < ml.nfe_per_level[1] < 39  # the draws picked some rows, not all


def test_a_plain_score_is_plain_em():
    em = fastsde.sample(GM, SDE, (6, 2), solver="em", steps=30, seed=2, dtype=F64)
    ml = fastsde.sample(GM, SDE, (6, 2), solver="mlem", steps=30, seed=2, dtype=F64)
    assert torch.equal(ml.samples, em.samples) and ml.cost == ml.nfe == 30 and ml.nfe_per_level is None


def test_deterministic_and_batch_size_independent():
    kw = dict(solver="mlem", steps=50, p=[0.3, 0.1], seed=21, dtype=F64)
    small = fastsde.sample(three_levels(), SDE, (4, 2), **kw)
    again = fastsde.sample(three_levels(), SDE, (4, 2), **kw)
    big = fastsde.sample(three_levels(), SDE, (13, 2), **kw)
    assert torch.equal(small.samples, again.samples)
    assert torch.equal(small.samples, big.samples[:4])
    per = "nfe_per_level_per_sample"
    assert torch.equal(small.stats[per], big.stats[per][:4])
    other = fastsde.sample(three_levels(), SDE, (4, 2), **{**kw, "seed": 22})
    assert not torch.equal(small.samples, other.samples)


def test_per_level_counts_equal_the_draws():
    """Level 1 on every row; level k on the rows with B_{k−1} or B_k; the denoise on f_K: the counters
    agree with the draws regenerated from Stream.BERNOULLI, and with the rows the levels were handed."""
    n, steps, p = 9, 40, [0.3, 0.2, 0.1]
    recs = [Recorder(level(k)) for k in (1, 2, 3, 4)]
    costs = [1.0, 3.0, 9.0, 27.0]
    res = fastsde.sample(fastsde.Levels(recs, costs=costs), SDE, (n, 2), solver="mlem", steps=steps, p=p, seed=7)
    src = NoiseSource.from_seed(7, n)
    want = torch.zeros(n, 4, dtype=F64)
    for i in range(steps - 1):
        z = src.normal((3,), Stream.BERNOULLI, i, dtype=F64)
        b = 0.5 * torch.erfc(-z / math.sqrt(2.0)) < torch.tensor(p, dtype=F64)
        b = torch.cat([b, torch.zeros(n, 1, dtype=torch.bool)], dim=1)
        want[:, 0] += 1
        for k in range(1, 4):
            want[:, k] += (b[:, k - 1] | b[:, k]).double()
    want[:, 3] += 1  # the denoise
    got = res.stats["nfe_per_level_per_sample"]
    assert torch.equal(got, want)
    assert [sum(r.rows) - 2 for r in recs] == want.sum(0).tolist()  # 2 probe rows per level
    assert res.nfe_per_level.tolist() == pytest.approx((want.mean(0)).tolist())
    assert res.cost == pytest.approx(float((want * torch.tensor(costs, dtype=F64)).sum(1).mean()))
    assert res.nfe == pytest.approx(float(want.sum(1).mean()))


def test_expected_cost_matches_the_realised_cost():
    res = fastsde.sample(three_levels(), SDE, (64, 2), solver="mlem", steps=200, p=[0.2, 0.05], seed=3)
    rec = res.config()["multilevel"]
    per_move = 1 + 4 * (1 - 0.8 * 0.95) + 16 * 0.05
    assert rec["expected_cost"] == pytest.approx(199 * per_move + 16)
    assert res.cost == pytest.approx(rec["expected_cost"], rel=0.05)
    assert rec["rule"] == "constant" and rec["schedule"]["p"] == [0.2, 0.05]


# ---------------------------------------------------------------------------------------------
# Probability rules
# ---------------------------------------------------------------------------------------------


def test_callable_schedule_is_evaluated_at_each_move_start():
    seen: list[float] = []

    def p(t: float) -> Tensor:
        seen.append(t)
        return torch.tensor([0.2 + 0.5 * t, 0.1])

    res = fastsde.sample(three_levels(), SDE, (5, 2), solver="mlem", steps=20, p=p, seed=0)
    grid = fastsde.time_grid(SDE, "uniform", 20, SDE.T, SDE.default_t_end)
    assert seen == grid[:-1].tolist()
    sched = res.stats["mlem_schedule"]
    torch.testing.assert_close(sched[:, 0], 0.2 + 0.5 * grid[:-1])
    assert res.config()["multilevel"]["rule"] == "callable"


def test_auto_schedule_follows_the_budget_and_reports_its_calibration():
    kw = dict(solver="mlem", steps=200, seed=0, dtype=F64)
    tight = fastsde.sample(three_levels(), SDE, (32, 2), p="auto", budget=1e-4, **kw)
    loose = fastsde.sample(three_levels(), SDE, (32, 2), p="auto", budget=1e-1, **kw)
    rt, rl = tight.config()["multilevel"], loose.config()["multilevel"]
    for rec, res in ((rt, tight), (rl, loose)):
        assert rec["rule"] == "auto"
        cal = rec["calibration"]
        # the pilot: the coarsest level at T, then every level at each of the 10 bucket times
        assert cal["nfe_per_level"] == [16 * 11, 16 * 10, 16 * 10] and cal["cost"] == 16 * (11 + 40 + 160)
        # the VP reverse flow damps errors, the more the earlier they are made
        sens = cal["sensitivity"]
        assert len(sens) == 10 and all(0 < a < b <= 1 for a, b in zip(sens, sens[1:]))
        assert len(cal["bucket_times"]) == 10 and len(cal["diff_rms"]) == 10
        sched = res.stats["mlem_schedule"]
        assert sched.shape == (199, 2) and bool(((sched >= 1e-3) & (sched <= 1)).all())
        assert res.cost == pytest.approx(rec["expected_cost"], rel=0.1)
    assert rl["expected_cost"] < rt["expected_cost"]
    assert rl["calibration"]["predicted_mse"] > rt["calibration"]["predicted_mse"]
    # the schedule does not depend on the batch: sample i is the same in a batch of 3
    three = fastsde.sample(three_levels(), SDE, (3, 2), p="auto", budget=1e-4, **kw)
    assert torch.equal(three.samples, tight.samples[:3])


def test_auto_rule_is_the_water_filling_solution():
    """p = min(1, w/(μ√c̄)) with the budget met exactly on the uncapped entries."""
    from fastsde.solvers.mlem_schedule import allocate

    w = torch.tensor([[0.1, 0.01], [2.0, 0.05], [0.0, 0.3]], dtype=F64)
    c = torch.tensor([4.0, 20.0], dtype=F64)
    p = allocate(w, c, budget=0.05, p_min=1e-6)
    free = (p < 1) & (w > 0)
    assert bool((p[w == 0] == 1e-6).all()) and bool(p[1, 0] == 1.0)
    assert float(((w**2) * (1 / p - 1))[free].sum()) == pytest.approx(0.05, rel=1e-9)
    ratio = (w / (p * c.sqrt()))[free]
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])))


# ---------------------------------------------------------------------------------------------
# Bad input, before compute
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scores,costs,message",
    [
        ("one", [1.0], r"at least 2 score functions, got 1"),
        ("two", [1.0, 0.0], r"costs\[1\] must be a positive finite number, got 0.0"),
        ("two", [1.0, -2.0], r"costs\[1\] must be a positive finite number, got -2.0"),
        ("two", [math.nan, 1.0], r"costs\[0\] must be a positive finite number, got nan"),
        ("two", [1.0, True], r"costs\[1\] must be a positive finite number, got True"),
        ("two", [1.0], r"one cost per level: 2 levels, got 1 costs"),
        ("junk", [1.0, 2.0], r"levels\[1\] must be callable"),
        ("procs", [1.0, 2.0], r"levels\[1\] was built for EDM"),
    ],
)
def test_bad_levels_are_refused(scores, costs, message):
    rec = Recorder(GM)
    f = {"one": [rec], "two": [rec, rec], "junk": [rec, 3], "procs": [GM, mixture_2d(fastsde.EDM())]}[scores]
    with pytest.raises(ValueError, match=message):
        fastsde.Levels(f, costs=costs)
    assert rec.rows == []


@pytest.mark.parametrize(
    "p,message",
    [
        (0.0, r"p must lie in \(0, 1\], got 0.0"),
        ([0.0, 0.5], r"p\[0\] must lie in \(0, 1\], got 0.0"),
        ([0.5, 1.5], r"p\[1\] must lie in \(0, 1\], got 1.5"),
        ([math.nan, 0.5], r"p\[0\] must lie in \(0, 1\], got nan"),
        ([0.5], r"one probability per correction: 3 level\(s\) have 2 correction\(s\).*got 1"),
        ([0.5, 0.5, 0.5], r"got 3"),
        ("sometimes", r"p must be 'auto', a callable"),
        (lambda t: [0.5], r"p\(t\) must return 2 probabilities in \(0, 1\].*at t = 1"),
        (lambda t: [0.5, 2 * t], r"p\(t\) must return 2 probabilities.*at t = 1"),
        (lambda t: [0.5, math.nan], r"p\(t\) must return 2 probabilities"),
    ],
)
def test_bad_probabilities_are_refused_before_compute(p, message):
    recs = [Recorder(level(k)) for k in (1, 2, 3)]
    with pytest.raises(ValueError, match=message):
        fastsde.sample(fastsde.Levels(recs, costs=[1, 2, 4]), SDE, (4, 2), solver="mlem", steps=20, p=p)
    assert all(r.rows == [] for r in recs)


def test_other_bad_calls_are_refused_before_compute():
    recs = [Recorder(level(k)) for k in (1, 2)]
    levels = fastsde.Levels(recs, costs=[1, 2])
    with pytest.raises(ValueError, match=r"Levels need solver='mlem'; 'em' takes one score"):
        fastsde.sample(levels, SDE, (4, 2), solver="em")
    with pytest.raises(ValueError, match=r"levels\[0\]: the score was built for"):
        fastsde.sample(fastsde.Levels([GM, GM], costs=[1, 2]), fastsde.EDM(), (4, 2), solver="mlem")
    with pytest.raises(ValueError, match=r"eta applies to base='ddim' only"):
        fastsde.sample(levels, SDE, (4, 2), solver="mlem", eta=0.5)
    with pytest.raises(ValueError, match=r"a single score has no corrections"):
        fastsde.sample(recs[0], SDE, (4, 2), solver="mlem", p=[0.5])
    assert all(r.rows == [] for r in recs)


def test_the_probe_refuses_levels_that_disagree_in_shape_or_time_convention():
    wrong_shape = Recorder(lambda x, t: torch.zeros(x.shape[0], 3))
    fine = Recorder(GM)
    with pytest.raises(ValueError, match=r"levels\[0\]\(x, t\) must return a tensor shaped like x \(2, 2\)"):
        fastsde.sample(fastsde.Levels([wrong_shape, fine], costs=[1, 2]), SDE, (4, 2), solver="mlem", p=0.5)
    assert wrong_shape.rows == [2] and fine.rows == []  # the probe only

    def other_clock(x: Tensor, t: Tensor) -> Tensor:  # a network that reads t in another unit
        return GM(x, t / 100)

    with pytest.raises(ValueError, match=r"levels\[0\] differs from the finest level by .* time convention"):
        fastsde.sample(fastsde.Levels([other_clock, GM], costs=[1, 2]), SDE, (4, 2), solver="mlem", p=0.5)
    ok = fastsde.Levels([other_clock, GM], costs=[1, 2], agree_tol=None)
    assert bool(torch.isfinite(fastsde.sample(ok, SDE, (4, 2), solver="mlem", steps=10, p=0.5).samples).all())


def test_image_shaped_float32_levels_and_the_callback():
    """Levels on (n, C, H, W) float32 samples: the solve stays float32, the callback sees the total
    NFE over the levels, and the counts add up."""
    sde = fastsde.VPSDE()
    means = torch.tensor([[-0.5, 0.2, 0.4, -0.1], [0.5, -0.3, 0.0, 0.3]], dtype=F64).reshape(2, 1, 2, 2)
    gm = fastsde.GaussianMixture([0.6, 0.4], means, [0.1, 0.2], sde)

    def lvl(k: int):
        return lambda x, t: gm(x, t) + 2.0**-k * torch.cos(x) / sde.marginal_std(t)[:, None, None, None]

    infos = []
    levels = fastsde.Levels([lvl(1), lvl(2), lvl(3)], costs=[1, 4, 16])
    res = fastsde.sample(
        levels, sde, (5, 1, 2, 2), solver="mlem", steps=12, p=[0.5, 0.25], seed=1, callback=infos.append
    )
    assert res.samples.dtype == torch.float32 and bool(torch.isfinite(res.samples).all())
    assert infos[-1].nfe == pytest.approx(res.nfe - 1) and res.nfe == pytest.approx(float(res.nfe_per_level.sum()))

"""Sharp edges a first user hit: per-sample null conditioning under CFG with solvers that evaluate subsets
of the samples, float32 explicit grids, and fit_mlem's ``shape`` convention."""

from __future__ import annotations

import pytest
import torch

import fastsde
from fastsde.problems import conditional_mixture_2d

torch.set_num_threads(1)

N = 6
LABELS = torch.arange(N) % 3
NEGATIVE = (LABELS + 1) % 3  # a per-sample "negative prompt": another class for every sample
W = 2.0


@pytest.fixture(scope="module")
def problem():
    sde = fastsde.VPSDE()
    return sde, conditional_mixture_2d(sde)


def _by_hand(mix):
    """CFG written out with the negative labels as ordinary per-sample conditioning (the reference)."""

    def score(x, t, class_labels, negative):
        return torch.lerp(mix(x, t, negative), mix(x, t, class_labels), W)

    return score


@pytest.mark.parametrize(
    "solver, opts",
    [
        ("adaptive_sde_dpm_2m", {}),  # fastsde.sample's default: drops finished rows
        ("adaptive", {"eps_rel": 0.05}),
        ("adaptive_dpmpp_3m", {"eps_rel": 0.01}),
        ("ode", {"rtol": 1e-3, "atol": 1e-3}),
        ("dpmpp_2m", {"steps": 10}),
    ],
)
def test_per_sample_null_cond_follows_the_rows(problem, solver, opts):
    sde, mix = problem
    guided = fastsde.CFGScore(mix, W, null_cond={"class_labels": NEGATIVE})
    kw = dict(solver=solver, seed=3, dtype=torch.float64, **opts)
    got = fastsde.sample(guided, sde, (N, 2), cond={"class_labels": LABELS}, **kw)
    ref = fastsde.sample(_by_hand(mix), sde, (N, 2), cond={"class_labels": LABELS, "negative": NEGATIVE}, **kw)
    torch.testing.assert_close(got.samples, ref.samples, rtol=1e-10, atol=1e-12)
    assert got.nfe == ref.nfe and got.network_evals == 2 * got.nfe


def test_per_sample_null_cond_one_sample_at_a_time(problem):
    """Each sample drawn alone (its own rows of the seed) equals its row of the batch."""
    sde, mix = problem
    kw = dict(dtype=torch.float64)  # the default solver, adaptive_sde_dpm_2m
    batch = fastsde.sample(
        fastsde.CFGScore(mix, W, {"class_labels": NEGATIVE}), sde, (N, 2), seed=5, cond={"class_labels": LABELS}, **kw
    ).samples
    for i in range(N):
        alone = fastsde.sample(
            fastsde.CFGScore(mix, W, {"class_labels": NEGATIVE[i : i + 1]}),
            sde,
            (1, 2),
            seed=fastsde.NoiseSource.from_seed(5, 1, start=i),
            cond={"class_labels": LABELS[i : i + 1]},
            **kw,
        ).samples
        torch.testing.assert_close(alone[0], batch[i], rtol=1e-10, atol=1e-12)


def test_per_sample_null_cond_under_mlem_levels(problem):
    """ML-EM evaluates the finer level on the drawn rows only; each level's null rows follow."""
    sde, mix = problem

    def coarse(x, t, class_labels):
        return mix(x, t, class_labels) + 0.1

    def coarse_by_hand(x, t, class_labels, negative):
        return torch.lerp(coarse(x, t, negative), coarse(x, t, class_labels), W)

    guided = fastsde.Levels(
        [
            fastsde.CFGScore(coarse, W, {"class_labels": NEGATIVE}, sde=sde),
            fastsde.CFGScore(mix, W, {"class_labels": NEGATIVE}),
        ],
        costs=[1.0, 4.0],
    )
    by_hand = fastsde.Levels([coarse_by_hand, _by_hand(mix)], costs=[1.0, 4.0])
    kw = dict(solver="mlem", steps=40, p=[0.3], seed=0, dtype=torch.float64)
    got = fastsde.sample(guided, sde, (N, 2), cond={"class_labels": LABELS}, **kw)
    ref = fastsde.sample(by_hand, sde, (N, 2), cond={"class_labels": LABELS, "negative": NEGATIVE}, **kw)
    assert 0 < float(got.nfe_per_level[1]) < 40  # the finer level saw subsets of the rows
    torch.testing.assert_close(got.samples, ref.samples, rtol=1e-10, atol=1e-12)


def test_per_sample_null_cond_refusals(problem, tmp_path):
    sde, mix = problem
    bad = fastsde.CFGScore(mix, W, {"class_labels": torch.tensor([1, 2, 0, 1])})  # 4 rows for 6 samples
    with pytest.raises(ValueError, match="one row or one row per sample"):
        fastsde.sample(bad, sde, (N, 2), solver="ddim", steps=3, cond={"class_labels": LABELS})
    # sample_to_dir slices cond per shard, the CFG score's per-sample null rows with it
    guided = fastsde.CFGScore(mix, W, {"class_labels": NEGATIVE})
    kw = dict(solver="adaptive_sde_dpm_2m", seed=0, dtype=torch.float64)
    fastsde.sample_to_dir(guided, sde, (N, 2), tmp_path / "r", shard_size=4, cond={"class_labels": LABELS}, **kw)
    one = fastsde.sample(guided, sde, (N, 2), cond={"class_labels": LABELS}, **kw)
    torch.testing.assert_close(fastsde.load_samples(tmp_path / "r"), one.samples, rtol=1e-10, atol=1e-12)


def test_per_sample_null_cond_in_log_likelihood(problem):
    """log p(x | cond) under CFG with per-sample null rows equals the hand-written guided score's."""
    sde, mix = problem
    x = torch.randn(N, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    guided = fastsde.CFGScore(mix, W, {"class_labels": NEGATIVE})
    got = fastsde.log_likelihood(guided, sde, x, cond={"class_labels": LABELS}, rtol=1e-6, atol=1e-6)
    ref = fastsde.log_likelihood(
        _by_hand(mix), sde, x, cond={"class_labels": LABELS, "negative": NEGATIVE}, rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(got.logp, ref.logp, rtol=1e-10, atol=1e-10)


# -- float32 explicit grids -----------------------------------------------------------------------


def test_float32_explicit_grid_is_accepted_and_snapped():
    sde = fastsde.VPSDE()
    score = fastsde.problems.mixture_2d(sde)
    times = [1.0, 0.5, 0.2, 0.05, 1e-3]
    f32 = fastsde.sample(score, sde, (8, 2), solver="unipc", steps=5, grid=torch.tensor(times), seed=0)
    f64 = fastsde.sample(score, sde, (8, 2), solver="unipc", steps=5, grid=torch.tensor(times, dtype=torch.float64))
    assert torch.tensor(1e-3, dtype=torch.float32).item() != 1e-3  # the case: float32 cannot hold t_end
    # the interior times differ by float32 rounding only; the ends are snapped to T and t_end exactly
    torch.testing.assert_close(f32.samples, f64.samples, rtol=1e-5, atol=1e-5)
    g = fastsde.grids.time_grid(sde, torch.tensor(times), 5, 1.0, 1e-3)
    assert g.dtype == torch.float64 and float(g[0]) == 1.0 and float(g[-1]) == 1e-3


@pytest.mark.parametrize(
    "grid, which",
    [
        (torch.tensor([1.0, 0.5, 0.2, 0.05, 1.01e-3]), "last time is 0.00101"),
        (torch.tensor([0.999, 0.5, 0.2, 0.05, 1e-3]), "first time is 0.999"),
        ([1.0, 0.5, 0.2, 0.05, 1.0000001e-3], "last time is 0.0010000001"),  # float64: 1e-9 relative
    ],
)
def test_wrong_explicit_grid_ends_are_refused(grid, which):
    sde = fastsde.VPSDE()
    with pytest.raises(ValueError, match=which):
        fastsde.sample(fastsde.problems.mixture_2d(sde), sde, (4, 2), solver="unipc", steps=5, grid=grid)


def test_snapping_must_keep_the_grid_decreasing():
    t = torch.tensor([1.0 + 2**-23, 1.0, 0.5, 1e-3], dtype=torch.float32)  # 1 ulp above T, then T itself
    with pytest.raises(ValueError, match="strictly decreasing once its ends"):
        fastsde.grids.time_grid(fastsde.VPSDE(), t, 4, 1.0, 1e-3)


# -- fit_mlem's shape -----------------------------------------------------------------------------


def _levels():
    sde = fastsde.VPSDE()

    def net(x, t):  # a conv "network" that only takes (rows, 1, 4, 4), like a trained model
        weight = torch.ones(1, 1, 3, 3, dtype=x.dtype) / 9.0
        return -torch.nn.functional.conv2d(x, weight, padding=1)

    def net2(x, t):
        return 1.01 * net(x, t)

    net.sde = net2.sde = sde
    return sde, fastsde.Levels([net, net2], costs=[1.0, 2.0])


def test_fit_mlem_refuses_sample_shape_before_compute():
    sde, levels = _levels()
    with pytest.raises(ValueError, match=r"shape is one sample's dims \(got \(8, 1, 4, 4\)\); fastsde.sample's shape"):
        fastsde.fit_mlem(levels, sde, (8, 1, 4, 4), steps=10, n=4, iters=1)


def test_fit_mlem_compares_with_the_models_dims():
    sde, levels = _levels()
    levels.scores[0].shape = (1, 4, 4)  # a score that carries its dims (as a loaded model does)
    with pytest.raises(ValueError, match=r"these levels' samples have dims \(1, 4, 4\)"):
        fastsde.fit_mlem(levels, sde, (8, 1, 4, 4), steps=10, n=4, iters=1)
    with pytest.raises(ValueError, match="one sample's dims"):
        fastsde.fit_mlem(levels, sde, (0, 4), steps=10, n=4, iters=1)
    sched = fastsde.fit_mlem(levels, sde, steps=10, n=4, iters=1, seed=0)  # dims read off the score
    assert sched.key["shape"] == [1, 4, 4]


def test_fit_mlem_takes_one_samples_dims():
    sde, levels = _levels()
    sched = fastsde.fit_mlem(levels, sde, (1, 4, 4), steps=10, n=4, iters=1, seed=0)
    assert sched.key["shape"] == [1, 4, 4]

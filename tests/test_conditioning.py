"""Per-sample conditioning through the row contract (cond=), autograd scores, and starting from an image
(t_start): exact class-conditional mixtures, every solver, compaction included."""

from __future__ import annotations

import pytest
import torch

import fastsde
from fastsde.problems import conditional_mixture_2d

torch.set_num_threads(1)

#: solvers whose samples need a fitted table (covered by their own tests)
NEEDS_TABLE = {"iia_heun", "iia_ddim", "iia_dpmpp_2m"}
SOLVER_NAMES = [name for name in fastsde.SOLVERS if name not in NEEDS_TABLE]
#: small settings so that every solver runs in a few milliseconds
FAST = {"steps": 6, "eps_rel": 0.05, "eps_abs": 0.05, "rtol": 1e-3, "atol": 1e-3, "per_sample_norm": True}
LABELS = torch.tensor([0, 1, 2, 2, 0, 1, 3])  # 3 is the null label: the unconditional model


def fast_options(name: str) -> dict:
    spec = fastsde.SOLVERS[name]
    return {k: v for k, v in FAST.items() if k in spec.options}


@pytest.fixture(scope="module")
def problem():
    sde = fastsde.VPSDE()
    return sde, conditional_mixture_2d(sde)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_cond_rows_follow_the_samples(problem, name):
    """Labels passed as cond= give, sample by sample, what a score closing over that one label gives
    (per-sample seeds, so each group is its own batch): the rows handed to the score carry their own
    conditioning whatever subset is evaluated (compaction, finished samples, correctors)."""
    sde, mix = problem
    opts = fast_options(name)
    seeds = list(range(10, 10 + LABELS.shape[0]))
    res = fastsde.sample(
        mix, sde, (7, 2), solver=name, seed=seeds, dtype=torch.float64, cond={"class_labels": LABELS}, **opts
    )
    assert res.samples.isfinite().all()
    for y in LABELS.unique().tolist():
        idx = (LABELS == y).nonzero().squeeze(1)

        def closed(x, t, _y=y):  # the score a user wrote before cond= existed: one label for the batch
            return mix(x, t, torch.full((x.shape[0],), _y))

        part = fastsde.sample(
            closed, sde, (idx.numel(), 2), solver=name, seed=[seeds[i] for i in idx], dtype=torch.float64, **opts
        )
        torch.testing.assert_close(res.samples[idx], part.samples, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in SOLVER_NAMES if "compact" in fastsde.SOLVERS[n].options])
def test_same_samples_with_and_without_compaction(problem, name):
    sde, mix = problem
    cond = {"class_labels": LABELS}
    kw = dict(solver=name, seed=3, dtype=torch.float64, cond=cond, **fast_options(name))
    a = fastsde.sample(mix, sde, (7, 2), compact=True, **kw)
    b = fastsde.sample(mix, sde, (7, 2), compact=False, **kw)
    torch.testing.assert_close(a.samples, b.samples, rtol=1e-10, atol=1e-12)
    assert a.stats["rows_evaluated"] < b.stats["rows_evaluated"]  # compaction did drop rows


def test_labels_set_the_class_means(problem):
    """Conditional samples land in their class (the exact problem's modes are far apart)."""
    sde, mix = problem
    labels = torch.tensor([0, 1] * 40)
    res = fastsde.sample(
        mix, sde, (80, 2), solver="dpmpp_2m", steps=30, seed=0, dtype=torch.float64, cond={"class_labels": labels}
    )
    for y in (0, 1):
        got = res.samples[labels == y].mean(0)
        torch.testing.assert_close(got, mix.classes[y].means[0], atol=0.05, rtol=0)


def test_tensor_cond_is_the_keyword_cond(problem):
    sde, mix = problem
    seen = {}

    def score(x, t, cond):
        seen["rows"] = cond.shape[0]
        return mix(x, t, cond)

    res = fastsde.sample(score, sde, (7, 2), solver="ddim", steps=4, seed=0, dtype=torch.float64, cond=LABELS)
    ref = fastsde.sample(
        mix, sde, (7, 2), solver="ddim", steps=4, seed=0, dtype=torch.float64, cond={"class_labels": LABELS}
    )
    assert seen["rows"] == 7 and torch.equal(res.samples, ref.samples)


def test_mlem_levels_get_their_rows(problem):
    """Multilevel EM evaluates each finer level on a random subset of rows: the labels follow them."""
    sde, mix = problem
    levels = fastsde.Levels([mix, mix], costs=[1.0, 4.0])
    kw = dict(solver="mlem", steps=6, seed=[1, 2, 3, 4, 5, 6, 7], dtype=torch.float64, p=[0.5])
    res = fastsde.sample(levels, sde, (7, 2), cond={"class_labels": LABELS}, **kw)
    assert 0 < float(res.nfe_per_level[1]) < 6
    for i in (0, 3):
        one = fastsde.Levels(
            [lambda x, t, _y=int(LABELS[i]): mix(x, t, torch.full((x.shape[0],), _y))] * 2, costs=[1.0, 4.0]
        )
        alone = fastsde.sample(one, sde, (1, 2), **{**kw, "seed": [kw["seed"][i]]})
        torch.testing.assert_close(res.samples[i : i + 1], alone.samples, rtol=1e-10, atol=1e-12)


def test_sample_to_dir_gives_each_shard_its_rows(problem, tmp_path):
    sde, mix = problem
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    kw = dict(solver="dpmpp_2m", steps=5, seed=4, dtype=torch.float64)
    fastsde.sample_to_dir(mix, sde, (7, 2), tmp_path / "run", shard_size=3, cond={"class_labels": labels}, **kw)
    one = fastsde.sample(mix, sde, (7, 2), cond={"class_labels": labels}, **kw)
    torch.testing.assert_close(fastsde.load_samples(tmp_path / "run"), one.samples, rtol=0, atol=0)
    with pytest.raises(ValueError, match="settings|cond|different"):  # other labels: another run
        fastsde.sample_to_dir(mix, sde, (7, 2), tmp_path / "run", shard_size=3, cond={"class_labels": 2 - labels}, **kw)


@pytest.mark.parametrize(
    "cond, match",
    [
        (
            {"class_labels": torch.zeros(5, dtype=torch.long)},
            r"one row per sample \(shape\[0\] == n = 7\), got shape \(5,\)",
        ),
        ({"class_labels": [0] * 7}, r"cond\['class_labels'\] must be a tensor"),
        ([0] * 7, "cond must be a tensor or a non-empty dict"),
        ({}, "cond must be a tensor or a non-empty dict"),
        (torch.tensor(3), r"one row per sample"),
    ],
)
def test_bad_cond_refused_before_compute(problem, cond, match):
    sde, mix = problem
    calls = []

    def score(x, t, **kw):
        calls.append(1)
        return mix(x, t, torch.zeros(x.shape[0], dtype=torch.long))

    with pytest.raises(ValueError, match=match):
        fastsde.sample(score, sde, (7, 2), solver="ddim", steps=3, cond=cond)
    assert not calls


def test_autograd_score_works_under_sample(problem):
    """A score that differentiates (−∇E of an energy) runs under every kind of solver: it declares
    needs_grad and the counting wrapper enables autograd for it."""
    sde, mix = problem
    gm = mix.classes[0]

    def energy_score(x, t):
        xg = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(gm.log_prob(xg, t).sum(), xg)
        return g

    energy_score.needs_grad = True
    for name in ("ddim", "adaptive", "ode"):
        res = fastsde.sample(energy_score, sde, (4, 2), solver=name, seed=0, dtype=torch.float64, **fast_options(name))
        ref = fastsde.sample(gm, sde, (4, 2), solver=name, seed=0, dtype=torch.float64, **fast_options(name))
        torch.testing.assert_close(res.samples, ref.samples, rtol=1e-9, atol=1e-10)
        assert not res.samples.requires_grad


# -- start from an image -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "em", "heun", "adaptive", "adaptive_sde_dpm_2m", "ode", "pc"])
def test_t_start_at_T_equals_a_plain_run(problem, name):
    sde, mix = problem
    gm = mix.unconditional
    kw = dict(solver=name, seed=5, dtype=torch.float64, **fast_options(name))
    x_T = sde.prior_sample(torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    plain = fastsde.sample(gm, sde, (6, 2), x_init=x_T, **kw)
    started = fastsde.sample(gm, sde, (6, 2), x_init=x_T, t_start=sde.T, x_init_noised=True, **kw)
    assert torch.equal(plain.samples, started.samples)
    assert started.config()["t_start"] == sde.T


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "em", "adaptive", "adaptive_sde_dpm_2m", "ode"])
def test_small_t_start_returns_nearly_the_input(problem, name):
    sde, mix = problem
    gm = mix.unconditional
    images = gm.sample(6, generator=torch.Generator().manual_seed(1))
    res = fastsde.sample(
        gm, sde, (6, 2), solver=name, seed=0, dtype=torch.float64, x_init=images, t_start=0.003, **fast_options(name)
    )
    sigma = float(sde.marginal_std(torch.tensor([0.003], dtype=torch.float64)))  # 0.019: the noise added
    assert float((res.samples - images).abs().max()) < 4 * sigma
    far = fastsde.sample(
        gm, sde, (6, 2), solver=name, seed=0, dtype=torch.float64, x_init=images, t_start=0.9, **fast_options(name)
    )
    assert float((far.samples - images).abs().max()) > 0.1  # from near T the image is forgotten


def test_t_start_noise_is_keyed_and_follows_the_grid(problem):
    """The noised image is m·x + σ·z with the sample's own z (same sample i for any batch size), and
    a one-step DDIM from t_start visits t_start first."""
    sde, mix = problem
    gm = mix.unconditional
    images = gm.sample(5, generator=torch.Generator().manual_seed(2))
    seen = []
    kw = dict(solver="ddim", steps=3, dtype=torch.float64, x_init=images, t_start=0.4, denoise=False)
    full = fastsde.sample(
        lambda x, t: (seen.append(float(t[0])), gm(x, t))[1], sde, (5, 2), seed=[7, 8, 9, 10, 11], **kw
    )
    assert seen[0] == pytest.approx(0.4)
    part = fastsde.sample(gm, sde, (2, 2), seed=[9, 10], **{**kw, "x_init": images[2:4]})
    torch.testing.assert_close(full.samples[2:4], part.samples, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"t_start": 1.5}, r"t_start must lie in \(0, 1\]"),
        ({"t_start": 1e-4}, r"t_start must satisfy"),
        ({"t_start": "half"}, r"t_start must be a number"),
        ({"t_start": 0.5, "x_init": None}, r"t_start needs x_init"),
        ({"t_start": 0.5, "x_init_noised": 1}, r"x_init_noised must be True or False"),
        ({"t_start": 0.5, "x_init": torch.zeros(3, 2)}, r"x_init must have shape \(4, 2\)"),
    ],
)
def test_bad_t_start_refused_before_compute(problem, kwargs, match):
    sde, mix = problem
    calls = []
    kw = {"x_init": torch.zeros(4, 2), **kwargs}
    with pytest.raises(ValueError, match=match):
        fastsde.sample(lambda x, t: calls.append(1) or x, sde, (4, 2), solver="ddim", steps=3, **kw)
    assert not calls


def test_log_likelihood_with_cond(problem):
    """log p(x | y) through cond= matches the exact class log-density (rows follow their labels)."""
    sde, mix = problem
    labels = torch.tensor([0, 1, 2, 1])
    x = torch.stack(
        [mix.classes[int(y)].sample(1, generator=torch.Generator().manual_seed(i))[0] for i, y in enumerate(labels)]
    )
    out = fastsde.log_likelihood(mix, sde, x, cond={"class_labels": labels}, rtol=1e-6, atol=1e-6)
    exact = torch.stack([mix.classes[int(y)].log_prob(x[i : i + 1])[0] for i, y in enumerate(labels)])
    torch.testing.assert_close(out.logp, exact, rtol=0, atol=0.02)
    with pytest.raises(ValueError, match=r"one row per sample \(shape\[0\] == n = 4\)"):
        fastsde.log_likelihood(mix, sde, x, cond={"class_labels": labels[:3]})

"""The exact per-mode Fréchet distance: closed forms, its floor, sensitivity to a shifted mode."""

from __future__ import annotations

import math

import pytest
import torch

import fastsde
from fastsde.metrics.mixture import frechet_gaussian, mixture_frechet, mixture_frechet_floor, mse


def _draw(gm, n: int, seed: int):
    """Exact draws with their component labels."""
    g = torch.Generator().manual_seed(seed)
    w, mean, std = gm.marginal_params(0.0)
    comp = torch.multinomial(w, n, replacement=True, generator=g)
    z = torch.randn((n, *gm.dims), generator=g, dtype=torch.float64)
    return mean[comp] + std[comp] * z, comp


def test_frechet_gaussian_closed_forms():
    # 1-D: (μ1 − μ2)² + (s1 − s2)²
    t64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    d = frechet_gaussian(t64([0.3]), t64([[0.04]]), t64([-0.1]), t64([[0.09]]))
    assert d == pytest.approx(0.4**2 + (0.2 - 0.3) ** 2, rel=1e-12)
    # commuting diagonal covariances: Σ (s1_i − s2_i)²
    s1, s2 = t64([0.1, 0.5, 2.0]), t64([0.3, 0.5, 1.0])
    d = frechet_gaussian(torch.zeros(3), torch.diag(s1**2), torch.zeros(3), torch.diag(s2**2))
    assert d == pytest.approx(float(((s1 - s2) ** 2).sum()), rel=1e-10)
    # identical Gaussians (full covariance): 0
    a = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cov = a @ a.T + 0.1 * torch.eye(4, dtype=torch.float64)
    assert frechet_gaussian(torch.ones(4), cov, torch.ones(4), cov) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("dim", [2, 8])
def test_exact_samples_sit_at_the_floor_and_floor_shrinks_with_n(dim):
    sde = fastsde.VPSDE()
    gm = fastsde.problems.mixture_2d(sde) if dim == 2 else fastsde.problems.mixture_nd(sde, dim=dim)
    floor, sd = mixture_frechet_floor(gm, 2000, draws=6, seed=1)
    vals = [mixture_frechet(_draw(gm, 2000, s)[0], gm).value for s in range(10, 14)]
    assert floor > 0 and sd > 0
    assert all(v < floor + 4 * sd for v in vals)
    # the floor is an O(1/n) estimation effect
    floor_big, _ = mixture_frechet_floor(gm, 8000, draws=6, seed=2)
    assert floor_big < 0.5 * floor


def test_distance_grows_with_a_shifted_mode():
    gm = fastsde.problems.mixture_nd(fastsde.VPSDE(), dim=8, modes=4, seed=0)
    x, comp = _draw(gm, 4000, seed=3)
    floor, _ = mixture_frechet_floor(gm, 4000, draws=4)
    w0 = float(gm.weights[0])
    prev = mixture_frechet(x, gm).value
    for shift in (0.05, 0.1, 0.2):
        y = x.clone()
        y[comp == 0] += shift  # every coordinate of mode 0 moved: ‖δ‖² = dim·shift²
        v = mixture_frechet(y, gm).value
        assert v > prev
        expected = w0 * 8 * shift**2
        assert v == pytest.approx(expected, abs=3 * floor + 0.2 * expected)
        prev = v


def test_wrong_std_and_wrong_weights_are_charged():
    gm = fastsde.problems.mixture_2d(fastsde.VPSDE())
    x, comp = _draw(gm, 4000, seed=4)
    floor, _ = mixture_frechet_floor(gm, 4000, draws=4)
    base = mixture_frechet(x, gm)
    # spread each mode by 30% around its own mean
    _, mean, _ = gm.marginal_params(0.0)
    wide = mean[comp] + 1.3 * (x - mean[comp])
    assert mixture_frechet(wide, gm).value > 5 * floor
    # drop half of mode 0: only the weight term and sampling noise change
    keep = (comp != 0) | (torch.arange(4000) % 2 == 0)
    r = mixture_frechet(x[keep], gm)
    assert r.weight_term > 10 * base.weight_term
    assert r.weights_hat[0] < float(gm.weights[0]) - 0.1


def test_non_finite_samples_and_bad_input():
    gm = fastsde.problems.mixture_2d(fastsde.VPSDE())
    x, _ = _draw(gm, 100, seed=5)
    x[3, 0] = math.nan
    assert mixture_frechet(x, gm).value == math.inf
    with pytest.raises(ValueError, match="shape"):
        mixture_frechet(torch.zeros(10, 3, dtype=torch.float64), gm)
    with pytest.raises(ValueError, match="draws"):
        mixture_frechet_floor(gm, 10, draws=0)


def test_mse():
    a = torch.zeros(4, 2)
    b = torch.full((4, 2), 0.5)
    assert mse(a, b) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="must match"):
        mse(a, torch.zeros(3, 2))


# ---------------------------------------------------------------------------------------------
# digits: the real-data floor table (mean and sd over train subsets) and its interpolation
# ---------------------------------------------------------------------------------------------


def _floor_table() -> tuple[list[int], list[float], list[float]]:
    from fastsde.metrics.digits import load_classifier

    meta = load_classifier()[1]
    ns = sorted(int(k) for k in meta["floor"])
    return ns, [meta["floor"][str(n)] for n in ns], [meta["floor_sd"][str(n)] for n in ns]


def test_digits_floor_table_decreases_with_n_and_has_an_sd():
    from fastsde.metrics.digits import FLOOR_SIZES, load_classifier

    ns, means, sds = _floor_table()
    assert tuple(ns) == FLOOR_SIZES
    assert load_classifier()[1]["floor_subsets"] >= 200
    # FD is biased upwards at small n: the mean falls with n (strictly, 1000 subsets per n)
    assert all(a > b for a, b in zip(means, means[1:], strict=False))
    assert means[0] > 10 * means[-1] / 2  # n = 16 is far above the whole-split value
    # the sd is present, positive below the whole split, and shrinks with n (0 at n = 1497: one subset)
    assert all(s > 0 for s in sds[:-1]) and sds[-1] == 0.0
    assert all(a > b for a, b in zip(sds, sds[1:], strict=False))
    # a single FD at n = 300 is noisy: sd well above 1 FD unit but below the mean
    i = ns.index(300)
    assert 1.0 < sds[i] < means[i]


def test_floor_for_interpolates_in_inverse_n():
    from fastsde.metrics.digits import digits_quality, floor_for, floor_sd_for

    ns, means, sds = _floor_table()
    for n, m, s in zip(ns, means, sds, strict=True):
        assert floor_for(n) == pytest.approx(m, rel=1e-12)
        assert floor_sd_for(n) == pytest.approx(s, rel=1e-12, abs=1e-12)
    # between two table points: linear in 1/n, so the midpoint in 1/n gets the mean of the two values
    a, b = ns.index(200), ns.index(256)
    mid = 1.0 / (0.5 / 200 + 0.5 / 256)
    assert floor_for(mid) == pytest.approx(0.5 * (means[a] + means[b]), rel=1e-9)
    assert floor_for(220) < floor_for(200) and floor_for(220) > floor_for(256)
    assert floor_sd_for(220) < floor_sd_for(200) and floor_sd_for(220) > floor_sd_for(256)
    # clamped outside the table, and n < 2 is refused
    assert floor_for(5000) == pytest.approx(means[-1]) and floor_for(8) == pytest.approx(means[0])
    with pytest.raises(ValueError, match="n >= 2"):
        floor_for(1)
    q = digits_quality(torch.zeros(220, 1, 8, 8))
    assert q["floor"] == floor_for(220) and q["floor_sd"] == floor_sd_for(220)


def test_compute_floor_is_deterministic_and_matches_the_shipped_table():
    from fastsde.metrics.digits import compute_floor

    ns, means, sds = _floor_table()
    a = compute_floor((64, 300), subsets=16, seed=0)
    assert a[300] == compute_floor((300,), subsets=16, seed=0)[300]  # each n has its own stream
    assert a[64] != compute_floor((64,), subsets=2, seed=1)[64]
    assert all(r["subsets"] == 16 for r in a.values())
    # 16 subsets agree with the shipped 1000-subset mean and sd up to their sampling error
    for n in (64, 300):
        i = ns.index(n)
        assert abs(a[n]["mean"] - means[i]) < 4 * sds[i] / math.sqrt(16)
        assert 0.4 * sds[i] < a[n]["sd"] < 2.0 * sds[i]
    # the whole split is one subset: reproduces the shipped value up to eigensolver rounding, which
    # moves with the torch build (2.13 reproduces it to 1e-9, 2.14 differs by 4e-7)
    full = compute_floor((1497,), subsets=2)[1497]
    assert full["subsets"] == 1 and full["sd"] == 0.0
    assert full["mean"] == pytest.approx(means[-1], rel=1e-6)
    with pytest.raises(ValueError, match="sizes"):
        compute_floor((1,))
    with pytest.raises(ValueError, match="subsets"):
        compute_floor((64,), subsets=1)

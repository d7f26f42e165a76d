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

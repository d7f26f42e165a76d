"""The learned ML-EM schedule (issue 15): the fit's recursion is the solver's, its forward-mode
tangent is the derivative of the solve, its gradient estimate agrees with finite differences of the
objective, and the schedule file is keyed, saved, loaded and refused for another run."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor

import fastsde
from fastsde.fitting import mlem as mf
from fastsde.noise import NoiseSource, Stream
from fastsde.problems import mixture_2d
from fastsde.solvers import SOLVERS

F64 = torch.float64
SDE = fastsde.VPSDE()


def level(k: int):
    gm = mixture_2d(SDE)

    def f(x: Tensor, t: Tensor) -> Tensor:
        return gm(x, t) + 2.0**-k * torch.sin(3.0 * x + k) / SDE.marginal_std(t)[:, None]

    return f


LEVELS = fastsde.Levels([level(1), level(2), level(3)], costs=[1.0, 4.0, 16.0])


def make_path(n: int, steps: int, base: str = "em", seed: int = 3):
    opts = SOLVERS["mlem"].resolve(SDE, {"steps": steps, "base": base}, SDE.default_t_end)
    grid = mf.schedule_grid(SDE, opts, SDE.default_t_end)
    src = NoiseSource.from_seed(seed, n)
    x_T = SDE.prior_sample(src.normal((2,), Stream.PRIOR, 0, dtype=F64))
    return mf._Path(LEVELS, SDE, grid, base, 0.0, x_T, src), grid, src


@pytest.mark.parametrize("base", ["em", "ddim"])
def test_the_fit_recursion_is_the_solver(base):
    """With the same noise source, the fit's ML-EM solve equals fastsde.sample(solver="mlem") for
    the same schedule: what the fit optimises is what the solver runs."""
    n, steps = 64, 30
    path, grid, src = make_path(n, steps, base)
    p = torch.tensor([0.4, 0.15], dtype=F64)

    x, _, _ = path.run(p.expand(steps - 1, 2), None, src)
    res = fastsde.sample(LEVELS, SDE, (n, 2), solver="mlem", steps=steps, base=base, p=lambda t: p, seed=3, dtype=F64)
    assert torch.allclose(path.denoise(x), res.samples, rtol=1e-12, atol=1e-12)


def test_tangent_is_the_derivative_of_the_solve():
    """The forward-mode tangent along a direction in p equals a central difference of the solve
    with the draws held fixed (a tiny change of p flips no draw)."""
    n, steps = 32, 25
    path, grid, _ = make_path(n, steps)
    draws = NoiseSource.from_seed(9, n)
    p = torch.tensor([0.5, 0.3], dtype=F64).expand(steps - 1, 2).clone()
    direction = torch.linspace(0.2, 1.0, steps - 1, dtype=F64)[:, None] * torch.tensor([1.0, -0.5], dtype=F64)
    x, _, tan = path.run(p, None, draws, direction)
    x0, tan0 = path.final(x, tan)
    d = 1e-7
    hi = path.denoise(path.run(p + d * direction, None, draws)[0])
    lo = path.denoise(path.run(p - d * direction, None, draws)[0])
    fd = (hi - lo) / (2 * d)
    assert float((tan0 - fd).norm() / fd.norm()) < 5e-3  # the Jacobian is a forward difference (~1e-3)


def test_gradient_estimate_agrees_with_finite_differences():
    """The likelihood-ratio part plus the forward-mode part, averaged over draws, matches a central
    difference of the MSE (common draws) for a constant logit per correction."""
    n, steps = 256, 12
    path, grid, _ = make_path(n, steps)
    ref = path.reference()
    basis = torch.ones(steps - 1, 1, dtype=F64)
    theta = torch.tensor([[1.0], [0.0]], dtype=F64)
    p_min = 1e-3
    sig = torch.sigmoid(basis @ theta.T)
    jac = torch.zeros(2, steps - 1, 2, dtype=F64)
    for k in range(2):
        jac[k, :, k] = (1 - p_min) * sig[:, k] * (1 - sig[:, k])

    def mse(th, seed):
        x, _, _ = path.run(mf.probabilities(th, basis, p_min), None, NoiseSource.from_seed(seed, n))
        return float((path.denoise(x) - ref).pow(2).mean(1).mean())

    reps = 12
    for m in range(2):  # the estimate's spread is about twice the difference's: twice the draws
        e = torch.zeros_like(theta)
        e.view(-1)[m] = 0.25
        fd = sum(mse(theta + e, 100 + r) - mse(theta - e, 100 + r) for r in range(reps)) / (0.5 * reps)
        est = []
        for r in range(2 * reps):
            x, lrs, tan = path.run(
                mf.probabilities(theta, basis, p_min), jac, NoiseSource.from_seed(500 + r, n), jac[m]
            )
            x0, tan0 = path.final(x, tan)
            resid = (x0 - ref).flatten(1)
            F = resid.pow(2).mean(1)
            b = (F.sum() - F) / (n - 1)
            est.append(float(((F - b) * lrs[:, m]).mean()) + float((2 * resid * tan0.flatten(1)).mean(1).mean()))
        mean = sum(est) / len(est)
        assert fd < 0 and mean < 0  # more evaluations, smaller error
        assert abs(mean - fd) < 0.4 * abs(fd), (m, mean, fd)


@pytest.fixture(scope="module")
def fitted():
    return mf.fit_mlem(LEVELS, SDE, (2,), steps=20, n=32, seed=0, iters=2, lr=0.1, dtype=F64)


def test_fit_returns_a_keyed_schedule_no_worse_than_its_start(fitted, tmp_path):
    s = fitted
    assert s.corrections == 2 and s.theta.shape == (2, 3)
    assert s.fit["objective_best"] <= s.fit["objective_start"]
    assert s.fit["fit_compute"] > 0 and s.fit["lambda"] > 0
    p = s.probabilities(torch.linspace(1.0, 1e-3, 50, dtype=F64))
    assert bool(((p > s.p_min - 1e-15) & (p <= 1)).all())
    path = s.save(tmp_path / "sched.safetensors")
    back = fastsde.load_mlem(path)
    assert torch.equal(back.theta, s.theta) and back.key == s.key
    t = torch.tensor([0.9, 0.2], dtype=F64)
    assert torch.equal(back.probabilities(t), s.probabilities(t))


def test_sampling_with_a_learned_schedule_records_it(fitted):
    res = fastsde.sample(LEVELS, SDE, (16, 2), solver="mlem", steps=20, p=fitted, seed=4, dtype=F64)
    cfg = res.config()
    json.dumps(cfg)
    assert cfg["multilevel"]["rule"] == "learned" and cfg["p"]["kind"] == "learned"
    sched = fitted.probabilities(mf.schedule_grid(SDE, SOLVERS["mlem"].resolve(SDE, {"steps": 20}, 1e-3), 1e-3)[:-1])
    expected = fastsde.solvers.mlem_schedule.expected_cost(sched, LEVELS.costs) + LEVELS.costs[-1]  # with the denoise
    assert cfg["multilevel"]["expected_cost"] == pytest.approx(expected, rel=1e-9)


def test_a_schedule_for_another_run_is_refused(fitted):
    calls = []

    def spy(x, t):  # another finest level (a different model)
        calls.append(x.shape[0])
        return level(4)(x, t)

    with pytest.raises(ValueError, match="steps is 20 in the schedule, 30 in the run"):
        fastsde.sample(LEVELS, SDE, (8, 2), solver="mlem", steps=30, p=fitted, seed=0, dtype=F64)
    other = fastsde.Levels([level(1), level(2), spy], costs=[1.0, 4.0, 16.0])
    with pytest.raises(ValueError, match=r"levels\[2\] is not the model"):
        fastsde.sample(other, SDE, (8, 2), solver="mlem", steps=20, p=fitted, seed=0, dtype=F64)
    assert sum(calls) <= 8  # only the fingerprint probe, no samples
    two = fastsde.Levels([level(1), level(3)], costs=[1.0, 16.0])
    with pytest.raises(ValueError, match="learned schedule for 3 levels"):
        fastsde.sample(two, SDE, (8, 2), solver="mlem", steps=20, p=fitted, seed=0, dtype=F64)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=1), "n must be at least 2"),
        (dict(iters=0), "iters must be a positive integer"),
        (dict(lam=-1.0), "lam must be None or a non-negative number"),
        (dict(lr=0.0), "lr must be a positive number"),
        (dict(degree=-1), "degree must be a non-negative integer"),
    ],
)
def test_bad_fit_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mf.fit_mlem(LEVELS, SDE, (2,), steps=20, **kwargs)


def test_fit_needs_levels():
    with pytest.raises(ValueError, match="at least 2 levels"):
        mf.fit_mlem(level(1), SDE, (2,), steps=20)


def test_not_a_schedule_file(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not an ML-EM schedule file"):
        fastsde.load_mlem(bad)
    with pytest.raises(FileNotFoundError):
        fastsde.load_mlem(tmp_path / "missing.safetensors")

"""fastsde.fit_grid: the GITS dynamic programme, the fitted grid against the default one on an exact
mixture (held-out seeds), explicit grids in every fixed-grid solver, and the key of a saved grid."""

from __future__ import annotations

import itertools
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import fastsde
from fastsde.fitting.grid import gits_dp, move_costs, path_cost

F64 = torch.float64


@pytest.fixture(scope="module")
def edm_mixture():
    sde = fastsde.EDM()
    return sde, fastsde.problems.mixture_nd(sde, dim=8, modes=3, seed=2)


@pytest.fixture(scope="module")
def fitted(edm_mixture):
    sde, gm = edm_mixture
    return fastsde.fit_grid(gm, sde, solver="dpmpp_2m", steps=5, n=64, seed=0, shape=(8,), M=30, sweeps=1)


@pytest.mark.parametrize("m,moves", [(6, 1), (6, 3), (9, 4), (12, 5), (12, 11)])
def test_dp_equals_brute_force(m, moves):
    """Over every path of `moves` moves through a fine grid of m intervals, the DP's is the cheapest."""
    g = torch.Generator().manual_seed(m * 10 + moves)
    cost = torch.rand(m + 1, m + 1, generator=g, dtype=F64) + 0.1
    cost = torch.where(torch.triu(torch.ones_like(cost, dtype=torch.bool), 1), cost, math.inf)
    path, value = gits_dp(cost, moves, gamma=1.15)
    best = min(path_cost(cost, [0, *inner, m], 1.15) for inner in itertools.combinations(range(1, m), moves - 1))
    assert len(path) == moves + 1 and path[0] == 0 and path[-1] == m
    assert all(a < b for a, b in zip(path, path[1:]))
    assert value == pytest.approx(best, rel=1e-12)
    assert path_cost(cost, path, 1.15) == pytest.approx(value, rel=1e-12)


def test_dp_refuses_impossible_moves():
    cost = torch.ones(5, 5, dtype=F64)
    with pytest.raises(ValueError, match=r"moves must be in \[1, 4\]"):
        gits_dp(cost, 5)


def test_move_cost_is_zero_on_the_ddim_path():
    """A teacher that is itself the DDIM step from one state has zero cost for those moves."""
    sde = fastsde.VPSDE()
    t = torch.tensor([1.0, 0.5, 0.1, 1e-3], dtype=F64)
    x0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    d = torch.stack([x0] * 3)
    lam, sig, m = sde.log_snr(t), sde.marginal_std(t), sde.mean_coeff(t)
    xs = [torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=F64)]
    for j in range(1, 4):  # DDIM with a constant data prediction is exact along the whole path
        xs.append(sig[j] / sig[0] * xs[0] - m[j] * torch.expm1(-(lam[j] - lam[0])) * x0)
    cost = move_costs(sde, t, torch.stack(xs), d)
    assert float(cost[0, 1:].abs().max()) < 1e-12 and float(cost[1, 3]) < 1e-12


def test_fitted_grid_shape_record_and_determinism(edm_mixture, fitted):
    sde, gm = edm_mixture
    times = fitted.times
    assert times.dtype == F64 and times.numel() == 5
    assert float(times[0]) == sde.T and float(times[-1]) == sde.default_t_end
    assert bool((times[:-1] > times[1:]).all())
    rec = fitted.record
    assert rec["teacher"] == "lms" and rec["M"] == 30 and rec["n"] == 64 and rec["seed"] == 0
    assert rec["metric"] == "l2" and rec["gamma"] == 1.15
    assert rec["loss_refined"] <= min(rec["loss_dp"], rec["loss_default"])
    assert rec["teacher_nfe_per_sample"] == 30 and rec["fit_nfe_per_sample"] > 30
    again = fastsde.fit_grid(gm, sde, solver="dpmpp_2m", steps=5, n=64, seed=0, shape=(8,), M=30, sweeps=1)
    assert torch.equal(again.times, times)
    other = fastsde.fit_grid(gm, sde, solver="dpmpp_2m", steps=5, n=64, seed=1, shape=(8,), M=30, refine=False)
    assert other.record["refined"] is False and not torch.equal(other.times, times)


def _err(gm, sde, solver, seed, n=256, **kw):
    ref = fastsde.sample(gm, sde, (n, 8), solver="ode", seed=seed, dtype=F64, rtol=1e-9, atol=1e-9).samples
    out = fastsde.sample(gm, sde, (n, 8), solver=solver, seed=seed, dtype=F64, **kw).samples
    return float((out - ref).pow(2).sum(1).mean())


def test_fitted_grid_beats_default_on_held_out_seeds(edm_mixture, fitted):
    """On seeds the fit never saw, the fitted grid's error against the exact ODE solution from the same
    noise is below the default (Karras) grid's at the same NFE."""
    sde, gm = edm_mixture
    for seed in (11, 12):
        default = _err(gm, sde, "dpmpp_2m", seed, steps=5)
        fit = _err(gm, sde, "dpmpp_2m", seed, steps=5, grid=fitted)
        assert fit < 0.8 * default, (seed, fit, default)


def test_fitted_grid_on_vp_and_for_heun():
    """VP (x/m ≠ x) and a two-evaluation solver: the fitted grid still beats the default."""
    sde = fastsde.VPSDE()
    gm = fastsde.problems.mixture_nd(sde, dim=8, modes=3, seed=2)
    g = fastsde.fit_grid(gm, sde, solver="heun", steps=4, n=64, seed=0, shape=(8,), M=24, sweeps=1)
    assert g.key["process"]["type"] == "VPSDE" and g.solver == "heun"
    default = _err(gm, sde, "heun", 21, n=128, steps=4)
    fit = _err(gm, sde, "heun", 21, n=128, steps=4, grid=g)
    assert fit < default


@pytest.mark.parametrize("solver", ["dpmpp_2m", "ddim", "heun", "euler", "dpmpp_3m"])
def test_explicit_grid_tensor_is_the_named_grid(solver):
    """grid=<the times of a named grid> gives the named grid's samples bit for bit."""
    sde = fastsde.VESDE()
    gm = fastsde.problems.mixture_2d(sde)
    spec = fastsde.SOLVERS[solver]
    name = spec.options["grid"].default_for(sde)
    times = fastsde.time_grid(sde, name, 6, sde.T, sde.default_t_end)
    a = fastsde.sample(gm, sde, (8, 2), solver=solver, steps=6, seed=3, dtype=F64)
    b = fastsde.sample(gm, sde, (8, 2), solver=solver, steps=6, seed=3, dtype=F64, grid=times)
    c = fastsde.sample(gm, sde, (8, 2), solver=solver, steps=6, seed=3, dtype=F64, grid=times.tolist())
    assert torch.equal(a.samples, b.samples) and torch.equal(a.samples, c.samples)


class _Recorder:
    def __init__(self, score):
        self.score, self.calls = score, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.score(x, t)


@pytest.mark.parametrize(
    "grid,steps,match",
    [
        (torch.tensor([80.0, 1.0, 0.002], dtype=F64), 4, r"explicit grid has 3 points but steps = 4: pass steps=3"),
        (torch.tensor([80.0, 5.0, 7.0, 0.002], dtype=F64), 4, r"strictly decreasing"),
        (torch.tensor([80.0, math.nan, 0.002], dtype=F64), 3, r"must be finite"),
        (torch.tensor([[80.0, 0.002]], dtype=F64), 2, r"1-D tensor"),
        (torch.tensor([70.0, 1.0, 0.002], dtype=F64), 3, r"first time is 70.0, the run's is 80"),
        (torch.tensor([80.0, 1.0, 0.01], dtype=F64), 3, r"last time is 0.01, the run's is 0.002"),
        ("karras", 3, r"grid must be one of \['uniform', 'edm', 'logsnr', 'quadratic'\]"),
        ({"a": 1}, 3, r"a decreasing 1-D tensor of times or a fitted grid"),
    ],
)
def test_bad_explicit_grids_refused_before_compute(grid, steps, match):
    sde = fastsde.EDM()
    rec = _Recorder(fastsde.problems.mixture_2d(sde))
    with pytest.raises(ValueError, match=match):
        fastsde.sample(rec, sde, (4, 2), solver="dpmpp_2m", steps=steps, grid=grid)
    assert rec.calls == 0


def test_save_load_round_trip_and_key_mismatches(tmp_path, edm_mixture, fitted):
    sde, gm = edm_mixture
    path = fitted.save(tmp_path / "g.safetensors")
    back = fastsde.load_grid(path)
    assert torch.equal(back.times, fitted.times) and back.key == fitted.key
    assert back.record["loss_refined"] == fitted.record["loss_refined"]
    ok = fastsde.sample(gm, sde, (4, 8), solver="dpmpp_2m", steps=5, grid=back, seed=5, dtype=F64)
    plain = fastsde.sample(gm, sde, (4, 8), solver="dpmpp_2m", steps=5, grid=back.times, seed=5, dtype=F64)
    assert torch.equal(ok.samples, plain.samples)
    cases = [
        (dict(solver="dpmpp_3m"), r"solver is 'dpmpp_2m' in the grid, 'dpmpp_3m' in the run"),
        (dict(lower_order_final=False), r"option lower_order_final is True in the grid, False in the run"),
        (dict(t_end=0.01), r"t_end is 0.002 in the grid, 0.01 in the run"),
    ]
    for kw, match in cases:
        args = {**dict(solver="dpmpp_2m", steps=5, grid=back, seed=5, dtype=F64), **kw}
        with pytest.raises(ValueError, match=match):
            fastsde.sample(gm, sde, (4, 8), **args)
    with pytest.raises(ValueError, match=r"process is .* in the grid"):
        sde2 = fastsde.EDM(sigma_min=0.002, sigma_max=40.0)
        fastsde.sample(
            fastsde.problems.mixture_nd(sde2, dim=8, modes=3, seed=2),
            sde2,
            (4, 8),
            solver="dpmpp_2m",
            steps=5,
            grid=back,
        )
    other = fastsde.problems.mixture_nd(sde, dim=8, modes=3, seed=3)
    with pytest.raises(ValueError, match=r"fitted grid does not match this run: model"):
        fastsde.sample(other, sde, (4, 8), solver="dpmpp_2m", steps=5, grid=back, dtype=F64)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="is not a fitted grid file"):
        fastsde.load_grid(tmp_path / "bad.safetensors")


def test_fit_grid_bad_input():
    sde = fastsde.EDM()
    gm = fastsde.problems.mixture_2d(sde)
    with pytest.raises(ValueError, match="fit_grid needs a fixed-grid solver"):
        fastsde.fit_grid(gm, sde, solver="ode", steps=5, n=4, shape=(2,))
    with pytest.raises(ValueError, match="needs a fine grid of at least 9 intervals, got M = 8"):
        fastsde.fit_grid(gm, sde, solver="dpmpp_2m", steps=10, n=4, shape=(2,), M=8)
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        fastsde.fit_grid(gm, sde, steps=5, n=4, shape=(2,), gamma=-1.0)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        fastsde.fit_grid(gm, sde, steps=5, n=0, shape=(2,))


def test_cli_fit_grid_then_sample_with_it(tmp_path, capsys):
    """`fastsde fit-grid` writes one keyed file per step count; `fastsde sample --grid FILE` uses it
    (its steps by default); a mismatched --steps and a bad file are one-line errors (exit 2)."""
    from fastsde.cli import main

    out = tmp_path / "grids"
    fit = ["fit-grid", "--model", "mixture", "--solver", "dpmpp_2m", "--steps", "3,4", "--n", "16"]
    assert main([*fit, "--fine", "12", "--sweeps", "1", "--out", str(out)]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["mixture-dpmpp_2m-3.safetensors", "mixture-dpmpp_2m-4.safetensors"]
    assert "loss default" in capsys.readouterr().out
    grid = out / "mixture-dpmpp_2m-4.safetensors"
    args = ["sample", "--model", "mixture", "--solver", "dpmpp_2m", "--n", "16", "--no-metric"]
    assert main([*args, "--grid", str(grid), "--out", str(tmp_path / "s.npz")]) == 0
    assert "NFE 4.0 per sample" in capsys.readouterr().out
    assert main([*args, "--grid", str(grid), "--steps", "5", "--out", str(tmp_path / "t.npz")]) == 2
    assert "steps" in capsys.readouterr().err
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    assert main([*args, "--grid", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "u.npz")]) == 2
    assert "is not a fitted grid file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Shipped grids (benchmarks/fit_digits_grids.py) and IIA on a fitted grid
# ---------------------------------------------------------------------------------------------

SHIPPED = fastsde.shipped_grids()


@pytest.mark.skipif(not SHIPPED, reason="no shipped fitted grids")
def test_shipped_grids_are_keyed_to_their_model_and_used_by_it():
    """Each shipped grid names its model, solver and steps in its file name and key, runs on the
    model it was fitted for (fingerprint checked), and is refused by another shipped model."""
    from fastsde.artifacts.grid import grid_file_name, shipped_grid

    model = fastsde.load_model("digits")
    small = fastsde.load_model("digits-small")
    for name in SHIPPED:
        stem, solver, steps = name.removesuffix(".safetensors").rsplit("-", 2)
        grid = shipped_grid(stem, solver, int(steps))
        assert grid is not None and grid_file_name(stem, solver, grid.steps) == name
        assert grid.key["model"]["name"] == stem == "digits" and grid.solver == solver
        t = grid.times
        assert t.numel() == int(steps) and t[0] == model.sde.T and bool((t[1:] < t[:-1]).all())
        assert grid.record["loss_refined"] <= grid.record["loss_default"]
        res = fastsde.sample(model.score, model.sde, (2, *model.shape), solver=solver, steps=grid.steps, grid=grid)
        assert res.samples.isfinite().all()
    name = SHIPPED[0].removesuffix(".safetensors").rsplit("-", 2)
    grid = shipped_grid(name[0], name[1], int(name[2]))
    with pytest.raises(ValueError, match="fitted grid does not match this run: model"):
        fastsde.sample(small.score, small.sde, (2, *small.shape), solver=name[1], steps=grid.steps, grid=grid)
    assert shipped_grid("digits", "unipc", 99) is None


@pytest.mark.skipif("digits-unipc-5.safetensors" not in SHIPPED, reason="no shipped unipc grid")
def test_cli_sample_with_the_shipped_grid(tmp_path, capsys):
    """`--grid fitted` takes the shipped grid for --model/--solver/--steps; without --steps, or with a
    step count nothing is shipped for, it is a one-line error naming what is shipped (exit 2)."""
    from fastsde.artifacts.grid import shipped_grid
    from fastsde.cli import main

    args = ["sample", "--solver", "unipc", "--n", "4", "--no-metric", "--grid", "fitted"]
    assert main([*args, "--steps", "5", "--out", str(tmp_path / "s.npz")]) == 0
    assert "NFE 5.0 per sample" in capsys.readouterr().out
    record = json.loads((tmp_path / "s.npz.json").read_text())
    assert record["options"]["grid"]["times"] == shipped_grid("digits", "unipc", 5).times.tolist()
    assert record["options"]["grid"]["fitted_for"]["solver"] == "unipc"
    assert main([*args, "--out", str(tmp_path / "t.npz")]) == 2
    assert "--grid fitted needs --steps" in capsys.readouterr().err
    assert main([*args, "--steps", "37", "--out", str(tmp_path / "u.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no fitted grid is shipped for model 'digits', solver 'unipc', steps 37" in err
    assert "digits-unipc-5" in err and "\n" not in err
    assert not (tmp_path / "u.npz").exists()
    # into a run folder: the grid's times are part of the run's identity
    assert main([*args, "--steps", "5", "--shard-size", "2", "--out", f"{tmp_path / 'run'}/"]) == 0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["settings"]["options"]["grid"]["times"] == shipped_grid("digits", "unipc", 5).times.tolist()
    single = torch.from_numpy(np.load(tmp_path / "s.npz")["samples"]).float()
    torch.testing.assert_close(fastsde.load_samples(tmp_path / "run"), single, rtol=0, atol=1e-4)


def test_iia_table_fitted_on_a_fitted_grid():
    """An IIA solver runs on the grid fitted for its base solver; its table keys the explicit times
    (saved and loaded as such) and is refused on any other grid."""
    sde = fastsde.VPSDE()
    gm = fastsde.problems.mixture_nd(sde, dim=4, modes=3, seed=1)
    grid = fastsde.fit_grid(gm, sde, solver="dpmpp_2m", steps=5, n=32, seed=0, shape=(4,), M=20, sweeps=1)
    table = fastsde.fit_iia(gm, sde, solver="iia_dpmpp_2m", steps=5, n=64, seed=0, shape=(4,), grid=grid)
    assert table.key["options"]["grid"] == "explicit"
    with tempfile.TemporaryDirectory() as d:
        back = fastsde.load_iia(table.save(Path(d) / "t.safetensors"))
    kw = dict(solver="iia_dpmpp_2m", steps=5, seed=3, dtype=F64)
    res = fastsde.sample(gm, sde, (256, 4), grid=grid, table=back, **kw)
    same = fastsde.sample(gm, sde, (256, 4), grid=grid.times, table=table, **kw)
    assert torch.equal(res.samples, same.samples) and res.nfe == 5
    base = fastsde.sample(gm, sde, (256, 4), solver="dpmpp_2m", steps=5, grid=grid, seed=3, dtype=F64)
    exact = fastsde.sample(gm, sde, (256, 4), solver="ode", seed=3, dtype=F64, rtol=1e-8, atol=1e-8)
    err_iia = ((res.samples - exact.samples) ** 2).mean()
    err_base = ((base.samples - exact.samples) ** 2).mean()
    assert err_iia < err_base  # held-out seed: the table still corrects the base solver on this grid
    with pytest.raises(ValueError, match="grid"):
        fastsde.sample(gm, sde, (4, 4), table=table, **kw)
    with pytest.raises(ValueError, match="solver is 'dpmpp_2m' in the grid, 'dpmpp_3m' in the run"):
        fastsde.sample(gm, sde, (4, 4), solver="dpmpp_3m", steps=5, grid=grid)


@pytest.mark.skipif("digits-unipc-5.safetensors" not in SHIPPED, reason="no shipped unipc grid")
def test_a_model_is_known_by_its_weights_not_its_path(tmp_path):
    """A model folder holding the shipped digits weights, moved to another path, still takes the grid fitted
    for digits (the fingerprint's name is a label; the weights are the identity); other weights are refused."""
    import shutil
    from importlib import resources

    from fastsde.artifacts.grid import shipped_grid

    weights = resources.files("fastsde").joinpath("_assets", "weights")
    first = tmp_path / "first"
    first.mkdir()
    for src, dst in (("digits.json", "config.json"), ("digits.safetensors", "model.safetensors")):
        (first / dst).write_bytes(weights.joinpath(src).read_bytes())
    moved = tmp_path / "elsewhere" / "moved"
    shutil.move(str(first), str(moved))
    model = fastsde.load_model(str(moved))
    grid = shipped_grid("digits", "unipc", 5)
    res = fastsde.sample(model.score, model.sde, (2, *model.shape), solver="unipc", steps=5, grid=grid)
    assert res.samples.isfinite().all()
    small = fastsde.load_model("digits-small")
    with pytest.raises(ValueError, match=r"fitted for model 'digits' \(weights"):
        fastsde.sample(small.score, small.sde, (2, *small.shape), solver="unipc", steps=5, grid=grid)

"""IIA (issue 16): zero coefficients are the base solver bit for bit; on an exact Gaussian the fit
recovers the ideal per-step coefficients; the per-step error against the fine reference drops on
held-out noise; a table is refused for a run it does not match; tables round-trip through files;
the fit is deterministic under its seed; the CLI fits, finds shipped tables and says how to make a
missing one. Exact Gaussian mixtures in float64, few samples, few steps."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fastsde
from fastsde.artifacts.iia_table import IIATable, read_shipped, shipped_tables
from fastsde.cli import main
from fastsde.fitting.iia import iia_step_errors
from fastsde.problems import mixture_2d, mixture_nd
from fastsde.score import GaussianMixture

F64 = torch.float64
BASES = {"iia_heun": "heun", "iia_ddim": "ddim", "iia_dpmpp_2m": "dpmpp_2m"}
VARIANTS = [("iia_heun", {}), ("iia_heun", {"variant": "biia"}), ("iia_ddim", {}), ("iia_dpmpp_2m", {})]
IDS = ["heun", "heun-biia", "ddim", "dpmpp_2m"]


def processes() -> dict[str, fastsde.SDE]:
    return {"vp": fastsde.VPSDE(), "edm": fastsde.EDM()}


def zero_like(table: IIATable) -> IIATable:
    return IIATable(torch.zeros_like(table.coefficients), table.key, table.directions, table.fit, table.probe)


@pytest.fixture(scope="module")
def fitted() -> dict[tuple[str, str, str], tuple[GaussianMixture, IIATable]]:
    """One small fit per (process, solver, variant) on the 16-D mixture (steps 5, n 64)."""
    out = {}
    for pname, sde in processes().items():
        gm = mixture_nd(sde, dim=16)
        for (solver, opts), vid in zip(VARIANTS, IDS):
            out[(pname, vid)] = gm, fastsde.fit_iia(gm.score, sde, solver=BASES[solver], steps=5, n=64, seed=0, **opts)
    return out


# ---------------------------------------------------------------------------------------------
# Zero coefficients are the base solver
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("pname", ["vp", "edm"])
@pytest.mark.parametrize("case", range(len(VARIANTS)), ids=IDS)
def test_zero_coefficients_reproduce_the_base_solver_bit_for_bit(fitted, case, pname, dtype):
    solver, opts = VARIANTS[case]
    gm, table = fitted[(pname, IDS[case])]
    sde = gm.sde
    kw = dict(steps=5, seed=3, dtype=dtype)
    base = fastsde.sample(gm.score, sde, (9, 16), solver=BASES[solver], **kw)
    none = fastsde.sample(gm.score, sde, (9, 16), solver=solver, **opts, **kw)
    zero = fastsde.sample(gm.score, sde, (9, 16), solver=solver, table=zero_like(table), **opts, **kw)
    assert torch.equal(base.samples, none.samples) and torch.equal(base.samples, zero.samples)
    assert base.nfe_per_sample.tolist() == zero.nfe_per_sample.tolist()
    fit = fastsde.sample(gm.score, sde, (9, 16), solver=solver, table=table, **opts, **kw)
    assert fit.nfe_per_sample.tolist() == base.nfe_per_sample.tolist()  # no extra NFE
    assert not torch.equal(fit.samples, base.samples)


# ---------------------------------------------------------------------------------------------
# The fit recovers the ideal coefficients on an exact Gaussian
# ---------------------------------------------------------------------------------------------


def _gaussian(sde: fastsde.SDE) -> GaussianMixture:
    """N(0, 0.3² I) in 3-D: x̂ and every step's flow map are multiples of x, so the ideal correction
    lies in the span of the first direction and the fit can be exact."""
    return GaussianMixture([1.0], torch.zeros(1, 3, dtype=F64), torch.full((1, 3), 0.3, dtype=F64), sde)


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "heun"])
@pytest.mark.parametrize("pname", ["vp", "edm"])
def test_fit_recovers_the_ideal_coefficients_on_a_gaussian(solver, pname):
    sde = processes()[pname]
    gm = _gaussian(sde)
    table = fastsde.fit_iia(gm.score, sde, solver=solver, steps=5, n=16, seed=0, fine_steps=8)
    # every step's fitted correction reproduces the fine solve: the residual is rounding
    for base, iia in zip(table.fit["mse_base"], table.fit["mse_iia"]):
        assert base > 1e-14 and iia < 1e-10 * base, (base, iia)
    if solver == "heun":
        return
    # the first step has one direction, x̂_0: its ideal coefficient in closed form is (Φ_fine − Φ)/x̂_0
    grid = fastsde.time_grid(sde, table.key["options"]["grid"], 5, sde.T, sde.default_t_end)
    x = torch.tensor([[0.7, -1.3, 2.1]], dtype=F64) * sde.prior_std
    kw = dict(dtype=F64, denoise=False, x_init=x, t_end=float(grid[1]), grid=table.key["options"]["grid"])
    extra = {"lower_order_final": False} if solver == "dpmpp_2m" else {}
    coarse = fastsde.sample(gm.score, sde, (1, 3), solver=solver, steps=2, **kw).samples
    fine = fastsde.sample(gm.score, sde, (1, 3), solver=solver, steps=9, **kw, **extra).samples
    t = torch.full((1,), sde.T, dtype=F64)
    x0 = sde.denoise(x, t, gm.score(x, t))
    ideal = (fine - coarse) / x0
    torch.testing.assert_close(ideal, ideal.mean().expand_as(ideal), rtol=1e-9, atol=0)  # one number
    assert float(table.coefficients[0, 0]) == pytest.approx(float(ideal.mean()), rel=1e-7)
    assert table.coefficients[0, 1:].abs().max() == 0  # no history on the first step


# ---------------------------------------------------------------------------------------------
# Held-out error drops
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pname", ["vp", "edm"])
@pytest.mark.parametrize("case", range(len(VARIANTS)), ids=IDS)
def test_per_step_error_drops_on_held_out_noise(fitted, case, pname):
    gm, table = fitted[(pname, IDS[case])]
    err = iia_step_errors(gm.score, gm.sde, table, n=64, seed=7)
    assert len(err["base"]) == len(err["iia"]) == table.steps - 1
    assert sum(err["iia"]) < 0.9 * sum(err["base"]), err
    for base, iia in zip(err["base"], err["iia"]):
        assert iia <= 1.05 * base + 1e-15, err


def test_held_out_final_error_drops_against_an_accurate_solve(fitted):
    """Final samples, held-out seed, against an accurate PF-ODE solve from the same x_T."""
    gm, table = fitted[("vp", "dpmpp_2m")]
    sde = gm.sde
    kw = dict(seed=11, dtype=F64, steps=5)
    ref = fastsde.sample(gm.score, sde, (64, 16), solver="ode", seed=11, dtype=F64, rtol=1e-8, atol=1e-8).samples
    base = fastsde.sample(gm.score, sde, (64, 16), solver="dpmpp_2m", **kw).samples
    iia = fastsde.sample(gm.score, sde, (64, 16), solver="iia_dpmpp_2m", table=table, **kw).samples
    assert float((iia - ref).pow(2).mean()) < 0.8 * float((base - ref).pow(2).mean())


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self, score):
        self.score, self.calls = score, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.score(x, t)


def test_a_table_for_another_run_is_refused_naming_the_mismatch(fitted):
    gm, table = fitted[("vp", "dpmpp_2m")]
    sde = gm.sde
    rec = Recorder(gm.score)
    cases = [
        (dict(sde=fastsde.VPSDE(beta_max=19.0)), r"process is .* in the table"),
        (dict(sde=fastsde.EDM()), r"process is"),
        (dict(steps=6), r"steps is 5 in the table, 6 in the run"),
        (dict(t_end=2e-3), r"t_end is 0.001 in the table, 0.002 in the run"),
        (dict(grid="uniform"), r"option grid is 'logsnr' in the table, 'uniform' in the run"),
        (dict(lower_order_final=False), r"option lower_order_final is True in the table, False"),
        (dict(solver="iia_ddim"), r"solver is 'iia_dpmpp_2m' in the table, 'iia_ddim' in the run"),
    ]
    for change, message in cases:
        args = {"sde": sde, "solver": "iia_dpmpp_2m", "steps": 5, **change}
        with pytest.raises(ValueError, match=message):
            fastsde.sample(rec, args.pop("sde"), (4, 16), table=table, dtype=F64, **args)
        assert rec.calls == 0, f"{change}: the score was called before the error"
    other = mixture_nd(sde, dim=16, seed=1)  # another model, same shape
    with pytest.raises(ValueError, match=r"model: the score's outputs on the table's probe inputs differ"):
        fastsde.sample(other.score, sde, (4, 16), solver="iia_dpmpp_2m", steps=5, table=table, dtype=F64)
    with pytest.raises(ValueError, match=r"must be an IIA table"):
        fastsde.sample(gm.score, sde, (4, 16), solver="iia_dpmpp_2m", steps=5, table="t.safetensors")


def test_the_same_model_in_float32_is_accepted(fitted):
    gm, table = fitted[("edm", "dpmpp_2m")]
    res = fastsde.sample(gm.score, gm.sde, (4, 16), solver="iia_dpmpp_2m", steps=5, table=table)
    assert res.samples.dtype == torch.float32 and bool(torch.isfinite(res.samples).all())


# ---------------------------------------------------------------------------------------------
# Files and determinism
# ---------------------------------------------------------------------------------------------


def test_a_saved_table_round_trips(fitted, tmp_path):
    gm, table = fitted[("edm", "heun")]
    path = tmp_path / "t.safetensors"
    table.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]  # no temporary left behind
    data = path.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    meta = json.loads(header["__metadata__"]["fastsde"])
    assert meta["key"]["solver"] == "iia_heun" and meta["key"]["model"]["kind"] == "probe"
    back = fastsde.load_iia(path)
    assert torch.equal(back.coefficients, table.coefficients) and torch.equal(back.probe, table.probe)
    assert back.key == json.loads(json.dumps(table.key)) and back.directions == table.directions
    assert back.fit["nfe_per_sample"] > 0 and back.fit["seconds"] > 0 and back.fit["calls"] > 0
    kw = dict(solver="iia_heun", steps=5, seed=2, dtype=F64)
    a = fastsde.sample(gm.score, gm.sde, (5, 16), table=table, **kw)
    b = fastsde.sample(gm.score, gm.sde, (5, 16), table=back, **kw)
    assert torch.equal(a.samples, b.samples)
    (tmp_path / "bad.safetensors").write_bytes(b"not a table")
    with pytest.raises(ValueError, match="is not an IIA table file"):
        fastsde.load_iia(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError):
        fastsde.load_iia(tmp_path / "missing.safetensors")


def test_the_fit_is_deterministic_under_its_seed():
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)
    a = fastsde.fit_iia(gm.score, sde, solver="ddim", steps=4, n=32, seed=5, fine_steps=4)
    b = fastsde.fit_iia(gm.score, sde, solver="ddim", steps=4, n=32, seed=5, fine_steps=4)
    c = fastsde.fit_iia(gm.score, sde, solver="ddim", steps=4, n=32, seed=6, fine_steps=4)
    assert torch.equal(a.coefficients, b.coefficients) and a.key == b.key
    assert not torch.equal(a.coefficients, c.coefficients)
    # the fitting cost: 3 coarse moves at 1 NFE, each checked against 4 fine moves
    assert a.fit["nfe_per_sample"] == 3 * (1 + 4) and a.fit["n"] == 32
    assert a.coefficients.shape == (3, 3) and a.directions == ("x0", "x0-prev", "eps-prev")


def test_fit_iia_bad_input():
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)
    with pytest.raises(ValueError, match=r"solver must be one of \['ddim', 'dpmpp_2m', 'heun'\]"):
        fastsde.fit_iia(gm.score, sde, solver="euler", steps=4, n=8)
    with pytest.raises(ValueError, match=r"n must be an integer >= 1, got 0"):
        fastsde.fit_iia(gm.score, sde, steps=4, n=0)
    with pytest.raises(ValueError, match=r"give shape="):
        fastsde.fit_iia(lambda x, t: -x, sde, steps=4, n=8)
    with pytest.raises(ValueError, match=r"steps must be an integer >= 2"):
        fastsde.fit_iia(gm.score, sde, steps=1, n=8)


# ---------------------------------------------------------------------------------------------
# CLI and shipped tables
# ---------------------------------------------------------------------------------------------


def test_cli_fits_tables_and_samples_with_them(tmp_path, capsys):
    out = tmp_path / "tables"
    assert main(["fit-iia", "--model", "mixture", "--solver", "ddim", "--steps", "3,4", "--n", "16",
                 "--fine-steps", "3", "--out", str(out), "--quiet"]) == 0  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["mixture-ddim-3.safetensors", "mixture-ddim-4.safetensors"]
    table = out / "mixture-ddim-4.safetensors"
    png = tmp_path / "s.png"
    args = ["sample", "--model", "mixture", "--solver", "iia_ddim", "--steps", "4", "--n", "8", "--out", str(png)]
    assert main([*args, "--table", str(table)]) == 0
    assert "NFE 4.0 per sample" in capsys.readouterr().out
    args[args.index("4")] = "5"
    assert main([*args, "--table", str(table)]) == 2
    assert "steps is 4 in the table, 5 in the run" in capsys.readouterr().err


def test_cli_without_a_table_names_the_command_that_makes_one(capsys, tmp_path):
    png = str(tmp_path / "s.png")
    assert main(["sample", "--solver", "iia_dpmpp_2m", "--steps", "7", "--n", "2", "--out", png]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "fastsde fit-iia --model digits --solver dpmpp_2m --steps 7" in err


@pytest.mark.skipif("digits-dpmpp_2m-6.safetensors" not in shipped_tables(), reason="no shipped tables")
def test_shipped_table_makes_the_default_command_work(capsys, tmp_path):
    png = tmp_path / "s.png"
    assert (
        main(["sample", "--solver", "iia_dpmpp_2m", "--steps", "6", "--n", "4", "--no-metric", "--out", str(png)]) == 0
    )
    assert "NFE 6.0 per sample" in capsys.readouterr().out and png.is_file()
    for name in shipped_tables():
        table = read_shipped(name)
        assert table.key["model"]["kind"] == "shipped" and math.isfinite(table.fit["seconds"])
        assert sum(table.fit["mse_iia"]) < sum(table.fit["mse_base"])

"""Levels.from_models (measured FLOP costs) and `fastsde sample --solver mlem --levels ...`."""

from __future__ import annotations

import json

import pytest
import torch

import fastsde
from fastsde.cli import main
from fastsde.levels import forward_flops

LEVELS = "digits-small,digits,digits-large"


@pytest.fixture(scope="module")
def shipped() -> fastsde.Levels:
    return fastsde.Levels.from_models(LEVELS.split(","))


def test_flop_costs_increase_from_one(shipped):
    assert shipped.costs[0] == 1.0
    assert shipped.costs[0] < shipped.costs[1] < shipped.costs[2]
    assert shipped.flops_method == ["flop_counter"] * 3
    # the stored training record agrees with the measurement now
    assert shipped.flops == [float(m.config["flops_per_sample"]) for m in shipped.models]
    assert shipped.sde is not None and len(shipped) == 3


def test_forward_flops_falls_back_to_parameters():
    class Opaque(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, x, t):
            raise RuntimeError("cannot trace")

    with pytest.warns(UserWarning, match="FLOP counting failed"):
        assert forward_flops(Opaque(), (3,)) == (6.0, "parameters")


def test_from_models_refuses_bad_names():
    with pytest.raises(ValueError, match="at least 2"):
        fastsde.Levels.from_models(["digits"])
    with pytest.raises(ValueError, match="unknown model"):
        fastsde.Levels.from_models(["digits", "nope"])
    with pytest.raises(ValueError, match="one process"):
        fastsde.Levels.from_models(["digits", "digits-ve"])


def test_cli_prints_per_level_costs(tmp_path, capsys):
    out = tmp_path / "s.png"
    args = ["sample", "--solver", "mlem", "--levels", LEVELS, "--p", "0.2,0.05", "--steps", "20", "--n", "8"]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    for k, name in enumerate(LEVELS.split(","), start=1):
        assert f"level {k} {name}: " in text
    assert "level 1 digits-small: 19.00 evaluations per sample x cost 1.000" in text
    assert "EM with digits-large at the same steps: (19 moves + 1 denoise)" in text and "ratio EM / ML-EM" in text
    assert "quality: FD" in text
    rec = json.loads((tmp_path / "s.png.json").read_text())
    assert rec["levels"]["models"] == LEVELS.split(",") and rec["multilevel"]["rule"] == "constant"
    assert rec["multilevel"]["nfe_per_level"][0] == 19.0


def test_cli_levels_into_a_run_folder_resumes_and_reports_per_level(tmp_path, capsys):
    """--levels with --out DIR/: the shards hold each sample's evaluations per level, the manifest
    their totals; the samples equal the single-file run's and a rerun computes nothing."""
    import numpy as np

    args = ["sample", "--levels", "digits-small,digits", "--p", "0.3", "--steps", "10", "--n", "6", "--no-progress"]
    assert main([*args, "--no-metric", "--out", str(tmp_path / "one.npz")]) == 0
    one = capsys.readouterr().out
    run = tmp_path / "run"
    assert main([*args, "--shard-size", "4", "--out", f"{run}/"]) == 0
    text = capsys.readouterr().out
    assert "level 1 digits-small: 9.00 evaluations per sample x cost 1.000" in text and "ratio EM / ML-EM" in text
    level2 = next(line for line in text.splitlines() if line.startswith("level 2 digits:"))
    assert level2 in one  # the same draws, so the same counts as the single-file run
    summary = json.loads((run / "manifest.json").read_text())["summary"]
    assert summary["nfe_per_level"][0] == 9.0 and summary["cost"] > 9.0
    assert json.loads((run / "manifest.json").read_text())["settings"]["model"] == "digits-small+digits"
    single = torch.from_numpy(np.load(tmp_path / "one.npz")["samples"]).float()
    torch.testing.assert_close(fastsde.load_samples(run), single, rtol=0, atol=1e-4)
    assert main([*args, "--shard-size", "4", "--out", f"{run}/"]) == 0
    again = capsys.readouterr().out
    assert "computed 0 shard(s) on rank 0, 2 already done" in again and level2 in again


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--levels", "digits-small,nope"], "unknown model 'nope'"),
        (["--levels", "digits"], "at least 2 models"),
        (["--levels", "digits,digits-ve"], "one process"),
        (["--levels", LEVELS, "--solver", "em"], "needs --solver mlem"),
        (["--levels", LEVELS, "--p", "0"], "must lie in (0, 1]"),
        (["--levels", LEVELS, "--p", "1.5"], "must lie in (0, 1]"),
        (["--levels", LEVELS, "--p", "nan"], "must lie in (0, 1]"),
        (["--levels", LEVELS, "--p", "0.2,0.1,0.1"], "2 corrections"),
        (["--levels", LEVELS, "--p", "abc"], "'auto' or probabilities"),
        (["--p", "0.2"], "--p applies to"),
    ],
)
def test_cli_bad_levels_and_p_exit_2(tmp_path, capsys, extra, message):
    rc = main(["sample", *extra, "--steps", "5", "--n", "2", "--out", str(tmp_path / "x.png"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "x.png").exists()


def test_fit_mlem_cli_writes_a_schedule_that_sample_uses(tmp_path, capsys):
    """fastsde fit-mlem on two shipped levels (tiny run), then fastsde sample --p FILE uses it; a
    run with other steps is refused in one line, exit 2."""
    sched = tmp_path / "m.safetensors"
    args = ["fit-mlem", "--levels", "digits-small,digits", "--steps", "4", "--n", "4", "--iters", "1"]
    assert main([*args, "--quiet", "--out", str(sched)]) == 0
    assert "wrote" in capsys.readouterr().out and sched.is_file()
    png = tmp_path / "s.png"
    run = ["sample", "--solver", "mlem", "--levels", "digits-small,digits", "--n", "4", "--p", str(sched)]
    assert main([*run, "--steps", "4", "--out", str(png)]) == 0
    assert "p learned" in capsys.readouterr().out
    assert json.loads(png.with_name("s.png.json").read_text())["multilevel"]["rule"] == "learned"
    assert main([*run, "--steps", "5", "--out", str(png)]) == 2
    assert "steps is 4 in the schedule, 5 in the run" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--levels", "digits"], "--levels needs at least 2 models"),
        (["--levels", "digits-small,digits", "--n", "1"], "--n must be an integer >= 2"),
        (["--levels", "digits-small,digits", "--lam", "-1"], "--lam must be a non-negative number"),
    ],
)
def test_fit_mlem_cli_bad_input_exit_2(tmp_path, capsys, extra, message):
    assert main(["fit-mlem", *extra, "--out", str(tmp_path / "m.safetensors")]) == 2
    assert message in capsys.readouterr().err


def test_sample_p_file_that_is_not_a_schedule(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    args = ["sample", "--solver", "mlem", "--levels", "digits-small,digits", "--steps", "4", "--n", "2"]
    assert main([*args, "--p", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert "not an ML-EM schedule file" in capsys.readouterr().err

"""`fastsde sample` and `fastsde train`: outputs for small n, and bad input as one line + exit status 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastsde.cli import main
from fastsde.cli.sample import default_solver

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_sample_writes_png(tmp_path, capsys):
    out = tmp_path / "s.png"
    rc = main(["sample", "--solver", "em", "--steps", "5", "--n", "4", "--out", str(out)])
    assert rc == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    text = capsys.readouterr().out
    assert "NFE 5.0" in text and "wall" in text and "FD" in text


def test_sample_writes_npz_and_batches_do_not_change_samples(tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert main(["sample", "--solver", "em", "--steps", "4", "--n", "5", "--out", str(a), "--no-metric"]) == 0
    args = ["sample", "--solver", "em", "--steps", "4", "--n", "5", "--batch-size", "2", "--out", str(b)]
    assert main([*args, "--no-metric"]) == 0
    za, zb = np.load(a), np.load(b)
    assert za["samples"].shape == (5, 1, 8, 8) and np.isfinite(za["samples"]).all()
    np.testing.assert_allclose(za["samples"], zb["samples"], atol=1e-4)  # float32 convolutions differ by batch size
    np.testing.assert_array_equal(za["nfe_per_sample"], np.full(5, 4.0))


def test_sample_generic_option_and_mixture_scatter(tmp_path, capsys):
    out = tmp_path / "m.png"
    args = ["sample", "--model", "mixture", "--solver", "pc", "--steps", "20", "--option", "corrector_steps=1"]
    assert main([*args, "--n", "50", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert "mixture FD" in capsys.readouterr().out


def test_default_solver_is_the_library_default():
    import fastsde

    assert default_solver() == fastsde.api.DEFAULT_SOLVER == "adaptive_sde_dpm_2m"
    assert fastsde.api.DEFAULT_SOLVER in fastsde.SOLVERS


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nope"], "unknown model 'nope'"),
        (["--solver", "nope"], "unknown solver 'nope'"),
        (["--out", "/nonexistent-folder/x.png"], "does not exist"),
        (["--out", "x.txt"], "must end in .png or .npz"),
        (["--solver", "em", "--eps-rel", "0.1"], "unknown option"),
        (["--solver", "em", "--option", "steps"], "KEY=VALUE"),
        (["--n", "0"], "--n must be a positive integer"),
    ],
)
def test_bad_sample_input_exits_2_with_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "samples.png").exists()


def test_train_cli_tiny_run_and_resume(tmp_path, capsys):
    data = tmp_path / "d.npy"
    np.save(data, np.random.default_rng(0).integers(0, 17, size=(20, 8, 8)).astype(np.uint8))
    out = tmp_path / "ck"
    base = ["train", "--data", str(data), "--out", str(out), "--channels", "8,16", "--batch-size", "8", "--quiet"]
    assert main([*base, "--steps", "3", "--save-every", "2"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["training"]["steps"] == 3 and (out / "model.safetensors").exists()
    assert main([*base, "--steps", "5", "--resume"]) == 0
    assert json.loads((out / "config.json").read_text())["training"]["steps"] == 5
    assert "resuming" in capsys.readouterr().out


def test_bad_train_input_exits_2(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "missing.npy"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.npy" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "o"), "--resume", "--steps", "2"]) == 2
    assert "no checkpoint" in capsys.readouterr().err

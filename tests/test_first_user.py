"""Issue 21, first-user reliability: what a new user runs into, each item pinned by a test that fails
on the old behaviour (NaN scores burning the budget, numpy numbers refused, silent mismatches, broken
model files breaking every model, half-written outputs, missing records)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import fastsde
from fastsde.cli import main
from fastsde.problems import mixture_2d
from fastsde.solvers.core.driver import NonFiniteSolveError

# -- item 2: a NaN score stops a sample after a bounded run, and says so -------------------------

ADAPTIVE_SOLVERS = ["adaptive", "adaptive_sde_dpm", "adaptive_sde_dpm_2m", "ode", "adaptive_dpmpp_3m"]


def _nan_between(lo: float, hi: float):
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)

    def score(x, t):
        return torch.where(((t > lo) & (t < hi))[:, None], torch.nan, gm(x, t))

    return score, sde


@pytest.mark.parametrize("solver", ADAPTIVE_SOLVERS)
def test_nan_score_stops_adaptive_solvers_early_naming_nan_time_and_count(solver):
    score, sde = _nan_between(0.4, 0.6)
    calls = []

    def counted(x, t):
        calls.append(x.shape[0])
        return score(x, t)

    with pytest.raises(NonFiniteSolveError, match=r"NaN or Inf: 4 of 4 samples stopped at t = \[0\.[456]") as err:
        fastsde.sample(counted, sde, (4, 2), solver=solver, seed=0)
    assert isinstance(err.value, fastsde.NonFiniteScoreError)  # the same class fixed-step solvers raise
    assert "max_nfe" in str(err.value) and "would not help" in str(err.value)
    # bounded: a few hundred evaluations per sample at most, not the 10 000 of the budget
    assert sum(calls) / 4 < 500


def test_nan_score_partial_results_report_status_nonfinite():
    score, sde = _nan_between(0.4, 0.6)
    res = fastsde.sample(score, sde, (3, 2), solver="adaptive_sde_dpm_2m", on_budget="partial")
    assert res.stats["status"] == ["nonfinite"] * 3
    assert bool((res.stats["t_final"] >= 0.6 - 1e-6).all())


def test_a_working_score_never_trips_the_nonfinite_stop():
    sde = fastsde.VPSDE()
    res = fastsde.sample(mixture_2d(sde), sde, (16, 2), solver="adaptive", seed=0)
    assert res.stats["status"] == ["done"] * 16 and int(res.stats["nonfinite_rejections"].sum()) == 0


# -- item 5: silent garbage and silent mismatches are errors ---------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, "float32", np.float64])
def test_non_floating_dtype_is_refused(dtype):
    sde = fastsde.VPSDE()
    with pytest.raises(ValueError, match="dtype must be a floating torch dtype"):
        fastsde.sample(mixture_2d(sde), sde, (4, 2), solver="em", steps=5, dtype=dtype)


def test_denoiser_score_without_process_is_refused_under_another_process():
    def denoiser(x, sigma):
        return x / (1 + sigma[:, None] ** 2)  # exact for N(0, I) data in EDM coordinates

    with pytest.raises(ValueError, match=r"built for EDM.*without sde= assumes EDM.*sampled under VPSDE"):
        fastsde.sample(fastsde.DenoiserScore(denoiser), fastsde.VPSDE(), (4, 2), solver="em", steps=5)
    vp = fastsde.VPSDE()
    res = fastsde.sample(fastsde.DenoiserScore(denoiser, vp), vp, (2000, 2), solver="dpmpp_2m", seed=0)
    assert abs(float(res.samples.std()) - 1.0) < 0.05
    edm = fastsde.EDM()
    fastsde.sample(fastsde.DenoiserScore(denoiser), edm, (4, 2), solver="em", steps=5)  # EDM: as documented
    # any EDM range: m = 1 and σ(t) = t for every EDM, so the score is the same
    fastsde.sample(fastsde.DenoiserScore(denoiser), fastsde.EDM(sigma_max=160.0), (4, 2), solver="em", steps=5)


def test_mixture_built_for_one_process_is_refused_under_another():
    gm = mixture_2d(fastsde.VPSDE())
    with pytest.raises(ValueError, match=r"built for VPSDE.*sampled under VESDE"):
        fastsde.sample(gm, fastsde.VESDE(), (4, 2), solver="em", steps=5)
    with pytest.raises(ValueError, match=r"built for VPSDE.*sampled under VPSDE"):
        fastsde.sample(gm, fastsde.VPSDE(beta_max=10.0), (4, 2), solver="em", steps=5)
    fastsde.sample(gm, fastsde.VPSDE(), (4, 2), solver="em", steps=5)  # an equal process is fine


def test_v_prediction_needs_vp():
    unet = torch.nn.Linear(1, 1)
    for sde in (fastsde.SubVPSDE(), fastsde.VESDE(), fastsde.EDM()):
        with pytest.raises(ValueError, match="v_prediction.*needs a VPSDE"):
            fastsde.DiffusersUNetScore(unet, sde, prediction_type="v_prediction")
    fastsde.DiffusersUNetScore(unet, fastsde.VPSDE(), prediction_type="v_prediction")


# -- item 6: numbers as people pass them -----------------------------------------------------------


def test_numpy_numbers_are_accepted_like_python_numbers():
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)
    want = fastsde.sample(gm, sde, (8, 2), solver="em", steps=10, seed=3, t_end=1e-3)
    got = fastsde.sample(
        gm, sde, (np.int64(8), np.int32(2)), solver="em", steps=np.int64(10), seed=np.int64(3), t_end=np.float32(1e-3)
    )
    assert got.samples.shape == (8, 2)
    # t_end given as float32 is float32's nearest value of 1e-3, so the last step differs in the last bits
    torch.testing.assert_close(got.samples, want.samples, rtol=0, atol=1e-5)
    res = fastsde.sample(gm, sde, (4, 2), solver="adaptive", eps_rel=np.float32(0.05), max_nfe=np.int16(500))
    assert res.options["eps_rel"] == pytest.approx(0.05) and type(res.options["max_nfe"]) is int
    flags = fastsde.sample(gm, sde, (4, 2), solver="dpmpp_2m_sde", steps=5, corrector=np.bool_(True), denoise=np.False_)
    assert flags.options["corrector"] is True and flags.options["denoise"] is False
    with pytest.raises(ValueError, match="steps must be an integer"):
        fastsde.sample(gm, sde, (4, 2), solver="em", steps=np.bool_(True))
    seeds = fastsde.sample(gm, sde, (2, 2), solver="em", steps=5, seed=np.array([5, 9]))
    assert torch.equal(seeds.samples, fastsde.sample(gm, sde, (2, 2), solver="em", steps=5, seed=[5, 9]).samples)


@pytest.mark.parametrize("seed", [-1, 2**64, [0, -5], True, 1.5, "3", np.float64(2.0)])
def test_seeds_outside_the_64_bit_range_or_not_integers_are_refused(seed):
    sde = fastsde.VPSDE()
    n = len(seed) if isinstance(seed, list) else 2
    with pytest.raises(ValueError, match=r"seed"):
        fastsde.sample(mixture_2d(sde), sde, (n, 2), solver="em", steps=5, seed=seed)


def test_seed_limits_are_inclusive_of_zero_and_two_to_the_64_minus_one():
    sde = fastsde.VPSDE()
    for seed in (0, 2**64 - 1):
        assert fastsde.sample(mixture_2d(sde), sde, (2, 2), solver="em", steps=5, seed=seed).samples.shape == (2, 2)


def test_load_model_accepts_dtype_names_and_refuses_others():
    model = fastsde.load_model("digits-small", dtype="float64")
    assert next(model.network.parameters()).dtype == torch.float64
    with pytest.raises(ValueError, match="dtype must be a floating dtype"):
        fastsde.load_model("digits-small", dtype="cuda")
    with pytest.raises(ValueError, match="dtype must be a floating torch dtype"):
        fastsde.load_model("digits-small", dtype=torch.int64)


# -- item 9: the record of a result ----------------------------------------------------------------


def test_config_records_seed_dtype_and_device():
    sde = fastsde.VPSDE()
    res = fastsde.sample(mixture_2d(sde), sde, (3, 2), solver="em", steps=5, seed=7, dtype=torch.float64)
    cfg = res.config()
    assert cfg["seed"] == 7 and cfg["dtype"] == "float64" and cfg["device"] == "cpu"
    assert cfg["solver"] == "em" and cfg["steps"] == 5 and cfg["sde"]["type"] == "VPSDE" and cfg["n"] == 3
    json.dumps(cfg)  # a record: JSON-ready
    listed = fastsde.sample(mixture_2d(sde), sde, (2, 2), solver="em", steps=5, seed=np.array([4, 2]))
    assert listed.config()["seed"] == [4, 2]
    src = fastsde.sample(mixture_2d(sde), sde, (2, 2), solver="em", steps=5, seed=fastsde.NoiseSource([1, 2]))
    assert src.config()["seed"] is None
    assert math.isfinite(res.nfe)


# -- items 3, 7, 8, 9: the command line ------------------------------------------------------------

MIX = ["sample", "--model", "mixture", "--no-progress"]


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("fastsde "), err
    for needle in needles:
        assert needle in err[0], err
    return err[0]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--option", "max_nfe=20"], ["did not reach t_end", "--option max_nfe=N", "--option on_budget=partial"]),
        (["--solver", "ode", "--option", "max_nfe=20"], ["did not reach t_end", "--rtol"]),
        (["--solver", "em", "--steps", "12", "--option", "steps=10"], ["steps is given twice"]),
        (["--solver", "em", "--option", "t_end=-0.5"], ["t_end must lie in (0, 1]"]),
        (["--solver", "em", "--t-end", "2"], ["t_end must lie in (0, 1]"]),
        (["--solver", "em", "--device", "cuda:0"], ["--device"]),
        (["--solver", "em", "--device", "gpu!"], ["--device must be a torch device"]),
        (["--seed", "-1"], ["--seed must lie in [0, 2**64)"]),
        (["--out", "/proc/fastsde-test.png"], ["cannot write '/proc/fastsde-test.png'"]),
    ],
)
def test_cli_errors_are_one_line_exit_2_before_or_instead_of_a_traceback(args, needles, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "/proc" in " ".join(args):  # the write check comes before any compute

        def no_compute(*a, **k):
            raise AssertionError("sampled although the output cannot be written")

        monkeypatch.setattr(fastsde, "sample", no_compute)
    assert main([*MIX, *args]) == 2
    _one_error_line(capsys, *needles)
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file


def test_cli_unknown_flag_is_reported_by_the_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--bogus"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: fastsde sample" in err and "fastsde sample: error: unrecognized arguments: --bogus" in err


def test_cli_ctrl_c_is_exit_130_in_one_line(capsys, tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fastsde, "sample", interrupted)
    assert main([*MIX, "--out", str(tmp_path / "s.png")]) == 130
    _one_error_line(capsys, "interrupted")
    assert not list(tmp_path.iterdir())


def test_cli_closed_pipe_is_quiet(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-c", "import sys; from fastsde.cli import main; sys.exit(main())"]
    args = [*MIX, "--solver", "em", "--steps", "3", "--n", "4", "--no-metric", "--out", str(tmp_path / "s.npz")]
    proc = subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.close()  # the reader went away before the first line (as `| head -0` would)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_cli_partial_results_warn_and_are_counted_in_the_record(capsys, tmp_path):
    out = tmp_path / "p.png"
    assert main([*MIX, "--option", "max_nfe=20", "--option", "on_budget=partial", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: 64 of 64 samples did not reach t_end" in err
    assert json.loads((tmp_path / "p.png.json").read_text())["unfinished"] == 64


def test_cli_new_flags_and_the_record_next_to_every_output(capsys, tmp_path):
    out = tmp_path / "s.npz"
    args = [*MIX, "--solver", "em", "--steps", "6", "--n", "5", "--seed", "11", "--out", str(out)]
    assert main([*args, "--t-end", "0.01", "--no-denoise", "--dtype", "float32", "--device", "cpu"]) == 0
    z = np.load(out)
    assert z["samples"].shape == (5, 2) and int(z["seed"]) == 11
    assert str(z["model"]) == "mixture" and str(z["solver"]) == "em"
    assert json.loads(str(z["options"]))["steps"] == 6
    rec = json.loads((tmp_path / "s.npz.json").read_text())
    assert rec["t_end"] == 0.01 and rec["denoise"] is False and rec["dtype"] == "float32" and rec["seed"] == 11
    assert rec["nfe"] == 5.0 and rec["model"] == "mixture" and rec["options"]["steps"] == 6
    assert rec["command"].startswith("fastsde sample --model mixture") and "--seed 11" in rec["command"]
    want = fastsde.sample(
        mixture_2d(fastsde.VPSDE()), fastsde.VPSDE(), (5, 2), solver="em", steps=6, seed=11, t_end=0.01, denoise=False
    )
    np.testing.assert_allclose(z["samples"], want.samples.double().numpy(), atol=1e-6)
    text = capsys.readouterr().out
    assert "Fréchet distance to the exact mixture" in text


def test_cli_default_solver_and_quality_explained(capsys, tmp_path):
    out = tmp_path / "d.png"
    assert main(["sample", "--n", "4", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "solver adaptive_sde_dpm_2m" in text and "lower FD is better" in text
    nfe = float(text.split("NFE ")[1].split()[0])
    assert nfe < 150  # the old default (adaptive) spent ~394 per digit
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "Fréchet distance" in capsys.readouterr().out


def test_train_refuses_ema_outside_unit_interval(capsys, tmp_path):
    assert main(["train", "--ema", "2", "--out", str(tmp_path / "o"), "--steps", "1"]) == 2
    _one_error_line(capsys, "--ema must lie in [0, 1)")


# -- item 8: writes are whole or absent ------------------------------------------------------------


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    from fastsde.files import check_writable, write_atomic

    target = tmp_path / "x.json"
    target.write_text("old")

    def broken(path):
        path.write_text("half")
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, broken)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]
    write_atomic(target, lambda p: p.write_text("new"))
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]
    with pytest.raises(OSError):
        check_writable("/proc/nope.png")
    with pytest.raises(OSError, match="does not exist"):
        check_writable(tmp_path / "missing" / "x.png")


def test_training_checkpoint_files_are_renamed_into_place(tmp_path, monkeypatch):
    import fastsde.files
    import fastsde.training

    written = []
    real = fastsde.files.atomic_path

    def spy(target):
        written.append(Path(target).name)
        return real(target)

    monkeypatch.setattr(fastsde.files, "atomic_path", spy)
    data = torch.rand(8, 1, 8, 8) * 2 - 1
    cfg = fastsde.training.TrainConfig(channels=(8, 16), batch_size=4, norm_groups=8)
    trainer = fastsde.training.Trainer(cfg, data)
    trainer.train(1, progress=False)
    trainer.save(tmp_path / "ck")
    assert sorted(written) == ["config.json", "model.safetensors", "train_state.json", "train_state.safetensors"]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == sorted(written)


# -- item 4: one broken model file breaks only its model --------------------------------------------


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    import shutil

    import fastsde.models

    src = fastsde.models._models_dir()
    for name in ("digits-small", "digits"):
        for ext in (".json", ".safetensors"):
            shutil.copy(str(src.joinpath(name + ext)), tmp_path / (name + ext))
    (tmp_path / "broken.json").write_text('{"unet": ')
    shutil.copy(str(src.joinpath("digits-small.safetensors")), tmp_path / "broken.safetensors")
    (tmp_path / "cut.json").write_text((tmp_path / "digits-small.json").read_text())
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "digits-small.safetensors").read_bytes()[:500])
    (tmp_path / "misfit.json").write_text((tmp_path / "digits-small.json").read_text())
    shutil.copy(tmp_path / "digits.safetensors", tmp_path / "misfit.safetensors")
    monkeypatch.setattr(fastsde.models, "_models_dir", lambda: tmp_path)
    return tmp_path


def test_a_broken_model_file_breaks_only_its_model_and_is_named(models_dir, capsys):
    assert fastsde.load_model("digits-small").shape == (1, 8, 8)  # the others still load
    with pytest.raises(ValueError, match=r"model 'broken': cannot read its config .*broken\.json"):
        fastsde.load_model("broken")
    with pytest.raises(ValueError, match=r"model 'cut': cannot read its weights .*cut\.safetensors"):
        fastsde.load_model("cut")
    with pytest.raises(ValueError, match=r"model 'misfit': the weights in misfit\.safetensors do not fit its config"):
        fastsde.load_model("misfit")
    for name in ("broken", "cut", "misfit"):
        assert main(["sample", "--model", name, "--no-progress", "--out", str(models_dir / "o.png")]) == 2
        _one_error_line(capsys, f"model {name!r}")


# -- item 10: fastsde likelihood edges -------------------------------------------------------------


def test_likelihood_edges(capsys, tmp_path):
    assert main(["likelihood", "--model", "mixture2d-vp", "--no-progress"]) == 2
    _one_error_line(capsys, "--data is required for mixture2d-vp")
    assert main(["likelihood", "--model", "nope", "--no-progress"]) == 2
    _one_error_line(capsys, "unknown model 'nope'", "mixture2d-vp")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip at all")
    assert main(["likelihood", "--model", "mixture2d-vp", "--data", str(bad), "--no-progress"]) == 2
    _one_error_line(capsys, "not an .npz file")
    out = tmp_path / "s.npz"  # what `fastsde sample` writes is read without --key
    assert main([*MIX, "--solver", "em", "--steps", "30", "--n", "6", "--no-metric", "--out", str(out)]) == 0
    capsys.readouterr()
    argv = ["likelihood", "--model", "mixture2d-vp", "--data", str(out), "--no-progress", "--rtol", "1e-3"]
    assert main([*argv, "--atol", "1e-3"]) == 0
    assert "(offset 0)" in capsys.readouterr().out  # continuous data: no 8-bit offset
    assert main([*argv, "--atol", "1e-3", "--max-steps", "1"]) == 2
    _one_error_line(capsys, "--max-steps")


# -- item 11: the README stands on its own; the Makefile pins the CPU torch --------------------------

ROOT = Path(__file__).resolve().parents[1]


def test_readme_links_resolve_inside_the_repository():
    import re

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link and not link.startswith("mailto:")]
    assert local, "the README links nothing in the repository"
    for link in local:
        target = (ROOT / link).resolve()
        assert target.is_relative_to(ROOT), f"README links {link!r}, outside the repository"
        assert target.exists(), f"README links {link!r}, which does not exist"


def test_makefile_installs_the_cpu_torch_with_a_fallback():
    text = (ROOT / "Makefile").read_text()
    assert "+cpu" in text and "download.pytorch.org/whl/cpu" in text and "||" in text

"""Models loaded by path: a folder written by `fastsde train` (load_model and `fastsde sample --model
PATH`), a diffusers save_pretrained folder with its scheduler config, and clear errors for bad folders."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import fastsde
from fastsde.cli import main
from fastsde.sde import DiscreteVPSDE

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained by `fastsde train` for 2 steps on 20 random 8x8 images (a few seconds)."""
    root = tmp_path_factory.mktemp("trained")
    data = root / "d.npy"
    np.save(data, np.random.default_rng(0).integers(0, 17, size=(20, 8, 8)).astype(np.uint8))
    out = root / "ck"
    args = ["train", "--data", str(data), "--out", str(out), "--channels", "8,16", "--batch-size", "4"]
    assert main([*args, "--steps", "2", "--quiet"]) == 0
    return out


def test_trained_folder_loads_by_path_and_samples(trained):
    model = fastsde.load_model(str(trained))
    also = fastsde.load_model(trained)  # a pathlib.Path too
    assert model.name == str(trained) and model.shape == (1, 8, 8) and isinstance(model.sde, fastsde.VPSDE)
    assert model.config["training"]["steps"] == 2 and not model.network.training
    assert model.eval_cost == model.eval_cost and model.eval_cost > 0
    res = fastsde.sample(model.score, model.sde, (3, *model.shape), solver="em", steps=3, seed=0)
    again = fastsde.sample(also.score, also.sde, (3, *also.shape), solver="em", steps=3, seed=0)
    assert torch.isfinite(res.samples).all() and torch.equal(res.samples, again.samples)
    assert (
        fastsde.load_model(trained, dtype="float64").score(res.samples.double(), torch.full((3,), 0.5)).isfinite().all()
    )


def test_cli_samples_a_trained_folder(trained, tmp_path):
    out = tmp_path / "s.npz"
    args = ["sample", "--model", str(trained), "--solver", "em", "--steps", "3", "--n", "4", "--out", str(out)]
    assert main([*args, "--no-metric"]) == 0
    assert np.load(out)["samples"].shape == (4, 1, 8, 8)
    assert json.loads((tmp_path / "s.npz.json").read_text())["model"] == str(trained)


def test_unknown_name_still_lists_the_shipped_models(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown model 'nope'.*digits"):
        fastsde.load_model("nope")
    assert main(["sample", "--model", str(tmp_path / "absent"), "--n", "2", "--out", str(tmp_path / "s.npz")]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_bad_folders_are_clear_errors(trained, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        fastsde.load_model(empty)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(trained / "config.json", no_weights / "config.json")
    with pytest.raises(ValueError, match=r"model.safetensors are missing"):
        fastsde.load_model(no_weights)
    broken = tmp_path / "broken"
    shutil.copytree(trained, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read its weights .*model.safetensors"):
        fastsde.load_model(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read .*config.json"):
        fastsde.load_model(broken)
    args = ["sample", "--model", str(empty), "--n", "2", "--out", str(tmp_path / "s.npz")]
    assert main(args) == 2 and "no config.json" in capsys.readouterr().err


def _tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


@pytest.mark.parametrize("layout", ["flat", "subfolder"])
def test_diffusers_folder_round_trips(tmp_path, layout):
    diffusers = pytest.importorskip("diffusers")
    unet = _tiny_unet()
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    folder = tmp_path / "dif"
    unet.save_pretrained(folder)
    scheduler.save_pretrained(folder if layout == "flat" else folder / "scheduler")
    assert (folder / "diffusion_pytorch_model.safetensors").exists()
    model = fastsde.load_model(folder)
    assert isinstance(model.sde, DiscreteVPSDE) and model.shape == (1, 8, 8)
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    assert torch.allclose(model.sde.mean_coeff(t) ** 2, scheduler.alphas_cumprod.double(), rtol=1e-12)
    # the loaded score is the in-memory UNet's, conditioned on the scheduler's timestep
    x = torch.randn(3, 1, 8, 8)
    tt = torch.tensor([1.0, 0.5005, 0.01])
    with torch.no_grad():
        eps = unet(x, torch.tensor([999.0, 499.5, 9.0])).sample
    assert torch.allclose(model.score(x, tt), -eps / model.sde.marginal_std(tt).reshape(-1, 1, 1, 1), atol=1e-5)
    res = fastsde.sample(model.score, model.sde, (4, *model.shape), solver="dpmpp_2m", steps=5, seed=0)
    ref = fastsde.DiffusersUNetScore(unet, model.sde)
    with torch.no_grad():
        direct = fastsde.sample(ref, model.sde, (4, *model.shape), solver="dpmpp_2m", steps=5, seed=0)
    assert torch.allclose(res.samples, direct.samples, atol=1e-5)


def test_diffusers_folder_without_scheduler_is_a_clear_error(tmp_path):
    folder = tmp_path / "dif"
    _tiny_unet().save_pretrained(folder)
    with pytest.raises(ValueError, match="no scheduler config"):
        fastsde.load_model(folder)


def test_model_folders_as_levels(trained, tmp_path, capsys):
    """Levels.from_models and `sample --levels` take model folders beside shipped names (a folder
    trained for the ML-EM hierarchy need not be shipped first)."""
    from fastsde.cli import main

    levels = fastsde.Levels.from_models([str(trained), "digits"])
    assert levels.names == [str(trained), "digits"] and levels.costs[0] == 1.0 and levels.costs[1] > 1.0
    out = tmp_path / "s.npz"
    args = ["sample", "--levels", f"{trained},digits", "--p", "0.5", "--steps", "4", "--n", "2", "--no-metric"]
    assert main([*args, "--out", str(out), "--no-progress"]) == 2  # a 2-step network is far from digits
    assert "levels[0] differs from the finest level" in capsys.readouterr().err
    twin = tmp_path / "twin"
    shutil.copytree(trained, twin)
    args[2] = f"{trained},{twin}"
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    assert f"level 1 {trained}: 3.00 evaluations per sample" in capsys.readouterr().out
    with pytest.raises(ValueError, match="or give model folders"):
        fastsde.Levels.from_models([str(tmp_path / "nope"), "digits"])


def test_resuming_a_run_after_retraining_the_same_folder_is_refused(tmp_path, capsys):
    """`fastsde train --resume` writes new weights under the same --model folder: a run folder started
    with the old weights must refuse to mix in the new model's samples (one line, exit 2)."""
    data = tmp_path / "d.npy"
    np.save(data, np.random.default_rng(0).integers(0, 17, size=(20, 8, 8)).astype(np.uint8))
    ck = tmp_path / "ck"
    train = ["train", "--data", str(data), "--out", str(ck), "--channels", "8,16", "--batch-size", "4", "--quiet"]
    assert main([*train, "--steps", "2"]) == 0
    run = tmp_path / "run"
    sample = ["sample", "--model", str(ck), "--solver", "ddim", "--steps", "3", "--n", "6", "--out", f"{run}/"]
    assert main([*sample, "--shard-size", "3", "--no-metric"]) == 0
    (run / "shard-00001.npz").unlink()  # as if the run had been killed half way
    assert main([*train, "--steps", "4", "--resume"]) == 0
    capsys.readouterr()
    assert main([*sample, "--shard-size", "3", "--no-metric"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other settings (model_content.score.__self__" in err, err
    assert not (run / "shard-00001.npz").exists()  # nothing written with the new weights


def test_flow_objective_trains_a_velocity_model_that_samples_from_pure_noise(tmp_path, capsys):
    """`fastsde train --objective flow`: conditional flow matching on the rectified-flow path; the
    folder loads as a velocity model (its data prediction x̂0 = x − σ·v) and samples from u = 1."""
    data = tmp_path / "d.npy"
    np.save(data, np.random.default_rng(0).integers(0, 17, size=(20, 8, 8)).astype(np.uint8))
    out = tmp_path / "flow"
    args = ["train", "--data", str(data), "--out", str(out), "--channels", "8,16", "--batch-size", "4", "--quiet"]
    assert main([*args, "--objective", "flow", "--steps", "2"]) == 0
    model = fastsde.load_model(out)
    assert isinstance(model.sde, fastsde.RectifiedFlow) and model.config["prediction"] == "flow"
    assert model.config["time_input"] == "999*sigma" and model.data_prediction is not None
    x = torch.randn(3, *model.shape)
    t = torch.full((3,), 0.4)
    v = model.network(x, 999.0 * t)  # shift 1: σ(u) = u
    torch.testing.assert_close(model.data_prediction(x, t), x - 0.4 * v)
    torch.testing.assert_close(model.score(x, t), -(x + 0.6 * v) / 0.4)
    res = fastsde.sample(model.score, model.sde, (4, *model.shape), solver="euler", steps=4, seed=0)
    assert torch.isfinite(res.samples).all() and res.nfe == 4.0
    capsys.readouterr()
    assert main([*args, "--objective", "flow", "--sde", "ve", "--steps", "2", "--out", str(tmp_path / "x")]) == 2
    assert "--objective flow trains on the rectified-flow path" in capsys.readouterr().err

"""Fashion-MNIST: the reader of the Debian package's idx files, held-out losses in training, and the
classifier-feature FD that judges 28 × 28 samples (shipped classifier and reference statistics).

Tests that need the real dataset skip when the package is not installed; the rest build idx files of
their own or use only the shipped assets."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fastsde import data
from fastsde.files import FileFormatError
from fastsde.metrics import fashion

HAVE_DATA = (Path(data.FASHION_DIR) / "t10k-images-idx3-ubyte.gz").is_file()
needs_data = pytest.mark.skipif(
    not HAVE_DATA, reason="Fashion-MNIST (Debian package dataset-fashion-mnist) not installed"
)


def _idx(values: np.ndarray) -> bytes:
    head = bytes([0, 0, 8, values.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in values.shape)
    return gzip.compress(head + values.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    """A Fashion-MNIST folder of 6 training and 4 held-out images, with known pixels and labels."""
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (6, 28, 28)), "t10k": rng.integers(0, 256, (4, 28, 28))}
    labels = {"train": np.arange(6) % 10, "t10k": np.array([9, 8, 7, 6])}
    for name in ("train", "t10k"):
        (tmp_path / f"{name}-images-idx3-ubyte.gz").write_bytes(_idx(images[name]))
        (tmp_path / f"{name}-labels-idx1-ubyte.gz").write_bytes(_idx(labels[name]))
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    return tmp_path, images, labels


def test_reader_scales_pixels_and_keeps_labels_aligned(fake_fashion):
    _, images, labels = fake_fashion
    x = data.load_fashion_mnist("train")
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], torch.from_numpy(images["train"].astype(np.float32) / 127.5 - 1.0))
    assert data.fashion_labels("heldout").tolist() == [9, 8, 7, 6]
    assert data.load_fashion_mnist("heldout").shape == (4, 1, 28, 28)
    assert torch.equal(data.load_dataset("fashion"), x)


def test_missing_package_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        data.load_fashion_mnist()
    with pytest.raises(ValueError, match="split"):
        data.load_fashion_mnist("test")


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: b"not gzip",
        lambda raw: gzip.compress(b"\x00\x00\x09\x03" + gzip.decompress(raw)[4:]),  # int8 magic, not uint8
        lambda raw: gzip.compress(gzip.decompress(raw)[:-5]),  # truncated body
        lambda raw: gzip.compress(gzip.decompress(raw)[:6]),  # truncated header
    ],
)
def test_damaged_files_are_named(fake_fashion, damage):
    folder, _, _ = fake_fashion
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(FileFormatError, match="train-images-idx3-ubyte"):
        data.load_fashion_mnist("train")


def test_train_records_a_heldout_curve_and_resumes_it(tmp_path):
    from fastsde.training import TrainConfig, Trainer

    cfg = TrainConfig(channels=(8, 16), norm_groups=8, shape=(1, 8, 8), batch_size=8)
    trainer = Trainer(cfg, data.load_digits("train")[:32])
    held = data.load_digits("heldout")[:20]
    first = trainer.heldout_loss(held)
    assert trainer.heldout_loss(held) == first  # same t and noise at every call: only the weights move it
    trainer.train(3, progress=False)
    trainer.heldout_loss(held)
    trainer.save(tmp_path)
    again = Trainer.load(tmp_path, data.load_digits("train")[:32])
    assert again.heldout_losses == trainer.heldout_losses and [s for s, _ in again.heldout_losses] == [0, 0, 3]
    record = json.loads((tmp_path / "config.json").read_text())["training"]["heldout_losses"]
    assert [s for s, _ in record] == [0, 0, 3]
    with pytest.raises(ValueError, match="held-out images"):
        trainer.heldout_loss(torch.zeros(2, 1, 28, 28))


def test_a_corrupt_heldout_curve_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from fastsde.files import save_tensors_with_meta
    from fastsde.training import TrainConfig, Trainer

    cfg = TrainConfig(channels=(8, 16), norm_groups=8, shape=(1, 8, 8), batch_size=8)
    trainer = Trainer(cfg, data.load_digits("train")[:32])
    trainer.train(2, progress=False)
    trainer.save(tmp_path)
    path = tmp_path / "train_state.safetensors"
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as fh:
        meta = json.loads(fh.metadata()["fastsde"])
    for bad in ([[5, 0.1]], [[1]], "x", [[True, 0.1]]):  # step beyond the state's, no loss, not a list, a bool
        save_tensors_with_meta(path, tensors, {**meta, "heldout_losses": bad})
        with pytest.raises(FileFormatError, match="heldout_losses"):
            Trainer.load(tmp_path, data.load_digits("train")[:32])


def test_cli_trains_on_fashion_with_a_heldout_line(fake_fashion, tmp_path, capsys):
    from fastsde.cli import main

    out = tmp_path / "run"
    code = main(
        ["train", "--data", "fashion", "--channels", "8,16", "--steps", "2", "--batch-size", "4", "--quiet"]
        + ["--out", str(out)]
    )
    assert code == 0
    assert "held-out" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["shape"] == [1, 28, 28] and cfg["training"]["data"] == "fashion"
    assert len(cfg["training"]["heldout_losses"]) == 1


# -- the quality metric ------------------------------------------------------------------------


def test_shipped_classifier_record_and_floor_table():
    _, meta, stats = fashion.load_classifier()
    assert meta["heldout_accuracy"] > 0.88
    sizes = sorted(int(n) for n in meta["floor"])
    floors = [meta["floor"][str(n)] for n in sizes]
    assert all(a > b for a, b in zip(floors, floors[1:]))  # FD's small-n bias shrinks with n
    assert all(meta["floor_sd"][str(n)] > 0 for n in sizes)
    assert np.allclose(stats["heldout_cov"], stats["heldout_cov"].T)
    assert fashion.floor_for(500) == pytest.approx(meta["floor"]["500"])
    assert fashion.floor_for(700) < fashion.floor_for(500)


def test_noise_and_blank_images_are_far_above_the_floor():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand((256, 1, 28, 28), generator=g) * 2 - 1
    blank = torch.full((256, 1, 28, 28), -1.0) + 0.01 * torch.randn((256, 1, 28, 28), generator=g)
    for x in (noise, blank):
        q = fashion.fashion_quality(x)
        assert q["fd"] > q["floor"] + 10 * q["floor_sd"]
        assert q["n"] == 256 and "Fashion-MNIST" in q["against"]


def test_bad_samples_are_refused_or_charged():
    with pytest.raises(ValueError, match="28, 28"):
        fashion.fashion_quality(torch.zeros(4, 1, 8, 8))
    with pytest.raises(ValueError, match="at least 2"):
        fashion.fashion_quality(torch.zeros(1, 1, 28, 28))
    x = torch.zeros(4, 1, 28, 28)
    x[0, 0, 0, 0] = math.nan
    assert fashion.fashion_quality(x)["fd"] == math.inf
    with pytest.raises(ValueError, match="labels"):
        fashion.fashion_class_quality(torch.zeros(4, 1, 28, 28), torch.tensor([0, 1, 2, 10]))


def test_corrupt_classifier_files_are_named():
    from importlib import resources

    root = resources.files("fastsde")
    weights = root.joinpath("_assets/data/fashion_classifier.safetensors").read_bytes()
    record = json.loads(root.joinpath("_assets/data/fashion_classifier.json").read_text())
    with pytest.raises(FileFormatError, match="w.safetensors"):
        fashion.read_classifier(b"junk", json.dumps(record).encode(), "w.safetensors", "r.json")
    for key, value in (("floor", {}), ("floor_sd", {"64": -1.0}), ("heldout_accuracy", 2.0), ("floor", {"x": 1.0})):
        with pytest.raises(FileFormatError, match=key):
            fashion.read_classifier(weights, json.dumps({**record, key: value}).encode(), "w.safetensors", "r.json")


@needs_data
def test_real_images_sit_at_the_floor_and_the_classifier_scores_them():
    x = data.load_fashion_mnist("train")[:1000]
    q = fashion.fashion_class_quality(x, data.fashion_labels("train")[:1000])
    assert abs(q["fd"] - q["floor"]) < 4 * q["floor_sd"]
    assert q["accuracy"] > 0.9


@pytest.mark.parametrize("device", ["bogus", "xpu", "cuda:99"])
def test_train_refuses_a_device_this_machine_lacks(device, tmp_path, capsys):
    from fastsde.cli import main

    if device == "cuda:99" and torch.cuda.device_count() > 99:
        pytest.skip("a machine with 100 CUDA devices")
    out = tmp_path / "run"
    assert main(["train", "--device", device, "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device" in err[0] and not out.exists()


def test_cpu_device_run_equals_the_default_run(tmp_path):
    """An explicit device changes where the work runs, never the batches or the weights."""
    from fastsde.training import TrainConfig, Trainer

    cfg = TrainConfig(channels=(8, 16), norm_groups=8, shape=(1, 8, 8), batch_size=8)
    runs = [Trainer(cfg, data.load_digits("train")[:32], **kw) for kw in ({}, {"device": "cpu"})]
    for trainer in runs:
        trainer.train(3, progress=False)
    assert runs[0].losses == runs[1].losses
    for a, b in zip(runs[0].ema.parameters(), runs[1].ema.parameters()):
        assert torch.equal(a, b)

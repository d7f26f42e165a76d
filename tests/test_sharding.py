"""Sharded, resumable sampling (fastsde.sample_to_dir / load_samples): any shard size and 1 or 2
workers give fastsde.sample's samples exactly; a SIGKILLed run resumes to every index exactly once;
half-written or foreign shard files are never taken as done; a rerun with other settings is refused."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastsde
from fastsde.cli import main
from fastsde.noise import NoiseSource

F64 = torch.float64
SDE = fastsde.VPSDE()
GM = fastsde.problems.mixture_2d(SDE)
WORKER = Path(__file__).with_name("sharding_worker.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")
#: the worker's settings (tests/sharding_worker.py)
WORKER_SETTINGS = dict(solver="dpmpp_2m", steps=10, seed=11, dtype=F64)


def reference(n: int, **settings) -> torch.Tensor:
    """One plain fastsde.sample call with all n samples."""
    return fastsde.sample(GM.score, SDE, (n, 2), **settings).samples


def run_dir(out: Path, n: int, shard_size: int, **settings) -> fastsde.ShardRun:
    return fastsde.sample_to_dir(GM.score, SDE, (n, 2), out, shard_size=shard_size, **settings)


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def worker(out: Path, n: int, shard_size: int, *kill: int, nproc: int = 0) -> subprocess.CompletedProcess:
    """Run tests/sharding_worker.py in a fresh process (nproc > 0: under torchrun with nproc ranks)."""
    args = [str(WORKER), str(out), str(n), str(shard_size), *map(str, kill)]
    if nproc:
        cmd = [str(TORCHRUN), "--standalone", f"--nproc-per-node={nproc}", *args]
    else:
        cmd = [sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=240)


def reports(text: str) -> dict[int, tuple[list[int], list[int]]]:
    """{rank: (computed, skipped)} from the worker's lines."""
    out = {}
    for m in re.finditer(r"rank (\d+) computed \[([\d, ]*)\] skipped \[([\d, ]*)\]", text):
        nums = [[int(v) for v in g.split(",") if v.strip()] for g in m.groups()[1:]]
        out[int(m.group(1))] = (nums[0], nums[1])
    return out


needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to python")


def test_from_seed_start_gives_the_rows_of_those_indices():
    whole = NoiseSource.from_seed(9, 30)
    part = NoiseSource.from_seed(9, 12, start=13)
    assert torch.equal(part.seeds, whole.subset(list(range(13, 25))).seeds)
    assert torch.equal(NoiseSource.from_seed(9, 30, start=0).seeds, whole.seeds)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="start"):
            NoiseSource.from_seed(9, 3, start=bad)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "dpmpp_2m_sde"])
@pytest.mark.parametrize("shard_size", [1, 7, 16, 40, 100])
def test_any_shard_size_equals_one_sample_call(tmp_path, solver, shard_size):
    n, settings = 40, dict(solver=solver, steps=10, seed=3, dtype=F64)
    run = run_dir(tmp_path / "run", n, shard_size, **settings)
    assert run.complete and run.num_shards == -(-n // shard_size) and run.computed == list(range(run.num_shards))
    assert torch.equal(fastsde.load_samples(tmp_path / "run"), reference(n, **settings))


def test_adaptive_solver_agrees_to_rounding(tmp_path):
    """An adaptive solve's batch composition changes SIMD tails, so only rounding may differ."""
    n, settings = 24, dict(solver="adaptive_sde_dpm_2m", seed=3, dtype=F64)
    run_dir(tmp_path, n, 5, **settings)
    torch.testing.assert_close(fastsde.load_samples(tmp_path), reference(n, **settings), rtol=1e-10, atol=1e-12)


def test_manifest_records_the_run(tmp_path):
    run = run_dir(tmp_path, 10, 4, solver="dpmpp_2m", steps=6, seed=5, dtype=F64)
    manifest = json.loads((tmp_path / fastsde.shards.MANIFEST).read_text())
    assert manifest == run.manifest and manifest["complete"]
    s = manifest["settings"]
    assert s["solver"] == "dpmpp_2m" and s["options"]["steps"] == 6 and s["options"]["grid"] == "logsnr"
    assert (s["seed"], s["n"], s["shape"], s["dtype"], s["shard_size"]) == (5, 10, [2], "float64", 4)
    assert s["model"].startswith("fastsde.score.GaussianMixture#") and s["sde"]["type"] == "VPSDE"
    assert [(e["start"], e["stop"], e["status"], e["nfe"]) for e in manifest["shards"]] == [
        (0, 4, "done", 6.0),
        (4, 8, "done", 6.0),
        (8, 10, "done", 6.0),
    ]
    assert manifest["summary"]["samples_done"] == 10 and manifest["summary"]["nfe"] == 6.0
    # another mixture is another model
    other = fastsde.problems.mixture_2d(SDE, scale=2.0)
    assert fastsde.shards.score_identity(other.score) != s["model"]


def test_rerun_resumes_and_computes_nothing(tmp_path):
    settings = dict(solver="dpmpp_2m", steps=6, seed=5, dtype=F64)
    run_dir(tmp_path, 10, 4, **settings)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*.npz")}
    again = run_dir(tmp_path, 10, 4, **settings)
    assert again.computed == [] and again.skipped == [0, 1, 2] and again.complete
    assert stamps == {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*.npz")}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (dict(steps=7), "options.steps"),
        (dict(seed=6), "seed"),
        (dict(solver="ddim"), "solver"),
        (dict(dtype=torch.float32), "dtype"),
        (dict(n=11), "n"),
        (dict(shard_size=5), "shard_size"),
        (dict(denoise=False), "denoise"),
    ],
)
def test_mismatched_rerun_is_refused(tmp_path, change, field):
    settings = dict(solver="dpmpp_2m", steps=6, seed=5, dtype=F64)
    run_dir(tmp_path, 10, 4, **settings)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    new = {**settings, **change}
    n, size = new.pop("n", 10), new.pop("shard_size", 4)
    with pytest.raises(ValueError, match=rf"other settings \(.*\b{re.escape(field)}: "):
        run_dir(tmp_path, n, size, **new)
    assert before == {p.name: p.read_bytes() for p in tmp_path.iterdir()}  # nothing touched


def test_other_model_into_the_same_dir_is_refused(tmp_path):
    run_dir(tmp_path, 6, 3, solver="dpmpp_2m", steps=5, dtype=F64)
    other = fastsde.problems.mixture_2d(SDE, scale=2.0)
    with pytest.raises(ValueError, match="model: "):
        fastsde.sample_to_dir(other.score, SDE, (6, 2), tmp_path, solver="dpmpp_2m", steps=5, dtype=F64, shard_size=3)


def test_half_written_or_foreign_shards_are_never_done(tmp_path):
    n, settings = 40, dict(solver="dpmpp_2m", steps=8, seed=2, dtype=F64)
    run_dir(tmp_path, n, 10, **settings)
    ref = fastsde.load_samples(tmp_path)
    shards = sorted(tmp_path.glob("shard-*.npz"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])  # truncated (e.g. copied by hand and cut off)
    shutil.copy(shards[0], shards[3])  # a whole file in the wrong place
    stray = tmp_path / ".shard-00002.npz.abc123.tmp.npz"  # a write killed before its rename
    stray.write_bytes(data[:100])
    stray_manifest = tmp_path / ".manifest.json.xyz.tmp.json"
    stray_manifest.write_text("{")
    foreign = tmp_path / "foreign"
    run_dir(foreign, n, 10, solver="dpmpp_2m", steps=8, seed=3, dtype=F64)  # another seed: another run
    shutil.copy(foreign / shards[2].name, shards[2])
    with pytest.raises(ValueError, match=r"incomplete: 3 of 4 shards missing \(1, 2, 3; 10 of 40"):
        fastsde.load_samples(tmp_path)
    again = run_dir(tmp_path, n, 10, **settings)
    assert again.skipped == [0] and again.computed == [1, 2, 3] and again.complete
    assert not stray.exists() and not stray_manifest.exists()
    assert torch.equal(fastsde.load_samples(tmp_path), ref)


def test_load_samples_refuses_an_incomplete_run_unless_asked(tmp_path):
    n, settings = 25, dict(solver="dpmpp_2m", steps=5, seed=1, dtype=F64)
    run_dir(tmp_path, n, 10, **settings)
    (tmp_path / "shard-00001.npz").unlink()
    with pytest.raises(ValueError, match="incomplete.*allow_incomplete=True"):
        fastsde.load_samples(tmp_path)
    x, idx = fastsde.load_samples(tmp_path, allow_incomplete=True, with_indices=True)
    assert torch.equal(idx, torch.cat([torch.arange(0, 10), torch.arange(20, 25)]))
    assert torch.equal(x, reference(n, **settings)[idx])
    with pytest.raises(ValueError, match="holds no fastsde run"):
        fastsde.load_samples(tmp_path / "nothing")


def test_bad_arguments_are_refused_before_compute(tmp_path):
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="shard_size"):
            run_dir(tmp_path / "a", 4, bad, solver="dpmpp_2m", steps=4)
    with pytest.raises(ValueError, match="seed"):
        fastsde.sample_to_dir(GM.score, SDE, (4, 2), tmp_path / "b", solver="dpmpp_2m", steps=4, seed=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="valid"):
        run_dir(tmp_path / "c", 4, 2, solver="dpmpp_2m", stepz=4)
    with pytest.raises(ValueError, match="per_sample_norm"):
        run_dir(tmp_path / "d", 4, 2, solver="pc", steps=4)
    assert not any(tmp_path.iterdir())


def test_sigkill_mid_shard_then_rerun(tmp_path):
    n, size = 50, 10  # 10 score calls per shard: call 25 is in the middle of shard 2
    killed = worker(tmp_path, n, size, 25)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert sorted(p.name for p in tmp_path.glob("shard-*.npz")) == ["shard-00000.npz", "shard-00001.npz"]
    manifest = fastsde.shards.read_manifest(tmp_path)  # the manifest with the progress lines merged
    assert [e["status"] for e in manifest["shards"]] == ["done", "done", "pending", "pending", "pending"]
    with pytest.raises(ValueError, match="incomplete"):
        fastsde.load_samples(tmp_path)
    again = worker(tmp_path, n, size)
    assert again.returncode == 0, again.stderr
    assert reports(again.stdout) == {0: ([2, 3, 4], [0, 1])}
    x, idx = fastsde.load_samples(tmp_path, with_indices=True)
    assert torch.equal(idx, torch.arange(n))  # every index exactly once, in order
    assert torch.equal(x, reference(n, **WORKER_SETTINGS))


@needs_torchrun
def test_two_workers_equal_one_process(tmp_path):
    n, size = 45, 10
    res = worker(tmp_path, n, size, nproc=2)
    assert res.returncode == 0, res.stderr
    rep = reports(res.stdout)
    assert rep == {0: ([0, 2, 4], []), 1: ([1, 3], [])}  # no padding, no duplicates
    assert torch.equal(fastsde.load_samples(tmp_path), reference(n, **WORKER_SETTINGS))
    assert json.loads((tmp_path / "manifest.json").read_text())["summary"]["world_size"] == 2


@needs_torchrun
def test_a_rank_killed_under_torchrun_loses_at_most_its_shard(tmp_path):
    n, size = 60, 10  # rank 1 has shards 1, 3, 5; it dies in the middle of shard 3 (call 15)
    killed = worker(tmp_path, n, size, 15, 1, nproc=2)
    assert killed.returncode != 0
    present = {int(p.name[6:11]) for p in tmp_path.glob("shard-*.npz")}
    assert 1 in present and not present & {3, 5}
    again = worker(tmp_path, n, size, nproc=2)
    assert again.returncode == 0, again.stderr
    rep = reports(again.stdout)
    done_before = set(rep[0][1])
    assert done_before == set(rep[1][1]) and done_before >= {1}
    computed = rep[0][0] + rep[1][0]
    assert sorted(computed) == sorted(set(range(6)) - done_before)  # each missing shard once
    x, idx = fastsde.load_samples(tmp_path, with_indices=True)
    assert torch.equal(idx, torch.arange(n))
    assert torch.equal(x, reference(n, **WORKER_SETTINGS))


def test_cli_run_dir(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["sample", "--model", "mixture", "--solver", "dpmpp_2m", "--steps", "10", "--n", "30", "--no-progress"]
    assert main([*args, "--shard-size", "8", "--out", f"{out}/"]) == 0
    text = capsys.readouterr().out
    assert "rank 0: shard 1/4 [0, 8) NFE 10.0" in text and "rank 0: shard 4/4 [24, 30)" in text
    assert "quality: mixture FD" in text and "4 shards of 8" in text
    assert torch.equal(fastsde.load_samples(out), reference(30, solver="dpmpp_2m", steps=10, seed=0, dtype=F64))
    assert json.loads((out / "manifest.json").read_text())["settings"]["model"] == "mixture"
    # an existing folder is a run folder too; the rerun resumes
    assert main([*args, "--shard-size", "8", "--out", str(out)]) == 0
    assert "computed 0 shard(s) on rank 0, 4 already done" in capsys.readouterr().out
    # other settings: one line, exit 2
    args11 = [a if a != "10" else "11" for a in args]
    assert main([*args11, "--shard-size", "8", "--out", str(out)]) == 2
    assert "options.steps: 10 -> 11" in capsys.readouterr().err
    assert main([*args, "--shard-size", "8", "--out", str(tmp_path / "x.npz")]) == 2
    assert "--shard-size" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(out / "shard-00000.npz")["nfe_per_sample"], np.full(8, 10.0))


# ---------------------------------------------------------------------------------------------
# likelihood over a data set, sharded the same way
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def points() -> torch.Tensor:
    return reference(20, solver="dpmpp_2m", steps=10, seed=1, dtype=F64)


@pytest.mark.parametrize("shard_size", [3, 20])
def test_sharded_likelihood_equals_dataset_likelihood(tmp_path, points, shard_size):
    kw = dict(dtype=F64, seed=4, passes=2, trace="hutchinson")
    ref = fastsde.dataset_likelihood(GM.score, SDE, points, (2,), **kw)
    run = fastsde.likelihood_to_dir(GM.score, SDE, points, (2,), tmp_path, shard_size=shard_size, **kw)
    assert run.complete
    res = fastsde.load_likelihood(tmp_path)
    torch.testing.assert_close(res.logp, ref.logp, rtol=1e-10, atol=1e-10)  # adaptive RK45: rounding only
    torch.testing.assert_close(res.bpd, ref.bpd, rtol=1e-10, atol=1e-10)
    assert res.nfe_per_sample.shape == ref.nfe_per_sample.shape == (2, 20)
    assert res.pass_bpd == pytest.approx(ref.pass_bpd, rel=1e-10)
    assert run.manifest["summary"]["bpd"] == pytest.approx(ref.bits_per_dim, rel=1e-10)


def test_sharded_likelihood_resumes_and_refuses_other_data(tmp_path, points):
    kw = dict(dtype=F64, seed=4)
    fastsde.likelihood_to_dir(GM.score, SDE, points, (2,), tmp_path, shard_size=8, **kw)
    (tmp_path / "shard-00001.npz").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        fastsde.load_likelihood(tmp_path)
    again = fastsde.likelihood_to_dir(GM.score, SDE, points, (2,), tmp_path, shard_size=8, **kw)
    assert again.computed == [1] and again.skipped == [0, 2]
    other = points.clone()
    other[3, 0] += 0.01
    with pytest.raises(ValueError, match=r"data\.sha256"):
        fastsde.likelihood_to_dir(GM.score, SDE, other, (2,), tmp_path, shard_size=8, **kw)
    with pytest.raises(ValueError, match="load_likelihood"):
        fastsde.load_samples(tmp_path)


def test_batch_size_identifies_a_scipy_likelihood_run_only(tmp_path, points):
    """scipy's solve_ivp steps the whole batch together (results depend on the batch), rk45 each sample
    on its own: another batch size resumes an rk45 run and is refused for a scipy one."""
    kw = dict(dtype=F64, seed=4, shard_size=8)
    fastsde.likelihood_to_dir(GM.score, SDE, points, (2,), tmp_path / "rk45", batch_size=4, **kw)
    again = fastsde.likelihood_to_dir(GM.score, SDE, points, (2,), tmp_path / "rk45", batch_size=8, **kw)
    assert again.computed == [] and again.skipped == [0, 1, 2]
    part = points[:8]
    fastsde.likelihood_to_dir(GM.score, SDE, part, (2,), tmp_path / "scipy", batch_size=4, method="scipy", **kw)
    with pytest.raises(ValueError, match="batch_size"):
        fastsde.likelihood_to_dir(GM.score, SDE, part, (2,), tmp_path / "scipy", batch_size=8, method="scipy", **kw)


def test_cli_likelihood_run_dir(tmp_path, points, capsys):
    data = tmp_path / "points.npy"
    np.save(data, points.numpy())
    args = ["likelihood", "--model", "mixture2d-vp", "--data", str(data), "--no-progress"]
    assert main([*args]) == 0
    plain = [line for line in capsys.readouterr().out.splitlines() if line.startswith("bits/dim")]
    assert main([*args, "--out", str(tmp_path / "run"), "--shard-size", "6"]) == 0
    text = capsys.readouterr().out
    assert "rank 0: shard 4/4 [18, 20)" in text
    assert [line for line in text.splitlines() if line.startswith("bits/dim")] == plain

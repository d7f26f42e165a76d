"""Hostile input to every `fastsde` subcommand (hypothesis): malformed numbers (huge, NaN, inf, zero,
negative), huge ranges, bad devices, unwritable outputs and malformed input files (random bytes,
truncated files, JSON with wrong-typed fields) must each end in ONE line on stderr starting
``fastsde <cmd>: error:`` and exit status 2, before any compute, leaving nothing in the output folder.

The CLI is called in-process (``fastsde.cli.main``): a subprocess per case would import torch each
time. "Nothing computed" is checked by patching the only places work happens, the score evaluation
(``CountingScore.__call__``) and the training step (``Trainer.train_step``), to raise ``Computed``: a
case that wrongly passes its checks stops at its first evaluation instead of running.

A value the subcommand's argparse type cannot parse (``--n abc``) is argparse's own error: its usage
lines, then the one ``fastsde <cmd>: error:`` line (tests/test_first_user.py keeps that form).

A malformed file whose content still makes sense (a mutated field that stays valid) may be accepted:
such a case must then reach the compute (``Computed``) or finish (``--merge`` does no compute), never
raise anything else.

``FOUND`` lists the distinct failures these tests (and the audit they come from) found, all fixed.
``test_report_case_count`` (last) prints how many cases ran; ``pytest -s`` shows it."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastsde
from fastsde.cli import main

CASES = {"count": 0, "refused": 0, "accepted": 0}

#: (command, input, what it raised before the fix): every distinct failure found, all now one line + exit 2
FOUND = [
    ("sample", "--label 0-99999999999 (digits-cond)", "MemoryError: the range expanded to a Python list"),
    ("sample", "--steps 100000000000", "RuntimeError: 800 GB allocation for the time grid"),
    ("sample", "--n 10000000000", "hang: seeds hashed in a Python loop over all n before the first batch"),
    ("sample", "--device meta", "ran the whole solve on the meta device (no error before compute)"),
    ("sample", "--label 3 (digits-cond)", "headline FD 1061 measured against all digits, not label 3's"),
    ("sample", "--grid FILE with wrong-typed metadata", "KeyError/TypeError from the grid loader"),
    ("sample", "--table FILE malformed", "SafetensorError/KeyError traceback (not caught at all)"),
    ("sample", "--p FILE (ML-EM schedule) with wrong-typed fields", "KeyError/TypeError traceback"),
    ("sample", "--model FOLDER with a malformed config.json", "KeyError/TypeError traceback"),
    ("sample", "--model ''", "silently sampled the default model (pathlib reads '' as the current folder)"),
    ("fit-grid", "--model ''", "tried to load the current folder as a model"),
    ("sample", "--n 100000 --out x.png", "a 2560x2560-tile PNG grid after the whole run"),
    ("fit-grid", "--device meta|cuda|foo", "traceback / compute on a device that is not there"),
    ("fit-grid", "--out an existing unwritable folder (audit)", "error after the fit, naming a temporary file"),
    ("fit-grid", "--out NEW when a later check fails", "empty output folder left behind"),
    ("fit-iia", "--out an existing unwritable folder (audit)", "error after the fit, naming a temporary file"),
    ("fit-iia", "--n -1 --out NEW", "output folder created, then the error"),
    ("fit-iia", "--steps 2,1000000000", "huge fine grid allocated"),
    ("fit-mlem", "--degree 100000", "compute started (no upper bound)"),
    ("fit-mlem", "--levels FOLDER malformed", "KeyError/TypeError traceback"),
    ("train", "--channels 0,0", "ZeroDivisionError traceback"),
    ("train", "--channels 8,8,8,8,8 (8x8 images)", "RuntimeError traceback in the first training step"),
    ("train", "--channels 12,20", "error after the checkpoint folder was created"),
    ("train", "--resume with a malformed train_state.json", "KeyError/TypeError traceback"),
    ("train", "--data FILE (.npz) labels of 10**12 classes with --conditional", "MemoryError (huge embedding)"),
    ("train", "--threads 0 / -5", "silently ran on 1 thread"),
    ("likelihood", "--levels 10**23", "int64 overflow; a misleading error only after data preparation"),
    ("bench", "--merge DIR with a malformed results.json", "JSONDecodeError/KeyError traceback"),
    ("bench", "--merge DIR with wrong-typed fields", "results.json written, then a traceback: half an output set"),
    ("bench", "--out an existing unwritable folder (audit)", "error after the whole bench, naming a temporary file"),
    ("bench", "--processes ,", "exit 0 after running no process at all"),
    ("bench", "--tolerances ,", "silently used the default tolerances"),
    ("bench", "--dim 10**9", "allocation of dim x dim covariances"),
    ("any", "stdout closed (fastsde ... >&-)", "AttributeError: 'NoneType' object has no attribute 'flush'"),
]


#: first item of an argv whose malformed file may still be valid (see check_refused's may_accept)
ACCEPT = "<may accept>"


class Computed(BaseException):
    """Raised by the patched score and training step: the command started work it should have refused."""


SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- values ----------------------------------------------------------------------------------------

HUGE = st.integers(10**9, 10**30)
NONPOSITIVE = st.integers(-(10**20), 0)
BAD_FLOATS = st.sampled_from(["nan", "inf", "-inf", "-1", "-1e-300", "1e400", "-1e400", "NaN"])
NOT_NUMBERS = st.sampled_from(["abc", "", "1,2", "0x10", "--", "1e", "one"])
BAD_DEVICES = st.sampled_from(
    ["meta", "cuda", "cuda:0", "cuda:7", "mps", "foo", "", "xla", "cuda:abc", "hpu", "cpu:x", "ipu", "vulkan"]
)
JSON_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _int_text(bad: st.SearchStrategy) -> st.SearchStrategy:
    return bad.map(str)


def _key_paths(obj, prefix=()):
    """Every path (of dict keys and list indices) inside a JSON value."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield (*prefix, k)
            yield from _key_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):
            yield (*prefix, i)
            yield from _key_paths(v, (*prefix, i))


@st.composite
def mutated_json(draw, base):
    """``base`` with one field replaced by a wrong-typed value or deleted, or the whole replaced."""
    data = copy.deepcopy(base)
    paths = list(_key_paths(data))
    if not paths or draw(st.integers(0, 9)) == 0:
        return draw(JSON_JUNK)
    path = draw(st.sampled_from(paths))
    parent = data
    for k in path[:-1]:
        parent = parent[k]
    if draw(st.booleans()) and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(JSON_JUNK)
    return data


def _dumps(data) -> str:
    return json.dumps(data, allow_nan=True)


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Valid inputs the cases start from (and mutate): files of every kind the CLI reads."""
    from fastsde.files import save_tensors_with_meta
    from fastsde.training import TrainConfig, Trainer

    root = tmp_path_factory.mktemp("inputs")
    pkg = Path(fastsde.__file__).parent
    d = {"root": root}
    grid = sorted((pkg / "_assets" / "fitted_grids").glob("digits-dpmpp_2m-*.safetensors"))[0]
    table = sorted((pkg / "_assets" / "iia_tables").glob("digits-dpmpp_2m-*.safetensors"))[0]
    d["grid"] = grid.read_bytes()
    d["table"] = table.read_bytes()
    mlem = root / "schedule.safetensors"
    meta = {
        "format": fastsde.artifacts.mlem.FORMAT,
        "p_min": 0.01,
        "key": {"levels": ["digits-small", "digits"], "costs": [1.0, 2.0], "steps": 4},
        "fit": {},
    }
    save_tensors_with_meta(mlem, {"theta": torch.zeros(1, 3, dtype=torch.float64)}, meta)
    d["mlem"] = mlem.read_bytes()
    # a model folder as `fastsde train` writes it, and its training state
    images = np.random.default_rng(0).integers(0, 17, size=(8, 8, 8)).astype(np.uint8)
    np.save(root / "tiny.npy", images)
    d["tiny"] = root / "tiny.npy"
    cfg = TrainConfig(channels=(8, 16), batch_size=4, norm_groups=8, data=str(d["tiny"]))
    trainer = Trainer(cfg, torch.from_numpy(images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1))
    trainer.save(root / "model")
    d["model"] = root / "model"
    d["model_config"] = json.loads((root / "model" / "config.json").read_text())
    d["train_state"] = json.loads((root / "model" / "train_state.json").read_text())
    d["points"] = root / "points.npy"
    np.save(d["points"], np.random.default_rng(1).uniform(-0.5, 0.5, size=(4, 2)))
    # a real bench result (tiny: one sampler, one budget) for --merge
    assert (
        main(
            [
                "bench", "--n", "8", "--dim", "2", "--processes", "vp", "--samplers", "em", "--budgets", "4",
                "--tolerances", "0.1", "--no-progress", "--no-peers", "--out", str(root / "bench"),
            ]
        )
        == 0
    )  # fmt: skip
    d["bench"] = json.loads((root / "bench" / "results.json").read_text())
    return d


@pytest.fixture
def guard(monkeypatch, tmp_path):
    """Patch the two places work happens to raise Computed; the watched output folder."""
    from fastsde.score import CountingScore
    from fastsde.training import Trainer

    calls = []

    def score_call(self, *args, **kwargs):
        calls.append("score")
        raise Computed("a score was evaluated")

    def train_step(self):
        calls.append("train_step")
        raise Computed("a training step ran")

    monkeypatch.setattr(CountingScore, "__call__", score_call)
    monkeypatch.setattr(Trainer, "train_step", train_step)
    out = tmp_path / "out"
    out.mkdir()
    files = tmp_path / "files"
    files.mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    return {"calls": calls, "out": out, "files": files, "tmp": tmp_path}


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _clear(folder: Path) -> None:
    import shutil

    for p in folder.iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def check_refused(argv: list[str], guard, capsys, *, may_accept: bool = False) -> None:
    """Run ``fastsde argv``: exit status 2 with one error line (or argparse's usage + that line), no
    traceback, nothing computed, nothing new in the output folder. ``may_accept``: a mutated input
    that stays valid may run instead (it then stops at its first evaluation, or finishes)."""
    CASES["count"] += 1
    cmd = argv[0]
    prefix = f"fastsde {cmd}: error:"
    out = guard["out"]
    before = _listing(out)
    guard["calls"].clear()
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse: a value its type cannot parse, or a bad choice
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.code == 2 and err and err[-1].startswith(prefix), (argv, err)
        assert err[0].startswith("usage:") and "Traceback" not in "\n".join(err), (argv, err)
        assert _listing(out) == before
        CASES["refused"] += 1
        return
    except Computed:
        assert may_accept, f"computed before refusing: {argv}"
        CASES["accepted"] += 1
        _clear(out)
        return
    captured = capsys.readouterr()
    if rc == 0 and may_accept:
        CASES["accepted"] += 1
        _clear(out)
        return
    lines = captured.err.strip().splitlines()
    assert rc == 2, (argv, rc, captured.err)
    assert len(lines) == 1 and lines[0].startswith(prefix), (argv, captured.err)
    assert "Traceback" not in captured.err
    assert not guard["calls"], (argv, guard["calls"])
    after = _listing(out)
    assert after == before, (argv, sorted(after - before))
    assert not [p for p in after if ".tmp" in p]
    CASES["refused"] += 1


def _file(guard, name: str, content: bytes | str) -> str:
    path = guard["files"] / name
    if path.is_dir():
        import shutil

        shutil.rmtree(path)
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    return str(path)


@st.composite
def malformed_tensors_file(draw, base: bytes, fmt: str):
    """A safetensors file with fastsde metadata gone wrong: random bytes, a truncation, or a valid
    container whose metadata (or tensors) has a wrong-typed or missing field."""
    from fastsde.files import save_tensors_with_meta  # noqa: F401 - the writer these files imitate

    kind = draw(st.sampled_from(["random", "truncated", "meta", "tensor"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "truncated":
        return base[: draw(st.integers(0, len(base) - 1))]
    from safetensors.torch import load, save

    tensors = load(base)
    n = int.from_bytes(base[:8], "little")
    meta = json.loads(json.loads(base[8 : 8 + n])["__metadata__"]["fastsde"])
    if kind == "meta":
        meta = draw(mutated_json(meta))
    else:
        name = draw(st.sampled_from(sorted(tensors)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        value = draw(st.sampled_from([0.0, math.nan, math.inf, -1.0, 1e300]))
        dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.int64, torch.uint8]))
        tensors[name] = (
            torch.full(shape, value, dtype=torch.float64).to(dtype)
            if dtype.is_floating_point
            else torch.zeros(shape, dtype=dtype)
        )
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata={"fastsde": _dumps(meta)})


# -- sample ----------------------------------------------------------------------------------------

MIX = ["sample", "--model", "mixture", "--solver", "em", "--steps", "3", "--n", "2", "--no-metric", "--no-progress"]


def _sample_bad(guard, inputs) -> st.SearchStrategy:
    out = str(guard["out"] / "s.npz")
    base = [*MIX, "--out", out]
    cond = ["sample", "--model", "digits-cond", "--solver", "em", "--steps", "3", "--n", "2", "--no-metric"]
    cond += ["--no-progress", "--out", out]
    digits = ["sample", "--solver", "em", "--steps", "3", "--no-metric", "--no-progress"]
    proc, sysf = "/proc/fastsde-fuzz", guard["tmp"] / "a-file"
    return st.one_of(
        _int_text(st.one_of(NONPOSITIVE, HUGE)).map(lambda v: [*base, "--n", v]),
        _int_text(st.one_of(st.integers(-5, 1), st.integers(100_001, 10**30))).map(lambda v: [*base, "--steps", v]),
        st.integers(100_001, 10**15).map(lambda v: [*base, "--option", f"steps={v}"]),
        st.integers(100_001, 10**15).map(lambda v: ["sample", "--model", "mixture", "--solver", "pc", "--n", "2",
                                                    "--steps", "3", "--out", out, "--option", f"corrector_steps={v}"]),
        _int_text(NONPOSITIVE).map(lambda v: [*base, "--batch-size", v]),
        _int_text(st.one_of(st.integers(-(10**20), -1), st.integers(2**64, 2**80))).map(lambda v: [*base, "--seed", v]),
        BAD_DEVICES.map(lambda v: [*base, "--device", v]),
        NOT_NUMBERS.map(lambda v: [*base, "--n", v]),
        BAD_FLOATS.map(lambda v: [*base, "--t-end", v]),
        BAD_FLOATS.map(lambda v: ["sample", "--model", "mixture", "--n", "2", "--out", out, "--eps-rel", v]),
        st.sampled_from(["nan", "inf", "-inf"]).map(lambda v: [*cond, "--label", "3", "--guidance", v]),
        st.one_of(
            st.tuples(st.integers(0, 10), HUGE).map(lambda r: f"{r[0]}-{r[1]}"),
            st.tuples(st.integers(1, 10**6), st.integers(0, 10**6)).filter(lambda r: r[0] > r[1]).map(
                lambda r: f"{r[0]}-{r[1]}"
            ),
            st.integers(10, 10**30).map(str),
            st.sampled_from(["-1", "x", "", ",", "1,,2", "3-", "-3-5", "1-2-3", "nan", "1e3", "0-9,x"]),
            st.lists(st.integers(-5, 10**12), min_size=1, max_size=5).filter(lambda v: any(x > 9 or x < 0 for x in v))
            .map(lambda v: ",".join(map(str, v))),
        ).map(lambda v: [*cond, "--label", v]),
        st.sampled_from(["3", "0-9"]).map(lambda v: [*base, "--label", v]),  # an unconditional model
        st.sampled_from(
            [f"{proc}/s.png", f"{proc}/s.npz", f"{sysf}/s.png", "/nonexistent-fuzz/s.npz", str(guard["out"] / "s.txt")]
        ).map(lambda v: [*MIX, "--out", v]),
        st.sampled_from([f"{proc}/run/", f"{sysf}/run/", str(sysf)]).map(lambda v: [*MIX, "--out", v]),
        _int_text(st.integers(-5, 10**6)).map(lambda v: [*base, "--shard-size", v]),
        st.integers(10**10 + 1, 10**30).map(lambda v: [*MIX[:-1], "--out", str(guard["out"] / "run") + "/", "--n", str(v)]),
        st.integers(10**8 + 1, 10**10).map(
            lambda v: [*MIX, "--out", str(guard["out"] / "run") + "/", "--n", str(v), "--shard-size", "1"]
        ),
        st.integers(2**26 + 1, 10**8).map(lambda v: [*digits, "--n", str(v), "--out", out]),  # > 4 GiB in memory
        st.integers(65_537, 2**24).map(lambda v: [*digits, "--n", str(v), "--out", str(guard["out"] / "s.png")]),
        malformed_tensors_file(inputs["grid"], "grid").map(
            lambda b: [ACCEPT, "sample", "--solver", "dpmpp_2m", "--n", "2", "--no-metric", "--out", out,
                       "--grid", _file(guard, "grid.safetensors", b)]
        ),
        malformed_tensors_file(inputs["table"], "iia").map(
            lambda b: [ACCEPT, "sample", "--solver", "iia_dpmpp_2m", "--steps", "4", "--n", "2", "--no-metric", "--out", out,
                       "--table", _file(guard, "table.safetensors", b)]
        ),
        malformed_tensors_file(inputs["mlem"], "mlem").map(
            lambda b: [ACCEPT, "sample", "--solver", "mlem", "--levels", "digits-small,digits", "--steps", "4", "--n", "2",
                       "--no-metric", "--out", out, "--p", _file(guard, "p.safetensors", b)]
        ),
        st.sampled_from(["--grid", "--table", "--p"]).map(
            lambda f: ["sample", "--solver", {"--grid": "dpmpp_2m", "--table": "iia_dpmpp_2m", "--p": "mlem"}[f],
                       *(["--levels", "digits-small,digits"] if f == "--p" else []), "--n", "2", "--out", out,
                       f, str(guard["files"] / "missing.safetensors")]
        ),
        st.sampled_from(["/proc", str(guard["tmp"] / "a-file"), ""]).map(lambda v: [*base[:2], v, *base[3:]]),
    )  # fmt: skip


@settings(SETTINGS, max_examples=150)
@given(data=st.data())
def test_fuzz_sample(data, guard, inputs, capsys):
    argv = data.draw(_sample_bad(guard, inputs))
    accept = argv[0] == ACCEPT  # a mutated file that may still be valid
    check_refused(argv[1:] if accept else argv, guard, capsys, may_accept=accept)


def _model_folder(guard, inputs, config) -> str:
    """A model folder with the given config.json next to valid weights."""
    import shutil

    folder = guard["files"] / "model"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    shutil.copy(inputs["model"] / "model.safetensors", folder / "model.safetensors")
    (folder / "config.json").write_text(config if isinstance(config, str) else _dumps(config))
    return str(folder)


@settings(SETTINGS, max_examples=60)
@given(data=st.data())
def test_fuzz_model_folders(data, guard, inputs, capsys):
    """A model folder whose config.json is mutated, truncated or not JSON, for every command that takes
    one; a mutation that leaves a valid model may run (and is stopped at its first evaluation)."""
    config = data.draw(
        st.one_of(
            mutated_json(inputs["model_config"]),
            st.binary(max_size=100).map(lambda b: b.decode("latin-1")),
            st.integers(1, 200).map(lambda k: _dumps(inputs["model_config"])[:k]),
        )
    )
    folder = _model_folder(guard, inputs, config)
    out = guard["out"]
    cmd = data.draw(st.sampled_from(["sample", "fit-grid", "fit-iia", "fit-mlem", "sample-levels"]))
    argv = {
        "sample": ["sample", "--model", folder, "--solver", "em", "--steps", "3", "--n", "2", "--no-metric",
                   "--out", str(out / "s.npz")],
        "sample-levels": ["sample", "--solver", "mlem", "--levels", f"digits-small,{folder}", "--steps", "4",
                          "--n", "2", "--no-metric", "--out", str(out / "s.npz")],
        "fit-grid": ["fit-grid", "--model", folder, "--steps", "3", "--n", "2", "--fine", "4", "--sweeps", "0",
                     "--out", str(out / "g")],
        "fit-iia": ["fit-iia", "--model", folder, "--steps", "3", "--n", "2", "--fine-steps", "2", "--quiet",
                    "--out", str(out / "t")],
        "fit-mlem": ["fit-mlem", "--levels", f"digits-small,{folder}", "--steps", "4", "--n", "2", "--iters", "1",
                     "--quiet", "--out", str(out / "m.safetensors")],
    }[cmd]  # fmt: skip
    check_refused(argv, guard, capsys, may_accept=True)


# -- train -----------------------------------------------------------------------------------------


def _train_bad(guard, inputs) -> st.SearchStrategy:
    base = ["train", "--data", str(inputs["tiny"]), "--channels", "8,16", "--batch-size", "4", "--steps", "2"]
    base += ["--quiet", "--out", str(guard["out"] / "ck")]
    flag_int = {
        "--steps": st.one_of(NONPOSITIVE, st.integers(10**7 + 1, 10**30)),
        "--batch-size": st.one_of(NONPOSITIVE, st.integers(65_537, 10**30)),
        "--save-every": NONPOSITIVE,
        "--seed": st.one_of(st.integers(-(10**20), -1), st.integers(2**64, 2**80)),
        "--threads": st.one_of(NONPOSITIVE, st.integers(1025, 10**20)),
    }
    flag_float = {
        "--lr": st.one_of(BAD_FLOATS, st.just("0")),
        "--ema": st.one_of(BAD_FLOATS, st.sampled_from(["1", "2"])),
        "--max-minutes": st.one_of(st.sampled_from(["nan", "0", "-1", "-inf"])),
        "--sigma-min": st.one_of(BAD_FLOATS, st.sampled_from(["0", "30"])),
        "--sigma-max": st.one_of(BAD_FLOATS, st.sampled_from(["0", "0.001"])),
        "--label-dropout": st.one_of(BAD_FLOATS, st.sampled_from(["1", "1.5"])),
    }
    channels = st.one_of(
        st.sampled_from(["0,0", "0", "-8,16", "8,,16", "", ",", "8;16", "1e3", "12,20", "8,8,8,8,8", "8,12"]),
        st.lists(st.integers(-5, 10**7), min_size=7, max_size=9).map(lambda v: ",".join(map(str, v))),
        st.lists(st.integers(4097, 10**12), min_size=1, max_size=3).map(lambda v: ",".join(map(str, v))),
    )
    npz_labels = st.one_of(
        st.just(np.arange(3)),  # wrong count
        st.just(np.array([-1] * 8)),
        st.integers(100_000, 2**62).map(lambda k: np.full(8, k)),
    )

    def bad_npz(labels):
        path = guard["files"] / "data.npz"
        np.savez(path, x=np.zeros((8, 8, 8), np.uint8), labels=labels)
        return [*base[:2], str(path), *base[3:], "--conditional"]

    def bad_state(state):
        import shutil

        folder = guard["out"] / "ck"
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(inputs["model"], folder)
        (folder / "train_state.json").write_text(state if isinstance(state, str) else _dumps(state))
        return folder

    return st.one_of(
        *(v.map(lambda x, f=f: [*base, f, str(x)]) for f, v in flag_int.items()),
        *(v.map(lambda x, f=f: [*base, f, x]) for f, v in flag_float.items()),
        NOT_NUMBERS.map(lambda v: [*base, "--steps", v]),
        channels.map(lambda v: [*base, "--channels", v]),
        st.binary(max_size=200).map(lambda b: [*base[:2], _file(guard, "d.npy", b), *base[3:]]),
        st.binary(max_size=200).map(lambda b: [*base[:2], _file(guard, "d.npz", b), *base[3:]]),
        st.integers(0, 127).map(
            lambda k: [*base[:2], _file(guard, "t.npy", inputs["tiny"].read_bytes()[:k]), *base[3:]]
        ),
        st.sampled_from([(3,), (0, 8, 8), (1, 8, 8), (4, 8, 8, 8, 2), (2, 3, 5)]).map(
            lambda s: [*base[:2], _npy(guard, np.zeros(s, np.uint8)), *base[3:]]
        ),
        st.sampled_from(["nope", "/proc", str(guard["tmp"] / "a-file")]).map(lambda v: [*base[:2], v, *base[3:]]),
        npz_labels.map(bad_npz),
        st.just([*base, "--conditional"]),  # an .npy has no labels
        st.sampled_from(["/proc/ck", str(guard["tmp"] / "a-file"), str(guard["tmp"] / "a-file" / "ck")]).map(
            lambda v: [*base[:-1], v]
        ),
        st.just([*base, "--resume"]),  # nothing to resume
        st.one_of(
            mutated_json(inputs["train_state"]),
            st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
        ).map(lambda s: [*base[:-1], str(bad_state(s)), "--resume", "--steps", "3"]),
    )


def _npy(guard, arr) -> str:
    path = guard["files"] / "shape.npy"
    np.save(path, arr)
    return str(path)


@settings(SETTINGS, max_examples=120)
@given(data=st.data())
def test_fuzz_train(data, guard, inputs, capsys):
    argv = data.draw(_train_bad(guard, inputs))
    resume = "--resume" in argv and (guard["out"] / "ck" / "train_state.json").exists()
    if resume:  # the checkpoint the case mutated is in the watched folder: watch what is beside it
        before = _listing(guard["out"])
        CASES["count"] += 1
        guard["calls"].clear()
        capsys.readouterr()
        try:
            rc = main(argv)
        except Computed:  # a mutation that left a valid state: it resumed (stopped at its first step)
            CASES["accepted"] += 1
            _clear(guard["out"])
            return
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("fastsde train: error:"), (argv, err)
        assert not guard["calls"] and _listing(guard["out"]) == before
        CASES["refused"] += 1
        _clear(guard["out"])
        return
    check_refused(argv, guard, capsys)


# -- likelihood ------------------------------------------------------------------------------------


def _likelihood_bad(guard, inputs) -> st.SearchStrategy:
    base = ["likelihood", "--model", "mixture2d-vp", "--data", str(inputs["points"]), "--n", "2", "--no-progress"]
    ints = {
        "--n": st.one_of(NONPOSITIVE, st.integers(10**8 + 1, 10**30)),
        "--batch-size": NONPOSITIVE,
        "--probes": st.one_of(NONPOSITIVE, st.integers(10_001, 10**30)),
        "--passes": st.one_of(NONPOSITIVE, st.integers(10_001, 10**30)),
        "--max-steps": st.one_of(NONPOSITIVE, st.integers(10**7 + 1, 10**30)),
        "--levels": st.one_of(st.integers(-(10**9), 1), st.integers(2**16 + 1, 10**30)),
        "--seed": st.one_of(st.integers(-(10**20), -1), st.integers(2**64, 2**80)),
        "--shard-size": st.integers(-(10**6), 10**6),  # without --out: refused whatever the value
    }
    floats = {"--rtol": st.one_of(BAD_FLOATS, st.just("0")), "--atol": st.one_of(BAD_FLOATS, st.just("0")),
              "--offset": st.sampled_from(["nan", "inf", "-inf", "1e400"])}  # fmt: skip
    return st.one_of(
        *(v.map(lambda x, f=f: [*base, f, str(x)]) for f, v in ints.items()),
        *(v.map(lambda x, f=f: [*base, f, x]) for f, v in floats.items()),
        NOT_NUMBERS.map(lambda v: [*base, "--probes", v]),
        st.binary(max_size=200).map(lambda b: [*base[:4], _file(guard, "p.npy", b), *base[5:]]),
        st.binary(max_size=200).map(lambda b: [*base[:4], _file(guard, "p.npz", b), *base[5:]]),
        st.integers(0, 127).map(
            lambda k: [*base[:4], _file(guard, "p.npy", inputs["points"].read_bytes()[:k]), *base[5:]]
        ),
        st.sampled_from([(0, 2), (3,), (2, 3), (2, 2, 2)]).map(
            lambda s: [*base[:4], _npy(guard, np.zeros(s)), *base[5:]]
        ),
        st.sampled_from([np.full((2, 2), np.nan), np.full((2, 2), np.inf), np.array([["a", "b"]])]).map(
            lambda a: [*base[:4], _npy(guard, a), *base[5:]]
        ),
        st.sampled_from(["nope", "digits-x", "mixture2d-"]).map(lambda v: [*base[:2], v, *base[3:]]),
        st.just(["likelihood", "--model", "mixture2d-vp", "--n", "2"]),  # a mixture needs --data
        st.sampled_from(["/proc/lk", str(guard["tmp"] / "a-file"), str(guard["tmp"] / "a-file" / "lk")]).map(
            lambda v: [*base, "--out", v]
        ),
        st.integers(10**5 + 1, 10**8).map(
            lambda v: [*base[:-3], "--out", str(guard["out"] / "lk"), "--shard-size", "1", "--n", str(v)]
        ),  # fmt: skip
    )


@settings(SETTINGS, max_examples=100)
@given(data=st.data())
def test_fuzz_likelihood(data, guard, inputs, capsys):
    check_refused(data.draw(_likelihood_bad(guard, inputs)), guard, capsys)


# -- bench -----------------------------------------------------------------------------------------


def _bench_bad(guard, inputs) -> st.SearchStrategy:
    base = ["bench", "--n", "4", "--dim", "2", "--processes", "vp", "--samplers", "em", "--budgets", "4"]
    base += ["--tolerances", "0.1", "--no-progress", "--no-peers", "--out", str(guard["out"] / "b")]

    def piece(content) -> str:
        folder = guard["files"] / "piece"
        folder.mkdir(exist_ok=True)
        (folder / "results.json").write_text(content if isinstance(content, str) else _dumps(content))
        return str(folder)

    return st.one_of(
        _int_text(st.one_of(st.integers(-(10**9), 1), st.integers(10**8 + 1, 10**30))).map(lambda v: [*base, "--n", v]),
        _int_text(st.one_of(NONPOSITIVE, st.integers(4097, 10**30))).map(lambda v: [*base, "--dim", v]),
        st.one_of(
            st.sampled_from(["0", "-1", "", ",", "x", "4,x", "1e3"]),
            st.integers(100_001, 10**30).map(str),
        ).map(lambda v: [*base, "--budgets", v]),
        st.sampled_from(["nan", "0", "1", "2", "-1", "inf", "x", ",", ""]).map(lambda v: [*base, "--tolerances", v]),
        st.sampled_from(["foo", "vp,foo", ",", ""]).map(lambda v: [*base, "--processes", v]),
        st.sampled_from(["nope", "em,nope"]).map(lambda v: [*base, "--samplers", v]),
        _int_text(st.one_of(st.integers(-(10**20), -1), st.integers(2**64, 2**80))).map(lambda v: [*base, "--seed", v]),
        st.sampled_from(["/proc/b", str(guard["tmp"] / "a-file"), str(guard["tmp"] / "a-file" / "b")]).map(
            lambda v: [*base[:-1], v]
        ),
        st.just(["bench", "--merge", str(guard["files"] / "no-such-run"), "--out", str(guard["out"] / "m")]),
    )


@settings(SETTINGS, max_examples=80)
@given(data=st.data())
def test_fuzz_bench(data, guard, inputs, capsys):
    check_refused(data.draw(_bench_bad(guard, inputs)), guard, capsys)


@settings(SETTINGS, max_examples=30)
@given(
    content=st.one_of(
        st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
        st.integers(0, 400).map(lambda k: ("T", k)),
        st.just(("M", None)),
    ),
    data=st.data(),
)
def test_fuzz_bench_merge(content, data, guard, inputs, capsys):
    """--merge of a results.json that is not JSON, truncated, or has a wrong-typed field: refused in one
    line, or (a mutation that stays valid) merged; never half an output set."""
    if isinstance(content, tuple) and content[0] == "T":
        content = _dumps(inputs["bench"])[: content[1]]
    elif isinstance(content, tuple):
        content = _dumps(data.draw(mutated_json(inputs["bench"])))
    folder = guard["files"] / "piece"
    folder.mkdir(exist_ok=True)
    (folder / "results.json").write_text(content)
    check_refused(["bench", "--merge", str(folder), "--out", str(guard["out"] / "m")], guard, capsys, may_accept=True)
    assert not [p for p in guard["tmp"].rglob("*") if ".tmp" in p.name]


# -- fit-iia, fit-grid, fit-mlem --------------------------------------------------------------------


def _fit_bad(guard, inputs) -> st.SearchStrategy:
    out = guard["out"]
    iia = ["fit-iia", "--model", "mixture", "--solver", "dpmpp_2m", "--steps", "3", "--n", "2", "--fine-steps", "2"]
    iia += ["--quiet", "--out", str(out / "t")]
    grid = ["fit-grid", "--model", "mixture", "--solver", "dpmpp_2m", "--steps", "3", "--n", "2", "--fine", "4"]
    grid += ["--sweeps", "0", "--out", str(out / "g")]
    mlem = ["fit-mlem", "--levels", "digits-small,digits", "--steps", "4", "--n", "2", "--iters", "1", "--quiet"]
    mlem += ["--out", str(out / "m.safetensors")]
    steps = st.one_of(
        st.sampled_from(["1", "0", "-3", "", ",", "x", "3,x", "3.5", "2" + ",2" * 100]),
        st.integers(100_001, 10**30).map(lambda v: f"3,{v}"),
    )
    seeds = _int_text(st.one_of(st.integers(-(10**20), -1), st.integers(2**64, 2**80)))
    unwritable = st.sampled_from(["/proc/f", str(guard["tmp"] / "a-file"), str(guard["tmp"] / "a-file" / "f")])
    nonpos_or_huge = _int_text(st.one_of(NONPOSITIVE, st.integers(10**8 + 1, 10**30)))
    return st.one_of(
        steps.map(lambda v: [*iia, "--steps", v]),
        nonpos_or_huge.map(lambda v: [*iia, "--n", v]),
        _int_text(st.one_of(NONPOSITIVE, st.integers(10_001, 10**30))).map(lambda v: [*iia, "--fine-steps", v]),
        st.integers(2, 10_000).map(lambda v: [*iia, "--steps", "100000", "--fine-steps", str(v)]),
        seeds.map(lambda v: [*iia, "--seed", v]),
        st.sampled_from(["nope", "", "em", "iia_nope"]).map(lambda v: [*iia, "--solver", v]),
        st.sampled_from(["x", "", "IIA"]).map(lambda v: [*iia[:4], "heun", *iia[5:], "--variant", v]),
        st.just([*iia, "--variant", "biia"]),  # --variant applies to heun only
        st.sampled_from(["nope", "/proc", ""]).map(lambda v: [*iia[:2], v, *iia[3:]]),
        unwritable.map(lambda v: [*iia[:-1], v]),
        steps.map(lambda v: [*grid, "--steps", v]),
        nonpos_or_huge.map(lambda v: [*grid, "--n", v]),
        _int_text(st.one_of(NONPOSITIVE, st.integers(10_001, 10**30))).map(lambda v: [*grid, "--fine", v]),
        st.integers(2, 60).map(lambda v: [*grid, "--steps", str(v + 2), "--fine", str(v)]),  # fine < steps - 1
        _int_text(st.one_of(st.integers(-(10**9), -1), st.integers(101, 10**30))).map(lambda v: [*grid, "--sweeps", v]),
        BAD_DEVICES.map(lambda v: [*grid, "--device", v]),
        seeds.map(lambda v: [*grid, "--seed", v]),
        st.sampled_from(["nope", "adaptive", ""]).map(lambda v: [*grid, "--solver", v]),
        st.sampled_from(["nope", "/proc", ""]).map(lambda v: [*grid[:2], v, *grid[3:]]),
        unwritable.map(lambda v: [*grid[:-1], v]),
        st.sampled_from(["digits", "x,y", "digits,digits", "digits,", ",", "", "digits,/proc"]).map(
            lambda v: [*mlem[:2], v, *mlem[3:]]
        ),
        _int_text(st.one_of(st.integers(-(10**9), 1), st.integers(100_001, 10**30))).map(
            lambda v: [*mlem, "--steps", v]
        ),
        _int_text(st.one_of(st.integers(-(10**9), 1), st.integers(10**8 + 1, 10**30))).map(lambda v: [*mlem, "--n", v]),
        _int_text(st.one_of(NONPOSITIVE, st.integers(100_001, 10**30))).map(lambda v: [*mlem, "--iters", v]),
        _int_text(st.one_of(st.integers(-(10**9), -1), st.integers(21, 10**30))).map(lambda v: [*mlem, "--degree", v]),
        st.sampled_from(["--lr", "--budget", "--lam"]).flatmap(
            lambda f: st.one_of(BAD_FLOATS, st.just("0" if f != "--lam" else "-1")).map(lambda v: [*mlem, f, v])
        ),
        seeds.map(lambda v: [*mlem, "--seed", v]),
        st.sampled_from(["/proc/m.safetensors", str(guard["tmp"] / "a-file" / "m"), str(guard["files"])]).map(
            lambda v: [*mlem[:-1], v]
        ),
        st.sampled_from(["x", "EM", ""]).map(lambda v: [*mlem, "--base", v]),
    )


@settings(SETTINGS, max_examples=150)
@given(data=st.data())
def test_fuzz_fit_commands(data, guard, inputs, capsys):
    check_refused(data.draw(_fit_bad(guard, inputs)), guard, capsys)


# -- stdout closed -----------------------------------------------------------------------------------

_ONE_OF_EACH = {
    "sample": MIX[1:],
    "train": ["--steps", "1", "--channels", "8,16", "--batch-size", "4", "--quiet"],
    "likelihood": ["--model", "mixture2d-vp", "--n", "2"],
    "bench": ["--n", "4", "--dim", "2", "--budgets", "4", "--samplers", "em", "--no-peers"],
    "fit-iia": ["--model", "mixture", "--steps", "3", "--n", "2", "--quiet"],
    "fit-mlem": ["--levels", "digits-small,digits", "--steps", "4", "--n", "2", "--quiet"],
    "fit-grid": ["--model", "mixture", "--steps", "3", "--n", "2", "--fine", "4"],
}


@pytest.mark.parametrize("closed", ["none", "closed"])
@pytest.mark.parametrize("cmd", sorted(_ONE_OF_EACH))
def test_closed_stdout_is_one_line_before_compute(cmd, closed, guard, capsys, monkeypatch):
    """`fastsde ... >&-`: Python starts with sys.stdout None; a closed file object behaves alike."""
    import io

    stream = None
    if closed == "closed":
        stream = io.StringIO()
        stream.close()
    monkeypatch.setattr(sys, "stdout", stream)
    out = guard["out"] / ("o.safetensors" if cmd == "fit-mlem" else "o.npz" if cmd == "sample" else "o")
    argv = [cmd, *_ONE_OF_EACH[cmd], "--out", str(out)]
    if cmd == "likelihood":
        argv = argv[:-2]
    CASES["count"] += 1
    rc = main(argv)
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"fastsde {cmd}: error: standard output is closed"), err
    assert not guard["calls"] and not list(guard["out"].iterdir())


def test_closed_stdout_descriptor_in_a_real_process(tmp_path):
    """The real thing, once: fd 1 closed before the interpreter starts."""
    code = "import sys; from fastsde.cli import main; sys.exit(main())"
    argv = [sys.executable, "-c", code, *MIX, "--out", str(tmp_path / "s.npz")]
    proc = subprocess.run(argv, stderr=subprocess.PIPE, cwd=tmp_path, preexec_fn=lambda: os.close(1), timeout=300)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "standard output is closed" in err and not list(tmp_path.iterdir())


# -- the label-filtered quality line ---------------------------------------------------------------


def test_label_quality_is_measured_against_the_labels_digits():
    """--label 3: the headline FD compares with held-out 3s (a set of labels: held-out digits of those
    labels), and its floor is that of real 3s; real train 3s score near that floor."""
    from fastsde.cli.common import compute_quality, quality_line
    from fastsde.data import digits_labels, load_digits

    x, y = load_digits("train"), digits_labels("train")
    threes = x[y == 3][:64]
    q = compute_quality(threes, None, torch.full((threes.shape[0],), 3))
    assert q["classes"] == [3] and 20 <= q["reference"] <= 40
    assert q["fd"] < q["floor"] + 4 * q["floor_sd"]  # real 3s against held-out 3s: at the floor
    allq = compute_quality(threes)  # the same 3s against all digits: far away
    assert allq["fd"] > 5 * q["fd"]
    line = quality_line(q, threes.shape[0])
    assert "against the" in line and "held-out digits of label 3" in line
    mixed = torch.tensor([1, 7] * 32)
    both = compute_quality(x[(y == 1) | (y == 7)][:64], None, mixed)
    assert both["classes"] == [1, 7] and "labels 1,7" in quality_line(both, 64)
    every = compute_quality(
        x[:100], None, torch.arange(100) % 10
    )  # all ten labels: the all-digits reference, as before
    assert "classes" not in every and "against the 300 held-out digits" in quality_line(every, 100)


def test_report_case_count():
    """Runs last in this file: how many hostile cases ran, refused and (valid mutations) accepted."""
    print(
        f"\nCLI fuzz cases run: {CASES['count']} (refused {CASES['refused']}, accepted {CASES['accepted']}); "
        f"distinct failures found and fixed: {len(FOUND)}"
    )
    for cmd, given_input, raised in FOUND:
        print(f"  {cmd}: {given_input} -> {raised}")
    assert CASES["count"] > 0 or pytest.skip("run with the other tests of this file")

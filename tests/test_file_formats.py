"""Every file fastsde reads is checked field by field when read (fastsde.files.FileFormatError).

A hypothesis fuzz suite per format: start from a valid file written by the library's own save
functions (or crafted as they write it), mutate it (drop a field; a wrong type; huge, NaN, inf,
negative or zero values; a wrong tensor shape or dtype; non-finite tensor values; truncated bytes; a
flipped byte; random bytes) and load it. Either a FileFormatError (a ValueError) names the file (and,
for a field mutation, a field), or the file loads and the object works (a ValueError such as "does not
match this run" is allowed there); any other exception type fails the test. ``CASES`` counts the
generated cases per format; the last test prints the totals.

Plus: a broken model config beside good ones leaves the good ones loading; a save interrupted at any
file leaves the previous training checkpoint whole; corrupt ML-EM p_min / θ and NaN IIA coefficients
are refused on load naming the field.
"""

from __future__ import annotations

import collections
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import fastsde
from fastsde.files import FileFormatError
from fastsde.fitting import mlem as mlem_fit
from fastsde.problems import mixture_2d

torch.set_num_threads(1)

F64 = torch.float64
SDE = fastsde.VPSDE()
GM = mixture_2d(SDE)
#: generated cases and FileFormatErrors raised, per format
CASES: collections.Counter = collections.Counter()
REFUSED: collections.Counter = collections.Counter()

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: values a hostile file may hold in place of any field
HOSTILE = [None, True, False, "x", "", [], {}, [1, 2], {"a": 1}, 0, 1, -1, 2, 5, 0.5, -0.5, 1e-320, 1e308]
HOSTILE += [-1e308, 10**30, 2**63, -(2**63), math.nan, math.inf, -math.inf, "NaN", [math.nan], [[1.0]]]


# ---------------------------------------------------------------------------------------------
# mutations
# ---------------------------------------------------------------------------------------------


def _paths(obj: Any, prefix: tuple = (), depth: int = 0, opaque: tuple[str, ...] = ()) -> list[tuple]:
    """Every path into a JSON document (dict keys, list indices), not entering ``opaque`` keys."""
    out = [prefix] if prefix else []
    if depth > 5 or (prefix and prefix[-1] in opaque):
        return out
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k), depth + 1, opaque)
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):
            out += _paths(v, (*prefix, i), depth + 1, opaque)
    return out


def _mutate_json(doc: Any, path: tuple, action: str, value: Any) -> Any:
    """A deep copy of ``doc`` with the item at ``path`` dropped or set to ``value``."""
    doc = json.loads(json.dumps(doc))
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    last = path[-1]
    if action == "drop" and isinstance(parent, dict):
        del parent[last]
    elif action == "scale" and isinstance(parent[last], (int, float)) and not isinstance(parent[last], bool):
        parent[last] = parent[last] * value if isinstance(value, (int, float)) else -parent[last]
    else:
        parent[last] = value
    return doc


def json_mutation(doc: Any, opaque: tuple[str, ...] = ()) -> st.SearchStrategy:
    """(mutated document, the path mutated as a dotted name)."""
    paths = _paths(doc, opaque=opaque)
    action = st.sampled_from(["drop", "set", "set", "scale"])
    value = st.one_of(st.sampled_from(HOSTILE), st.floats(allow_nan=True), st.integers(-(10**20), 10**20))

    def build(args):
        path, act, val = args
        return _mutate_json(doc, path, act, val), ".".join(str(p) for p in path)

    return st.tuples(st.sampled_from(paths), action, value).map(build)


def tensor_mutation(tensors: dict[str, torch.Tensor]) -> st.SearchStrategy:
    """(mutated tensors, the tensor's name)."""
    names = sorted(tensors)
    kinds = ["drop", "nan", "inf", "int", "half", "extra_dim", "short", "empty", "scalar"]

    def build(args):
        name, kind, seed = args
        out = dict(tensors)
        t = tensors[name].clone()
        flat = t.reshape(-1)
        if kind == "drop":
            del out[name]
        elif kind in ("nan", "inf") and flat.numel():
            flat[seed % flat.numel()] = math.nan if kind == "nan" else -math.inf
            out[name] = t
        elif kind == "int":
            out[name] = t.to(torch.int64)
        elif kind == "half":
            out[name] = t.to(torch.float16)
        elif kind == "extra_dim":
            out[name] = t.unsqueeze(0)
        elif kind == "short" and t.dim() and t.shape[0]:
            out[name] = t[1:].clone()
        elif kind == "empty":
            out[name] = torch.zeros(0, dtype=t.dtype)
        else:
            out[name] = torch.tensor(float(seed), dtype=t.dtype)
        return out, name

    return st.tuples(st.sampled_from(names), st.sampled_from(kinds), st.integers(0, 10**6)).map(build)


def byte_mutation(data: bytes) -> st.SearchStrategy:
    """Bytes truncated at a random offset, with one byte changed, or random."""
    n = len(data)
    cut = st.integers(0, max(n - 1, 0)).map(lambda i: data[:i])
    flip = st.tuples(st.integers(0, n - 1), st.integers(1, 255)).map(
        lambda a: data[: a[0]] + bytes([data[a[0]] ^ a[1]]) + data[a[0] + 1 :]
    )
    return st.one_of(cut, flip, st.binary(max_size=300))


def _st_file(tensors: dict[str, torch.Tensor], meta: Any) -> bytes:
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={"fastsde": json.dumps(meta)})


def _split(data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    n = int.from_bytes(data[:8], "little")
    return st_load(data), json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["fastsde"])


def check_load(fmt: str, load, where: str | tuple[str, ...], field_mutation: bool, use=None, whole_file_ok=()) -> None:
    """Load: a FileFormatError naming ``where`` (and a field, for a field mutation, unless its
    message holds one of ``whole_file_ok``), or an object that ``use`` accepts (ValueError allowed)."""
    CASES[fmt] += 1
    try:
        obj = load()
    except FileFormatError as exc:
        REFUSED[fmt] += 1
        msg = str(exc)
        assert any(w in msg for w in ((where,) if isinstance(where, str) else where)), msg
        assert "\n" not in msg.strip(), msg
        if field_mutation and exc.field is None:
            assert any(s in msg for s in ("format", *whole_file_ok)), msg
        return
    if use is not None:
        try:
            use(obj)
        except ValueError as exc:
            assert not isinstance(exc, FileFormatError), exc


def strategy(data: bytes, opaque: tuple[str, ...] = ()) -> st.SearchStrategy:
    """A mutation of a safetensors + record file: (bytes, is a field mutation)."""
    tensors, meta = _split(data)
    on_meta = json_mutation(meta, opaque).map(lambda m: (_st_file(tensors, m[0]), True))
    on_tensors = tensor_mutation(tensors).map(lambda m: (_st_file(m[0], meta), True))
    on_bytes = byte_mutation(data).map(lambda b: (b, False))
    return st.one_of(on_meta, on_meta, on_tensors, on_bytes)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("formats")


# ---------------------------------------------------------------------------------------------
# IIA tables, fitted grids, ML-EM schedules
# ---------------------------------------------------------------------------------------------


def _level(k: int):
    def f(x, t):
        return GM(x, t) + 2.0**-k * torch.sin(3.0 * x + k) / SDE.marginal_std(t)[:, None]

    return f


LEVELS = fastsde.Levels([_level(1), _level(2)], costs=[1.0, 4.0])

TABLE = fastsde.fit_iia(GM, SDE, solver="ddim", steps=4, n=16, seed=0, fine_steps=4)
GRID = fastsde.fit_grid(GM, SDE, solver="dpmpp_2m", steps=4, n=16, seed=0, M=12, sweeps=1)


@pytest.fixture(scope="module")
def schedule_bytes(folder) -> bytes:
    sched = mlem_fit.fit_mlem(LEVELS, SDE, (2,), steps=6, n=8, seed=0, iters=1, lr=0.1, dtype=F64)
    return sched.save(folder / "valid-mlem.safetensors").read_bytes()


def _use_table(table) -> None:
    assert torch.isfinite(table.coefficients).all()
    repr(table)
    fastsde.sample(GM, SDE, (3, 2), solver="iia_ddim", steps=4, table=table, seed=0, dtype=F64)


def _use_grid(grid) -> None:
    assert torch.isfinite(grid.times).all() and bool((grid.times[:-1] > grid.times[1:]).all())
    repr(grid)
    fastsde.sample(GM, SDE, (3, 2), solver="dpmpp_2m", steps=4, grid=grid, seed=0, dtype=F64)


def _use_schedule(sched) -> None:
    p = sched.probabilities(torch.linspace(0.01, 1.0, 5, dtype=F64))
    assert bool(((p > 0) & (p <= 1)).all())
    repr(sched)
    fastsde.sample(LEVELS, SDE, (3, 2), solver="mlem", steps=6, p=sched, seed=0, dtype=F64)


@FUZZ
@given(data=st.data())
def test_fuzz_iia_table(folder, data):
    path = folder / "iia.safetensors"
    valid = TABLE.save(folder / "valid-iia.safetensors").read_bytes()
    mutated, field = data.draw(strategy(valid, opaque=("fit",)))
    path.write_bytes(mutated)
    check_load("IIA table", lambda: fastsde.load_iia(path), str(path), field, _use_table)


@FUZZ
@given(data=st.data())
def test_fuzz_fitted_grid(folder, data):
    path = folder / "grid.safetensors"
    valid = GRID.save(folder / "valid-grid.safetensors").read_bytes()
    mutated, field = data.draw(strategy(valid, opaque=("record",)))
    path.write_bytes(mutated)
    check_load("fitted grid", lambda: fastsde.load_grid(path), str(path), field, _use_grid)


@FUZZ
@given(data=st.data())
def test_fuzz_mlem_schedule(folder, schedule_bytes, data):
    path = folder / "mlem.safetensors"
    mutated, field = data.draw(strategy(schedule_bytes, opaque=("fit",)))
    path.write_bytes(mutated)
    check_load("ML-EM schedule", lambda: fastsde.load_mlem(path), str(path), field, _use_schedule)


@pytest.mark.parametrize("p_min", [math.nan, 0.0, -0.5, 5.0, math.inf, "0.1", None])
def test_corrupt_mlem_p_min_is_refused_naming_the_field(folder, schedule_bytes, p_min):
    tensors, meta = _split(schedule_bytes)
    path = folder / "pmin.safetensors"
    path.write_bytes(_st_file(tensors, {**meta, "p_min": p_min}))
    with pytest.raises(
        FileFormatError, match=r"pmin\.safetensors: field 'p_min': expected a finite number in \(0, 1\]"
    ):
        fastsde.load_mlem(path)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_theta_and_iia_coefficients_are_refused_naming_the_field(folder, schedule_bytes, value):
    tensors, meta = _split(schedule_bytes)
    tensors["theta"][0, 0] = value
    path = folder / "theta.safetensors"
    path.write_bytes(_st_file(tensors, meta))
    with pytest.raises(FileFormatError, match=r"theta\.safetensors: field 'theta': expected finite values"):
        fastsde.load_mlem(path)
    tensors, meta = _split(TABLE.save(folder / "t.safetensors").read_bytes())
    tensors["coefficients"][1, 2] = value
    path = folder / "nan-iia.safetensors"
    path.write_bytes(_st_file(tensors, meta))
    with pytest.raises(FileFormatError, match=r"nan-iia\.safetensors: field 'coefficients': expected finite values"):
        fastsde.load_iia(path)


def test_grid_times_out_of_range_or_not_monotone_are_refused(folder):
    tensors, meta = _split(GRID.save(folder / "g.safetensors").read_bytes())
    for times in ([1.0, 0.5, 0.6, 0.001], [2.0, 0.5, 0.1, 0.001], [1.0, 0.5, 0.1, 0.002], [1.0, 0.5, 0.001]):
        path = folder / "times.safetensors"
        path.write_bytes(_st_file({**tensors, "times": torch.tensor(times, dtype=F64)}, meta))
        with pytest.raises(FileFormatError, match=r"times\.safetensors: field 'times'"):
            fastsde.load_grid(path)


# ---------------------------------------------------------------------------------------------
# model configs (shipped layout and train folders) and training checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(folder) -> Path:
    """A checkpoint of a 2-step run of a tiny network (what `fastsde train` writes)."""
    from fastsde.training import TrainConfig, Trainer

    data = torch.rand(8, 1, 8, 8) * 2 - 1
    trainer = Trainer(TrainConfig(channels=(8, 16), batch_size=4, norm_groups=8), data)
    trainer.train(2, progress=False)
    out = folder / "trained"
    trainer.save(out)
    return out


def _use_model(model) -> None:
    x = torch.zeros(2, *model.shape)
    assert torch.isfinite(model.score(x, torch.full((2,), 0.5))).all()
    assert model.eval_cost == model.eval_cost  # not NaN: flops_per_sample is always checked


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_fuzz_model_folder_config(folder, trained, data):
    cfg = json.loads((trained / "config.json").read_text())
    target = folder / "model"
    if not target.exists():
        shutil.copytree(trained, target)
    choice = data.draw(
        st.one_of(
            json_mutation(cfg, opaque=("training",)).map(lambda m: (json.dumps(m[0]).encode(), True)),
            byte_mutation(json.dumps(cfg).encode()).map(lambda b: (b, False)),
        )
    )
    (target / "config.json").write_bytes(choice[0])
    ok = ("do not fit its config", "cannot read", "is not a JSON object", "not a UNet2DModel", "no scheduler config")
    check_load("model config", lambda: fastsde.load_model(target), str(target), choice[1], None, ok)


@pytest.fixture
def shipped_dir(tmp_path, monkeypatch) -> Path:
    """A models folder of two good shipped models (their JSON + weights) used as the shipped set."""
    import fastsde.models

    src = fastsde.models._models_dir()
    for name in ("digits-small", "digits"):
        for ext in (".json", ".safetensors"):
            shutil.copy(str(src.joinpath(name + ext)), tmp_path / (name + ext))
    monkeypatch.setattr(fastsde.models, "_models_dir", lambda: tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "field, value",
    [("flops_per_sample", 0), ("flops_per_sample", -3.0), ("flops_per_sample", math.nan), ("flops_per_sample", "big")],
)
def test_a_broken_model_config_does_not_affect_the_others(shipped_dir, field, value):
    cfg = json.loads((shipped_dir / "digits-small.json").read_text())
    cfg[field] = value
    (shipped_dir / "bad.json").write_text(json.dumps(cfg))
    shutil.copy(shipped_dir / "digits-small.safetensors", shipped_dir / "bad.safetensors")
    assert "bad" in fastsde.list_models()
    good = fastsde.load_model("digits")  # the unit of eval_cost is the smallest *valid* model
    assert math.isfinite(good.eval_cost) and good.eval_cost > 1.0
    assert fastsde.load_model("digits-small").eval_cost == 1.0
    with pytest.raises(FileFormatError, match=rf"model 'bad': .*bad\.json: field '{field}': expected a positive"):
        fastsde.load_model("bad")


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda c: c["unet"].update(channels=[8, 10**9]), "unet.channels[1]"),
        (lambda c: c["unet"].update(norm_groups=3), "unet.norm_groups"),
        (lambda c: c.update(shape=[1, 8]), "shape"),
        (lambda c: c["sde"].update(beta_min=-1), "sde"),
        (lambda c: c.pop("unet"), "unet"),
    ],
)
def test_shipped_model_config_fields_are_checked(shipped_dir, edit, field):
    cfg = json.loads((shipped_dir / "digits-small.json").read_text())
    edit(cfg)
    (shipped_dir / "digits-small.json").write_text(json.dumps(cfg))
    with pytest.raises(FileFormatError, match=rf"digits-small\.json: field '{re_escape(field)}'"):
        fastsde.load_model("digits-small")
    assert fastsde.load_model("digits").shape == (1, 8, 8)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def _use_trainer(trainer) -> None:
    assert trainer.step >= 0
    trainer.train(trainer.step + 1, progress=False)
    assert all(torch.isfinite(p).all() for p in trainer.net.parameters())


@pytest.fixture(scope="module")
def train_data() -> torch.Tensor:
    return torch.rand(8, 1, 8, 8) * 2 - 1


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_fuzz_training_checkpoint(folder, trained, train_data, data):
    from fastsde.training import Trainer

    target = folder / "resume"
    if not target.exists():
        shutil.copytree(trained, target)
    valid = (trained / "train_state.safetensors").read_bytes()
    mutated, field = data.draw(strategy(valid, opaque=("losses",)))
    (target / "train_state.safetensors").write_bytes(mutated)
    where = str(target)
    ok = ("model.safetensors",)  # a state whose own record is lost falls back to the older layout's files
    check_load("training checkpoint", lambda: Trainer.load(target, train_data), where, field, _use_trainer, ok)


def _snapshot(trainer) -> dict[str, torch.Tensor]:
    out = {f"net.{k}": v.clone() for k, v in trainer.net.state_dict().items()}
    out.update({f"ema.{k}": v.clone() for k, v in trainer.ema.state_dict().items()})
    for idx, st_ in trainer.opt.state_dict()["state"].items():
        out.update({f"opt.{idx}.{k}": torch.as_tensor(v).clone() for k, v in st_.items()})
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_interrupted_save_leaves_the_previous_checkpoint_whole(tmp_path, train_data, monkeypatch):
    """Kill the save at every file it writes (and inside the state file's write): a resume reads the
    old checkpoint or the new one, never new weights with an old step (a torn checkpoint)."""
    import fastsde.files
    import fastsde.training as training

    trainer = training.Trainer(training.TrainConfig(channels=(8, 16), batch_size=4, norm_groups=8), train_data)
    trainer.train(2, progress=False)
    out = tmp_path / "ck"
    trainer.save(out)
    old = (_snapshot(trainer), trainer.step, list(trainer.losses))
    trainer.train(4, progress=False)
    new = (_snapshot(trainer), trainer.step, list(trainer.losses))
    keep = tmp_path / "old-ck"
    shutil.copytree(out, keep)
    real_replace = fastsde.files.os.replace
    kills = 0
    for kill_at in range(1, 8):
        calls = []

        def replace(src, dst, kill_at=kill_at, calls=calls):
            calls.append(dst)
            if len(calls) == kill_at:
                raise KeyboardInterrupt("killed")
            return real_replace(src, dst)

        shutil.rmtree(out)
        shutil.copytree(keep, out)
        monkeypatch.setattr(fastsde.files.os, "replace", replace)
        try:
            trainer.save(out)
        except KeyboardInterrupt:
            kills += 1
        finally:
            monkeypatch.setattr(fastsde.files.os, "replace", real_replace)
        back = training.Trainer.load(out, train_data)
        got = (_snapshot(back), back.step, back.losses)
        assert any(_same(got[0], want[0]) and got[1:] == want[1:] for want in (old, new)), kill_at
        assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left behind
        assert fastsde.load_model(out).shape == (1, 8, 8)
    assert kills == 4  # the state, its JSON copy, the EMA weights, the config


def test_older_checkpoint_layout_still_resumes_and_loads(tmp_path, trained, train_data):
    """The four-file layout of earlier versions (record only in train_state.json, EMA only in
    model.safetensors) resumes, and load_model reads the folder."""
    from safetensors.torch import save_file

    from fastsde.training import Trainer

    old = tmp_path / "old"
    shutil.copytree(trained, old)
    tensors, meta = _split((old / "train_state.safetensors").read_bytes())
    save_file({k: v for k, v in tensors.items() if not k.startswith("ema.")}, str(old / "train_state.safetensors"))
    (old / "train_state.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "format"}))
    back = Trainer.load(old, train_data)
    new = Trainer.load(trained, train_data)
    assert back.step == new.step and _same(_snapshot(back), _snapshot(new))
    assert fastsde.load_model(old).shape == (1, 8, 8)
    (old / "train_state.json").write_text('{"step": -1}')
    with pytest.raises(FileFormatError, match=r"train_state\.json: field 'config'"):
        Trainer.load(old, train_data)


# ---------------------------------------------------------------------------------------------
# bench results, the digits classifier asset, data files
# ---------------------------------------------------------------------------------------------

BENCH = {
    "config": {
        "problem": "mixture",
        "budgets": [4],
        "processes": ["vp"],
        "samplers": ["em", "ode"],
        "n": 32,
        "dim": 2,
        "seed": 0,
        "tolerances": [0.1],
        "peers": False,
        "progress": False,
        "floor_draws": 30,
    },
    "notes": ["iia_heun: skipped"],
    "summary": {
        "vp": {
            "problem": "mixture2d",
            "floor": 0.0056,
            "floor_sd": 0.0022,
            "reference_quality": 0.0018,
            "threshold": 0.0099,
            "quality_name": "per-mode Fréchet distance",
            "t_end": 0.001,
            "sde": {"type": "VPSDE", "beta_min": 0.1, "beta_max": 20.0},
            "converged": {
                "em": {"nfe": None, "source": "fastsde", "stochastic": True},
                "ode": {"nfe": 44.0, "source": "fastsde", "stochastic": False},
            },
        }
    },
    "records": [
        {
            "problem": "mixture2d",
            "process": "vp",
            "sampler": sampler,
            "source": "fastsde",
            "stochastic": sampler == "em",
            "budget": 4 if sampler == "em" else None,
            "setting": 4 if sampler == "em" else 0.1,
            "error": None,
            "options": '{"steps": 4}',
            "nfe": 4.0 if sampler == "em" else 44.0,
            "calls": 4,
            "wall_time": 0.002,
            "score_time": 0.0006,
            "outside_share": 0.73,
            "quality": 37.8 if sampler == "em" else 0.002,
            "mse": None if sampler == "em" else 1e-6,
        }
        for sampler in ("em", "ode")
    ],
}


def _use_results(res) -> None:
    from fastsde.bench.runner import markdown_tables, merge_results

    markdown_tables(merge_results([res]))


@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_fuzz_bench_results(folder, data):
    from fastsde.bench.runner import read_results

    path = folder / "results.json"
    text = json.dumps(BENCH).encode()
    mutated, field = data.draw(
        st.one_of(
            json_mutation(BENCH).map(lambda m: (json.dumps(m[0]).encode(), True)),
            byte_mutation(text).map(lambda b: (b, False)),
        )
    )
    path.write_bytes(mutated)
    check_load("bench results", lambda: read_results(path), str(path), field, _use_results)


@pytest.fixture(scope="module")
def classifier_files() -> tuple[bytes, bytes]:
    from importlib import resources

    root = resources.files("fastsde")
    return (
        root.joinpath("_assets/data/digits_classifier.safetensors").read_bytes(),
        root.joinpath("_assets/data/digits_classifier.json").read_bytes(),
    )


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_fuzz_digits_classifier_asset(classifier_files, data):
    from fastsde.metrics.digits import read_classifier

    weights, record = classifier_files
    meta = json.loads(record)
    tensors = st_load(weights)
    choice = data.draw(
        st.one_of(
            json_mutation(meta).map(lambda m: (weights, json.dumps(m[0]).encode(), True)),
            tensor_mutation(tensors).map(lambda m: (st_save(m[0]), record, True)),
            byte_mutation(record).map(lambda b: (weights, b, False)),
        )
    )

    def use(loaded) -> None:
        assert all(np.isfinite(v).all() for v in loaded[2].values())

    ok = ("safetensors",)
    load = lambda: read_classifier(choice[0], choice[1], "w.st", "r.json")  # noqa: E731
    check_load("digits classifier", load, ("w.st", "r.json"), choice[2], use, ok)


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_fuzz_data_arrays(folder, data):
    import io

    from fastsde.data import load_array

    arr = data.draw(
        st.sampled_from(
            [
                np.random.default_rng(0).integers(0, 17, size=(4, 8, 8)).astype(np.uint8),
                np.linspace(-1, 1, 4 * 64).reshape(4, 1, 8, 8),
                np.array([[1, 2], [3, 4]]),
                np.full((2, 4, 4), np.nan),
                np.full((2, 4, 4), 300, dtype=np.int64),
                np.full((2, 4, 4), -3, dtype=np.int32),
                np.zeros((0, 4, 4)),
                np.array(["a", "b"]),
                np.ones((2, 4, 4), dtype=np.complex64),
                np.ones((2, 4, 4), dtype=bool),
                np.zeros((2, 3, 4, 4, 1)),
            ]
        )
    )
    buf = io.BytesIO()
    suffix = data.draw(st.sampled_from([".npy", ".npz"]))
    if suffix == ".npy":
        np.save(buf, arr)
    else:
        np.savez(buf, x=arr)
    raw = buf.getvalue()
    raw = data.draw(st.one_of(st.just(raw), byte_mutation(raw)))
    path = folder / f"arr{suffix}"
    path.write_bytes(raw)

    def use(x) -> None:
        assert x.dim() == 4 and bool(torch.isfinite(x).all()) and float(x.abs().max()) <= 1.0

    check_load("data array", lambda: load_array(path), str(path), False, use)


def test_broken_images_in_a_folder_are_named(tmp_path):
    from fastsde.data import load_image_folder

    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    with pytest.raises(FileFormatError, match=r"a\.png is not a readable image"):
        load_image_folder(tmp_path)


def test_zz_report_case_counts():
    """Print how many cases the fuzz suite generated (and refused) per format."""
    total = sum(CASES.values())
    lines = [f"{fmt}: {n} cases, {REFUSED[fmt]} refused" for fmt, n in sorted(CASES.items())]
    print(f"\nfile-format fuzz: {total} cases\n" + "\n".join(lines))
    if total:  # the whole module ran
        assert len(CASES) >= 7

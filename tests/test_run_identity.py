"""One run folder = one model: a resumed run with another model's content is refused naming the field
(weights behind the same name, another instance's parameters, a changed global network), a tampered
manifest is refused on load, and a second writer is refused while the first holds the folder."""

from __future__ import annotations

import functools
import json
import multiprocessing
import re

import pytest
import torch

import fastsde
from fastsde.identity import content_digests, probe, probe_matches
from fastsde.shards import LOCK, MANIFEST, PROGRESS, RunLock, read_manifest

F64 = torch.float64
SDE = fastsde.VPSDE()
GM = fastsde.problems.mixture_2d(SDE)
RUN = dict(solver="dpmpp_2m", steps=4, dtype=F64, shard_size=3)


class LinearEps(torch.nn.Module):
    """A tiny noise-prediction network: eps(x, t) = W x (a module whose weights identify it)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2, dtype=F64)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _refused(out, score, field: str) -> None:
    with pytest.raises(ValueError, match=rf"other settings \(.*{re.escape(field)}"):
        fastsde.sample_to_dir(score, SDE, (6, 2), out, **RUN)


def test_changed_weights_behind_the_same_name_are_refused(tmp_path):
    torch.manual_seed(0)
    net = LinearEps()
    score = fastsde.NoisePredictionScore(net, SDE)
    fastsde.sample_to_dir(score, SDE, (6, 2), tmp_path, model="my-model", **RUN)
    with torch.no_grad():
        net.lin.weight.add_(1e-6)  # e.g. `fastsde train --resume` wrote new weights under the same name
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != LOCK}
    _refused(tmp_path, score, "model_content.score.model")
    assert before == {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != LOCK}


def test_same_content_resumes(tmp_path):
    """Another object with the same content is the same model: the run resumes, computing nothing."""
    torch.manual_seed(0)
    net = LinearEps()
    fastsde.sample_to_dir(fastsde.NoisePredictionScore(net, SDE), SDE, (6, 2), tmp_path, **RUN)
    copy = LinearEps()
    copy.load_state_dict(net.state_dict())
    again = fastsde.sample_to_dir(fastsde.NoisePredictionScore(copy, SDE), SDE, (6, 2), tmp_path, **RUN)
    assert again.computed == [] and again.complete


def _scaled(x, t, scale):
    return GM.score(x, t) * scale


class Scaled:
    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, x, t):
        return GM.score(x, t) * self.scale


def _closure(scale: float):
    def score(x, t):
        return GM.score(x, t) * scale

    return score


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda s: functools.partial(_scaled, scale=s), "model_content.score.keywords['scale']"),
        (lambda s: Scaled(s), "model_content.score.scale"),
        (lambda s: _closure(s), "model_content.score.<closure scale>"),
    ],
    ids=["partial", "instance", "closure"],
)
def test_non_tensor_parameters_are_part_of_the_identity(tmp_path, make, field):
    fastsde.sample_to_dir(make(1.0), SDE, (6, 2), tmp_path, **RUN)
    _refused(tmp_path, make(0.5), field)
    assert fastsde.sample_to_dir(make(1.0), SDE, (6, 2), tmp_path, **RUN).computed == []


NET = {"scale": 1.0}


def _global_network(x, t):
    """A score calling a network it does not hold (nothing reachable from the function itself)."""
    return GM.score(x, t) * NET["scale"]


def test_a_score_without_a_module_is_probed(tmp_path):
    fastsde.sample_to_dir(_global_network, SDE, (6, 2), tmp_path, **RUN)
    assert len(read_manifest(tmp_path)["model_probe"]["values"]) > 0
    NET["scale"] = 0.9
    try:
        _refused(tmp_path, _global_network, "probe inputs differ")
    finally:
        NET["scale"] = 1.0
    assert fastsde.sample_to_dir(_global_network, SDE, (6, 2), tmp_path, **RUN).computed == []


def test_probe_tolerates_rounding_not_a_change():
    a = probe(GM.score, SDE, (2,), 1e-3, F64)
    b = probe(lambda x, t: GM.score(x, t) * (1 + 1e-13), SDE, (2,), 1e-3, F64)
    c = probe(lambda x, t: GM.score(x, t) * (1 + 1e-4), SDE, (2,), 1e-3, F64)
    assert probe_matches(a, b, F64) and not probe_matches(a, c, F64)


def test_content_digests_name_where_they_found_things():
    torch.manual_seed(0)
    d = content_digests(fastsde.NoisePredictionScore(LinearEps(), SDE))
    assert "score.model" in d and all(len(v) == 16 for v in d.values())


# ---------------------------------------------------------------------------------------------
# the manifest
# ---------------------------------------------------------------------------------------------


def _edit_manifest(out, edit) -> None:
    path = out / MANIFEST
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda m: m["settings"].__setitem__("n", 4), "'fingerprint'"),
        (lambda m: m["settings"].__setitem__("shard_size", -1), "'settings.shard_size'"),
        (lambda m: m["settings"].__setitem__("n", "9"), "'settings.n'"),
        (lambda m: m["settings"].__setitem__("shape", [2, 0]), r"'settings.shape\[1\]'"),
        (lambda m: m["settings"].__setitem__("dtype", "int8"), "'settings.dtype'"),
        (lambda m: m.__setitem__("fingerprint", 3), "'fingerprint'"),
        (lambda m: m.__setitem__("shards", []), "'shards'"),
        (lambda m: m.pop("settings"), "'settings'"),
    ],
    ids=["n", "shard_size", "n-type", "shape", "dtype", "fingerprint", "shards", "no-settings"],
)
def test_a_tampered_manifest_is_refused_on_load(tmp_path, edit, field):
    fastsde.sample_to_dir(GM.score, SDE, (6, 2), tmp_path, **RUN)
    _edit_manifest(tmp_path, edit)
    with pytest.raises(fastsde.files.FileFormatError, match=rf"manifest.json: field {field}"):
        fastsde.load_samples(tmp_path)


def test_a_consistently_edited_manifest_still_cannot_return_wrong_rows(tmp_path):
    """n changed and the fingerprint recomputed: the shards carry the old fingerprint, so none is done."""
    fastsde.sample_to_dir(GM.score, SDE, (6, 2), tmp_path, **RUN)

    def edit(m):
        m["settings"]["n"] = 5
        m["fingerprint"] = fastsde.shards.fingerprint(m["settings"])
        m["num_shards"] = 2
        m["shards"] = m["shards"][:2]

    _edit_manifest(tmp_path, edit)
    with pytest.raises(ValueError, match="incomplete: 2 of 2 shards missing"):
        fastsde.load_samples(tmp_path)


def test_progress_lines_are_appended_not_the_manifest_rewritten(tmp_path):
    seen = []

    def on_shard(info):
        seen.append(((tmp_path / MANIFEST).stat().st_mtime_ns, (tmp_path / PROGRESS).read_text().count("\n")))
        statuses = [e["status"] for e in read_manifest(tmp_path)["shards"]]
        assert statuses[: info.shard + 1] == ["done"] * (info.shard + 1)

    fastsde.sample_to_dir(GM.score, SDE, (9, 2), tmp_path, on_shard=on_shard, **RUN)
    assert len({m for m, _ in seen}) == 1  # the manifest file was not rewritten per shard
    assert [c for _, c in seen] == [1, 2, 3]
    assert not (tmp_path / PROGRESS).exists()  # the final manifest holds every line
    assert read_manifest(tmp_path)["complete"]


# ---------------------------------------------------------------------------------------------
# one writer at a time
# ---------------------------------------------------------------------------------------------


def _hold_lock(out, ready, release) -> None:
    lock = RunLock(out).acquire()
    ready.set()
    release.wait(30)
    lock.release()


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(ValueError, match=rf"being written by another fastsde process \(pid {holder.pid}\)"):
            fastsde.sample_to_dir(GM.score, SDE, (6, 2), tmp_path, **RUN)
        assert not (tmp_path / MANIFEST).exists()  # refused before anything was read or written
    finally:
        release.set()
        holder.join(30)
    assert fastsde.sample_to_dir(GM.score, SDE, (6, 2), tmp_path, **RUN).complete  # free again


def test_a_loaded_model_s_relative_cost_is_not_its_identity(tmp_path):
    """eval_cost is the FLOP ratio to the smallest shipped model: it moves when a smaller model ships, while
    the model's outputs do not, so a run folder of the model resumes; its weights still identify it."""
    model = fastsde.load_model("digits-small")
    run = dict(solver="euler", steps=3, seed=0, shard_size=2)
    fastsde.sample_to_dir(model.score, model.sde, (4, *model.shape), tmp_path, **run)
    model.eval_cost = model.eval_cost / 2.0  # as if a model twice as cheap had shipped
    again = fastsde.sample_to_dir(model.score, model.sde, (4, *model.shape), tmp_path, **run)
    assert again.computed == [] and again.complete
    assert "score.__self__.eval_cost" not in content_digests(model.score)
    assert any(k.startswith("score.__self__") for k in content_digests(model.score))


def test_a_moved_model_folder_resumes_its_run_under_the_same_label(tmp_path):
    """A model folder's path is the run's default label, not its content: moved, and run with the same
    ``model=`` label, its run folder resumes; without the label the changed path is named."""
    import shutil
    from importlib import resources

    weights = resources.files("fastsde").joinpath("_assets", "weights")
    first = tmp_path / "a"
    first.mkdir()
    for src, dst in (("digits-small.json", "config.json"), ("digits-small.safetensors", "model.safetensors")):
        (first / dst).write_bytes(weights.joinpath(src).read_bytes())
    run = dict(solver="euler", steps=3, seed=0, shard_size=2)
    model = fastsde.load_model(str(first))
    fastsde.sample_to_dir(model.score, model.sde, (4, *model.shape), tmp_path / "run", model="small", **run)
    shutil.move(str(first), str(tmp_path / "b"))
    moved = fastsde.load_model(str(tmp_path / "b"))
    again = fastsde.sample_to_dir(moved.score, moved.sde, (4, *moved.shape), tmp_path / "run", model="small", **run)
    assert again.computed == [] and again.complete
    fastsde.sample_to_dir(model.score, model.sde, (4, *model.shape), tmp_path / "run2", **run)
    with pytest.raises(ValueError, match=r"model: '.*a' -> '.*b'"):
        fastsde.sample_to_dir(moved.score, moved.sde, (4, *moved.shape), tmp_path / "run2", **run)

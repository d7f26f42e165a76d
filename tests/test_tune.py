"""fastsde.tune and recipes: the choice per budget is the best measured candidate, a recipe saves, loads
and runs as the choice it names, is refused for another model / process / budget, resumes from its
cache, and its file is validated field by field; `fastsde tune` and `fastsde sample --recipe`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastsde
from fastsde.artifacts.recipe import RECIPE_FILE
from fastsde.cli import main
from fastsde.files import FileFormatError

torch.set_num_threads(1)
F64 = torch.float64
SMALL = dict(n_eval=64, n_fit=16, reference_steps=60, log=None, dtype=F64)


@pytest.fixture(scope="module")
def problem():
    sde = fastsde.VPSDE()
    return sde, fastsde.problems.mixture_2d(sde)


@pytest.fixture(scope="module")
def recipe(problem, tmp_path_factory):
    sde, gm = problem
    cache = tmp_path_factory.mktemp("cache")
    r = fastsde.tune(gm.score, sde, tuple(gm.shape), budgets=(4, 6), cache=str(cache), **SMALL)
    r.cache_dir = cache
    return r


def test_each_budget_chooses_its_best_candidate(recipe):
    assert recipe.budgets == [4, 6]
    variants = {r["variant"] for r in recipe.candidates}
    assert variants == {"default", "fitted grid", "IIA table"}
    for budget, choice in recipe.choices.items():
        rows = [r for r in recipe.candidates if r["budget"] == budget and math.isfinite(float(r["mse"]))]
        assert len(rows) >= 8
        assert choice.errors["mse"] == min(float(r["mse"]) for r in rows)
        assert choice.options["steps"] == budget


def test_save_load_and_sample_run_the_choice(recipe, problem, tmp_path):
    sde, gm = problem
    recipe.save(tmp_path / "r")
    back = fastsde.load_recipe(tmp_path / "r")
    assert back.budgets == recipe.budgets
    for b in back.budgets:
        assert back.choices[b].as_dict() == recipe.choices[b].as_dict()
    for steps in (4, 6):
        res = fastsde.sample(gm.score, sde, (32, 2), recipe=tmp_path / "r", steps=steps, seed=3, dtype=F64)
        solver, options = back.choose(steps)
        ref = fastsde.sample(gm.score, sde, (32, 2), solver, seed=3, dtype=F64, **options)
        assert res.solver == solver and res.nfe == steps
        assert torch.equal(res.samples, ref.samples)


def test_a_recipe_is_refused_for_another_model_process_or_budget(recipe, problem):
    sde, gm = problem
    other = fastsde.problems.mixture_2d(sde)
    other.means = other.means * 1.5
    with pytest.raises(ValueError, match="model"):
        fastsde.sample(other.score, sde, (4, 2), recipe=recipe, steps=4, dtype=F64)
    ve = fastsde.VESDE()
    with pytest.raises(ValueError, match="process"):
        fastsde.sample(fastsde.problems.mixture_2d(ve).score, ve, (4, 2), recipe=recipe, steps=4, dtype=F64)
    with pytest.raises(ValueError, match=r"budgets \[4, 6\]"):
        fastsde.sample(gm.score, sde, (4, 2), recipe=recipe, steps=5, dtype=F64)
    with pytest.raises(ValueError, match="either recipe= or solver="):
        fastsde.sample(gm.score, sde, (4, 2), "euler", recipe=recipe, steps=4, dtype=F64)
    with pytest.raises(ValueError, match="come from the recipe"):
        fastsde.sample(gm.score, sde, (4, 2), recipe=recipe, steps=4, grid="uniform", dtype=F64)
    with pytest.raises(ValueError, match="needs steps="):
        fastsde.sample(gm.score, sde, (4, 2), recipe=recipe, dtype=F64)


def test_a_rerun_resumes_from_the_cache(recipe, problem):
    sde, gm = problem
    lines: list[str] = []
    again = fastsde.tune(gm.score, sde, tuple(gm.shape), budgets=(4, 6), cache=str(recipe.cache_dir),
                         **{**SMALL, "log": lines.append})  # fmt: skip
    cached = [line for line in lines if ": cached" in line]
    assert len(cached) == len(recipe.candidates)
    assert {b: c.as_dict() for b, c in again.choices.items()} == {b: c.as_dict() for b, c in recipe.choices.items()}


def test_the_time_box_skips_and_says_so(problem):
    sde, gm = problem
    with pytest.raises(ValueError, match="no candidate finished"):
        fastsde.tune(gm.score, sde, tuple(gm.shape), budgets=(4,), max_minutes=1e-9, **SMALL)


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda m: m["choices"]["4"].update(solver="Bad Name"), "solver"),
        (lambda m: m["choices"]["4"]["options"].update(order=[1, 2]), "options.order"),
        (lambda m: m["choices"]["4"].update(grid_file="../x.safetensors"), "grid_file"),
        (lambda m: m["choices"].update({"zero": m["choices"]["4"]}), "zero"),
        (lambda m: m["key"].update(process={"type": "nope"}), "process"),
    ],
)
def test_recipe_files_are_validated(recipe, tmp_path, edit, field):
    folder = recipe.save(tmp_path / "r")
    tensors = load_file(folder / RECIPE_FILE)
    from safetensors import safe_open

    with safe_open(str(folder / RECIPE_FILE), "pt") as f:
        data = json.loads(f.metadata()["fastsde"])
    edit(data)
    save_file(tensors, str(folder / RECIPE_FILE), metadata={"fastsde": json.dumps(data)})
    with pytest.raises(FileFormatError, match=field):
        fastsde.load_recipe(folder)


def test_cli_tune_then_sample_with_the_recipe(tmp_path, capsys):
    out = tmp_path / "recipe"
    rc = main(["tune", "--model", "mixture", "--budgets", "4,6", "--n-eval", "64", "--n-fit", "16", "--out", str(out)])
    assert rc == 0
    assert (out / RECIPE_FILE).is_file() and (out / "candidates.md").is_file() and (out / "errors.png").is_file()
    text = capsys.readouterr().out
    assert "NFE 4:" in text and "NFE 6:" in text
    png = tmp_path / "s.npz"
    rc = main(["sample", "--model", "mixture", "--recipe", str(out), "--steps", "4", "--n", "8", "--out", str(png),
               "--no-metric", "--no-progress"])  # fmt: skip
    assert rc == 0
    rc = main(["sample", "--model", "mixture", "--recipe", str(out), "--steps", "5", "--n", "8", "--out", str(png),
               "--no-metric", "--no-progress"])  # fmt: skip
    assert rc == 2
    assert "budgets" in capsys.readouterr().err
    rc = main(["sample", "--model", "mixture", "--recipe", str(out), "--solver", "em", "--steps", "4", "--n", "8",
               "--out", str(png), "--no-metric", "--no-progress"])  # fmt: skip
    assert rc == 2


def test_scheduler_from_recipe_runs_the_choice(tmp_path):
    from diffusers import DDPMScheduler
    from diffusers_models import tiny_unet

    from fastsde.diffusers import FastSDEScheduler
    from fastsde.score import DiffusersUNetScore

    unet = tiny_unet()
    sde = fastsde.VPSDE.from_diffusers_scheduler(DDPMScheduler())
    score = DiffusersUNetScore(unet, sde)
    r = fastsde.tune(score, sde, (1, 8, 8), budgets=(5,), n_eval=16, n_fit=8, reference_steps=40, log=None,
                     solvers=("ddim", "dpmpp_2m", "unipc"))  # fmt: skip
    sched = FastSDEScheduler.from_recipe(r, 5, DDPMScheduler().config, model=unet)
    assert sched.config.solver == r.choices[5].solver
    sched.set_timesteps(5)
    x = x_t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        x = sched.step(unet(x, t).sample, t, x).prev_sample
    ref = fastsde.sample(score, sde, (2, 1, 8, 8), recipe=r, steps=5, x_init=x_t)
    assert torch.allclose(x, ref.samples, atol=1e-5, rtol=0)


def test_the_shipped_digits_recipe_loads_and_runs():
    from fastsde.artifacts.recipe import shipped_recipe

    recipe = shipped_recipe("digits")
    assert recipe is not None and recipe.budgets == list(range(4, 11))
    assert recipe.key["model"]["kind"] == "shipped" and recipe.key["model"]["name"] == "digits"
    model = fastsde.load_model("digits")
    res = fastsde.sample(model.score, model.sde, (4, *model.shape), recipe=recipe, steps=6, seed=0)
    assert res.nfe == 6 and res.solver == recipe.choices[6].solver
    other = fastsde.load_model("digits-flow")
    with pytest.raises(ValueError, match="process|model"):
        fastsde.sample(other.score, other.sde, (4, *other.shape), recipe=recipe, steps=6)
    assert shipped_recipe("no-such-model") is None and shipped_recipe("../x") is None
    flow = shipped_recipe("digits-flow")
    assert flow is not None and flow.key["model"]["name"] == "digits-flow"
    res = fastsde.sample(other.score, other.sde, (4, *other.shape), recipe=flow, steps=5, seed=0)
    assert res.nfe == 5 and torch.isfinite(res.samples).all()


def test_measure_fd_chooses_by_fd_from_the_same_cache(recipe, problem):
    sde, gm = problem
    by_fd = fastsde.tune(gm.score, sde, tuple(gm.shape), budgets=(4, 6), cache=str(recipe.cache_dir), measure="fd",
                         **SMALL)  # fmt: skip
    for budget, choice in by_fd.choices.items():
        rows = [r for r in by_fd.candidates if r["budget"] == budget and math.isfinite(float(r["fd"]))]
        assert choice.errors["fd"] == min(float(r["fd"]) for r in rows)
    assert by_fd.record["measure"] == "fd"
    with pytest.raises(ValueError, match="measure"):
        fastsde.tune(gm.score, sde, tuple(gm.shape), budgets=(4,), measure="psnr", **SMALL)


@pytest.mark.parametrize("name", ["digits", "digits-flow", "digits-ve", "digits-small", "digits-large"])
def test_every_shipped_recipe_is_for_its_model(name):
    from fastsde.artifacts.recipe import shipped_recipe

    recipe = shipped_recipe(name)
    model = fastsde.load_model(name)
    assert recipe.key["model"]["name"] == name and recipe.budgets == list(range(4, 11))
    recipe.check_for(model.score, model.sde, tuple(model.shape), torch.float32, "cpu")


def test_a_damaged_fit_time_in_the_cache_is_named(tmp_path):
    """The cache's record of a fit's seconds is checked: junk there is a FileFormatError naming the file."""
    from fastsde.fitting.tune import _Cache

    cache = _Cache.__new__(_Cache)
    cache.folder, cache.tag = tmp_path, "t"
    grid = fastsde.shipped_grid("digits", "unipc", 5)
    cache.save_artifact("g.safetensors", grid, 1.5)
    assert cache.artifact("g.safetensors", "grid")[1] == 1.5
    (tmp_path / "t-g.safetensors.seconds").write_text("not a number")
    with pytest.raises(FileFormatError, match="seconds"):
        cache.artifact("g.safetensors", "grid")


def test_recipes_do_not_record_the_machine_s_cache_folder():
    """A recipe records the settings of its result, not where a machine kept its work."""
    from importlib import resources

    for folder in resources.files("fastsde").joinpath("_assets", "recipes").iterdir():
        recipe = fastsde.load_recipe(str(folder))
        assert "cache" not in recipe.record["settings"], folder.name

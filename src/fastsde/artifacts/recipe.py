"""Recipes: the sampler ``fastsde.tune`` chose for a model at each NFE budget, keyed to that model.

A recipe is a folder: ``recipe.safetensors`` (the key — process, t_end, sample shape, model
fingerprint and probe — and, per budget, the chosen solver, its options and the names of its fitted
grid / IIA table files, with the measured errors of every candidate), the grid and table files it
names (each a keyed artifact of its own), ``candidates.md`` (the table) and ``errors.png`` (the plot).
``fastsde.sample(score, sde, shape, recipe=r, steps=6)`` runs the choice for 6 NFE; a recipe for
another model or process is refused, naming the field.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..files import Fields, FileFormatError
from ..sde import SDE
from .artifact import FittedArtifact, read_key_common
from .grid import SOLVER_NAME, FittedGrid
from .iia_table import IIATable

__all__ = ["Recipe", "Choice", "load_recipe", "shipped_recipe", "RECIPE_FILE"]

FORMAT = "fastsde-recipe/1"
RECIPE_FILE = "recipe.safetensors"
#: option values a recipe may record (JSON scalars); grids and tables go in files of their own
_SCALARS = (bool, int, float, str, type(None))


@dataclass
class Choice:
    """The sampler chosen for one budget: ``solver`` with ``options`` (``steps`` included), and the file
    names (in the recipe folder) of its fitted grid and IIA table, if any; ``errors`` its measured MSE
    and FD on the held-out seeds."""

    solver: str
    options: dict[str, Any]
    grid_file: str | None = None
    table_file: str | None = None
    errors: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "solver": self.solver,
            "options": self.options,
            "grid_file": self.grid_file,
            "table_file": self.table_file,
            "errors": self.errors,
        }


@dataclass
class Recipe(FittedArtifact):
    """Per-budget choices with the key of the model and process they were tuned for."""

    kind: ClassVar[str] = "recipe"
    noun: ClassVar[str] = "recipe"
    made_by: ClassVar[str] = "fastsde.tune(...) or fastsde.load_recipe(folder)"
    remedy: ClassVar[str] = "tune a recipe for this model (fastsde.tune or `fastsde tune`)"
    FORMAT: ClassVar[str] = FORMAT
    file_kind: ClassVar[str] = "a recipe file"
    main_tensor: ClassVar[str] = "budgets"
    KEY_FIELDS: ClassVar[tuple[str, ...]] = ("process", "t_end")

    key: dict[str, Any]
    choices: dict[int, Choice]
    candidates: list[dict[str, Any]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)
    probe: Tensor | None = None
    folder: Path | None = None
    #: grids and tables by file name (loaded with the recipe, or made by tune)
    files: dict[str, FittedGrid | IIATable] = field(default_factory=dict)

    @property
    def budgets(self) -> list[int]:
        return sorted(self.choices)

    def __repr__(self) -> str:
        picks = ", ".join(f"{b}: {c.solver}{'+grid' if c.grid_file else ''}" for b, c in sorted(self.choices.items()))
        return f"Recipe({{{picks}}})"

    @classmethod
    def run_key(cls, sde: SDE, solver: str, options: Mapping[str, Any], t_end: float) -> dict[str, Any]:
        return {"process": sde.config(), "t_end": float(t_end)}

    def choose(self, steps: Any) -> tuple[str, dict[str, Any]]:
        """The solver and options (grid / table objects in place of their file names) for ``steps`` NFE."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps not in self.choices:
            raise ValueError(f"the recipe has budgets {self.budgets} (NFE); got steps={steps!r}")
        c = self.choices[steps]
        options = dict(c.options)
        if c.grid_file is not None:
            options["grid"] = self.files[c.grid_file]
        if c.table_file is not None:
            options["table"] = self.files[c.table_file]
        return c.solver, options

    def check_for(self, score: Any, sde: SDE, shape: tuple[int, ...], dtype: torch.dtype, device: Any) -> None:
        """ValueError when the run's process or model is not the one the recipe was tuned for."""
        if sde.config() != self.key["process"]:
            raise self.mismatch("process", self.key["process"], sde.config())
        if tuple(shape) != tuple(self.key["shape"]):
            raise self.mismatch("sample shape", tuple(self.key["shape"]), tuple(shape))
        self.check_model(score, tuple(shape), dtype, device)

    # -- files ---------------------------------------------------------------------------------

    def tensors(self) -> dict[str, Tensor]:
        tensors = {"budgets": torch.tensor(self.budgets, dtype=torch.float64)}
        if self.probe is not None:
            tensors["probe"] = self.probe.to(torch.float64)
        return tensors

    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "key": self.key,
            "choices": {str(b): c.as_dict() for b, c in sorted(self.choices.items())},
            "candidates": self.candidates,
            "record": self.record,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the folder: its grid and table files, then recipe.safetensors (each whole or not at all)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        for name, artifact in self.files.items():
            artifact.save(folder / name)
        super().save(folder / RECIPE_FILE)
        self.folder = folder
        return folder

    @classmethod
    def read(cls, f: Fields, tensors: dict[str, Any], where: str) -> Recipe:
        key, _, _, _, probe = read_key_common(f, tensors)
        key.integers("shape", min_length=1, low=1, high=1 << 20)
        choices: dict[int, Choice] = {}
        raw = f.obj("choices")
        for budget in raw.data:
            if not budget.isdigit() or not 1 <= int(budget) <= 100_000:
                raise raw.error(budget, "a budget (a positive number of evaluations) as the key")
            c = raw.obj(budget)
            solver = c.string("solver")
            if not SOLVER_NAME.fullmatch(solver):
                raise c.error("solver", "a fastsde solver name", solver)
            options = c.obj("options").data
            for name, value in options.items():
                if not isinstance(value, _SCALARS) or (isinstance(value, float) and not math.isfinite(value)):
                    raise c.error(f"options.{name}", "a number, string, bool or null", value)
            files = []
            for slot in ("grid_file", "table_file"):
                name = c.raw(slot, None)
                if name is not None and (
                    not isinstance(name, str) or "/" in name or "\\" in name or not name.endswith(".safetensors")
                ):
                    raise c.error(slot, "a file name (no folder) ending in .safetensors, or null", name)
                files.append(name)
            errors = c.obj("errors", {}).data
            choices[int(budget)] = Choice(solver, dict(options), files[0], files[1], dict(errors))
        if not choices:
            raise f.error("choices", "at least one budget")
        if tensors["budgets"].tolist() != [float(b) for b in sorted(choices)]:
            raise f.error("budgets", f"the budgets of choices, {sorted(choices)}", tensors["budgets"].tolist())
        candidates = f.raw("candidates", [], "a list of candidate records")
        if not isinstance(candidates, list):
            raise f.error("candidates", "a list of candidate records", candidates)
        return cls(key.data, choices, candidates, f.obj("record", {}).data, probe)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read a recipe folder written by ``fastsde.tune`` (or its ``recipe.safetensors``), with the grid and
    table files it names, every field checked (nothing is unpickled)."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    main = folder / RECIPE_FILE
    if not main.is_file():
        raise FileNotFoundError(f"no recipe at {str(folder)!r} (expected {RECIPE_FILE} there, written by fastsde tune)")
    recipe = Recipe.load(main)
    recipe.folder = folder
    for c in recipe.choices.values():
        for name, loader in ((c.grid_file, FittedGrid.load), (c.table_file, IIATable.load)):
            if name is None or name in recipe.files:
                continue
            file = folder / name
            if not file.is_file():
                raise FileFormatError(main, "choices", f"a file {name!r} in {str(folder)!r}", "no such file")
            recipe.files[name] = loader(file)
    return recipe


def shipped_recipe(model: str) -> Recipe | None:
    """The recipe shipped for a shipped model (``fastsde/_assets/recipes/<model>/``), or None."""
    from importlib import resources

    if not isinstance(model, str) or not SOLVER_NAME.fullmatch(model.replace("-", "_")):
        return None
    folder = resources.files("fastsde") / "_assets" / "recipes" / model
    if not (folder / RECIPE_FILE).is_file():
        return None
    return load_recipe(Path(str(folder)))

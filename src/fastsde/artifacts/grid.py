"""Fitted time grids: the N times ``fastsde.fit_grid`` fitted for a fixed-grid solver, keyed to the run
(process, solver, the solver's other options, steps, t_end, model fingerprint), their file and the
grids shipped for the shipped models (``fastsde/_assets/fitted_grids``, fitted by
benchmarks/fit_digits_grids.py).

A grid's ``times`` go into any fixed-grid solver's ``grid=`` option; a run whose key differs is a
ValueError naming the field (pass ``grid.times`` to use the times anyway).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..files import Fields, check_tensor
from ..sde import SDE
from .artifact import FittedArtifact, describe, read_key_common
from .iia_table import iia_base

__all__ = ["FittedGrid", "load_grid", "shipped_grid", "shipped_grids", "grid_file_name"]

FORMAT = "fastsde-grid/1"
#: what a solver name in a grid file looks like (the registry is above this layer: a name no solver has
#: loads, and then matches no run)
SOLVER_NAME = re.compile(r"[a-z][a-z0-9_]*")
#: the options an IIA solver adds to its base (its table, iia_heun's variant): a grid fitted for the base
#: keys neither, and the IIA solver runs on it (fit the grid, then the table on it)
IIA_OWN_OPTIONS = ("table", "variant")


@dataclass
class FittedGrid(FittedArtifact):
    """Fitted times (float64, decreasing from T to t_end) with the key of the run they were fitted
    for and how they were fitted (``record``: teacher, M, n, seed, metric, gamma, losses of the
    default, DP and refined grids, fit NFE per sample, seconds)."""

    kind: ClassVar[str] = "fitted grid"
    noun: ClassVar[str] = "grid"
    made_by: ClassVar[str] = "fastsde.fit_grid(...) or fastsde.load_grid(path)"
    remedy: ClassVar[str] = (
        "fit a grid for this run (fastsde.fit_grid or `fastsde fit-grid`), or pass its .times to use it anyway"
    )
    FORMAT: ClassVar[str] = FORMAT
    file_kind: ClassVar[str] = "a fitted grid file"
    main_tensor: ClassVar[str] = "times"
    KEY_FIELDS: ClassVar[tuple[str, ...]] = ("process", "solver", "options", "steps", "t_end")
    #: options that do not enter the key: the grid itself and its construction
    NOT_KEYED: ClassVar[tuple[str, ...]] = ("steps", "grid", "rho")
    assets: ClassVar[str | None] = "fitted_grids"
    plain_score_only: ClassVar[bool] = True

    times: Tensor
    key: dict[str, Any]
    record: dict[str, Any] = field(default_factory=dict)
    probe: Tensor | None = None

    @property
    def solver(self) -> str:
        return self.key["solver"]

    @property
    def steps(self) -> int:
        return int(self.key["steps"])

    def __repr__(self) -> str:
        ts = ", ".join(f"{v:.4g}" for v in self.times.tolist())
        return f"FittedGrid({self.solver}, steps={self.steps}, [{ts}], model={describe(self.key['model'])})"

    def config(self) -> dict[str, Any]:
        """How a run records this grid: its times and what they were fitted for."""
        return {
            "times": self.times.tolist(),
            "fitted_for": {"solver": self.solver, "steps": self.steps, "model": describe(self.key["model"])},
        }

    # -- the run -------------------------------------------------------------------------------

    @classmethod
    def run_key(cls, sde: SDE, solver: str, options: Mapping[str, Any], t_end: float) -> dict[str, Any]:
        """The key of a run, the model aside: process, solver, its other options, steps, t_end."""
        return {
            "process": sde.config(),
            "solver": solver,
            "options": {k: v for k, v in options.items() if k not in cls.NOT_KEYED},
            "steps": int(options["steps"]),
            "t_end": float(t_end),
        }

    def check_run(self, sde: SDE, solver: str, options: Mapping[str, Any], t_end: float) -> None:
        """ValueError naming the first key field (process, solver, options, steps, t_end) that differs.
        An IIA solver runs on the grid of its base solver (fit the grid, then the table on it)."""
        base = iia_base(solver)
        if base is not None and self.solver == base:
            solver, options = base, {k: v for k, v in options.items() if k not in IIA_OWN_OPTIONS}
        super().check_run(sde, solver, options, t_end)

    # -- files ---------------------------------------------------------------------------------

    def tensors(self) -> dict[str, Tensor]:
        tensors = {"times": self.times.to(torch.float64)}
        if self.probe is not None:
            tensors["probe"] = self.probe.to(torch.float64)
        return tensors

    def metadata(self) -> dict[str, Any]:
        return {"format": FORMAT, "key": self.key, "record": self.record}

    @classmethod
    def read(cls, f: Fields, tensors: dict[str, Any], where: str) -> FittedGrid:
        """Every field checked: the key's fields, and ``times`` finite, strictly decreasing, one per grid
        point (key.steps), from at most the process's T down to key.t_end."""
        key, sde, steps, t_end, probe = read_key_common(f, tensors)
        solver = key.string("solver")
        if not SOLVER_NAME.fullmatch(solver):
            raise key.error("solver", "a fastsde solver name", solver)
        key.obj("options")
        times = check_tensor(where, tensors, "times", (steps,))
        if not bool((times[:-1] > times[1:]).all()):
            raise f.error("times", "strictly decreasing times", times.tolist())
        if float(times[0]) > float(sde.T) * (1 + 1e-12) or not math.isclose(float(times[-1]), t_end, rel_tol=1e-9):
            raise f.error(
                "times", f"times from at most T = {float(sde.T):g} down to key.t_end = {t_end:g}", times.tolist()
            )
        record = f.obj("record", {}).data
        return cls(times, key.data, record, probe)


def load_grid(path: Any) -> FittedGrid:
    """Read a grid written by :meth:`FittedGrid.save` (safetensors; nothing is unpickled)."""
    return FittedGrid.load(path)


def grid_file_name(model: str, solver: str, steps: int) -> str:
    """File name of a shipped grid: <model>-<solver>-<steps>.safetensors."""
    return FittedGrid.file_name(model, solver, steps)


def shipped_grids() -> list[str]:
    """File names of the fitted grids shipped in the package."""
    return FittedGrid.shipped_names()


def shipped_grid(model: str, solver: str, steps: int) -> FittedGrid | None:
    """The grid shipped for this shipped model, fixed-grid solver (at its default options) and
    number of grid points, or None when none is shipped (see :func:`shipped_grids`)."""
    return FittedGrid.shipped(model, solver, steps)

"""IIA coefficient tables: the keyed table of an IIA solver (``fastsde.solvers.iia``), its file and the
tables shipped for the shipped models (``fastsde/_assets/iia_tables``).

A table holds the per-step coefficients β_i of the run it was fitted for (``fastsde.fit_iia``): the
process and its parameters, the IIA solver and its options, the grid (values hashed), steps, t_end
and a fingerprint of the model. Its columns are the solver's directions, named here (the file
format's names; the steppers build them in this order).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..files import Fields, check_tensor
from ..grids import explicit_times, time_grid
from ..sde import SDE
from .artifact import FittedArtifact, describe, grid_hash, read_grid_hash, read_key_common

__all__ = [
    "IIATable",
    "IIA_BASES",
    "iia_directions",
    "iia_solver_name",
    "iia_base",
    "load_iia",
    "shipped_table",
    "shipped_tables",
    "read_shipped",
    "table_name",
]

FORMAT = "fastsde-iia/1"
#: base solver name -> IIA solver name (the solvers a table is fitted for)
IIA_BASES: dict[str, str] = {"heun": "iia_heun", "ddim": "iia_ddim", "dpmpp_2m": "iia_dpmpp_2m"}


def iia_directions(solver: str, options: Mapping[str, Any]) -> tuple[str, ...]:
    """The directions of an IIA solver with these options: the columns of its table, in order.

    ``iia_heun``: x̃ − D, D′ − D and the same two of the previous step (``variant="iia"``), or the two
    Heun slopes (``variant="biia"``); ``iia_ddim``, ``iia_dpmpp_2m``: x̂, x̂ − x̂_prev, ε̂ − ε̂_prev."""
    if solver == "iia_heun":
        if options.get("variant", "iia") == "biia":
            return ("d", "d_next")
        return ("xt-D", "Dn-D", "prev:xt-D", "prev:Dn-D")
    return ("x0", "x0-prev", "eps-prev")


def iia_solver_name(solver: str) -> str:
    """ "dpmpp_2m" or "iia_dpmpp_2m" -> "iia_dpmpp_2m"."""
    if solver in IIA_BASES:
        return IIA_BASES[solver]
    if solver in IIA_BASES.values():
        return solver
    raise ValueError(f"solver must be one of {sorted(IIA_BASES)} (or their iia_ names), got {solver!r}")


def iia_base(solver: str) -> str | None:
    """ "iia_dpmpp_2m" -> "dpmpp_2m": the base solver of an IIA solver (None for any other name)."""
    return {v: k for k, v in IIA_BASES.items()}.get(solver)


@dataclass
class IIATable(FittedArtifact):
    """Per-step IIA coefficients with the key of the run they were fitted for.

    ``coefficients``: (steps − 1, m) float64, one row per move, one column per direction
    (``directions``). ``fit``: how it was fitted and what it cost (``nfe_per_sample``: evaluations
    per fitting sample, coarse steps and fine reference together; ``evaluations``; ``calls``;
    ``seconds``) and the per-step training MSE of the base step and of the IIA step against the
    fine reference (``mse_base``, ``mse_iia``).
    """

    kind: ClassVar[str] = "IIA table"
    noun: ClassVar[str] = "table"
    made_by: ClassVar[str] = "fastsde.fit_iia(...) or fastsde.load_iia(path)"
    remedy: ClassVar[str] = "fit a table for this run (fastsde.fit_iia or `fastsde fit-iia`)"
    FORMAT: ClassVar[str] = FORMAT
    file_kind: ClassVar[str] = "an IIA table file"
    main_tensor: ClassVar[str] = "coefficients"
    KEY_FIELDS: ClassVar[tuple[str, ...]] = ("process", "solver", "options", "steps", "t_end", "grid")
    #: options that do not enter the key: steps has its own field, the table is this
    NOT_KEYED: ClassVar[tuple[str, ...]] = ("steps", "table")
    assets: ClassVar[str | None] = "iia_tables"
    starts_at_T: ClassVar[bool] = True

    coefficients: Tensor
    key: dict[str, Any]
    directions: tuple[str, ...]
    fit: dict[str, Any] = field(default_factory=dict)
    probe: Tensor | None = None

    @property
    def solver(self) -> str:
        return self.key["solver"]

    @property
    def steps(self) -> int:
        return int(self.key["steps"])

    def __repr__(self) -> str:
        return (
            f"IIATable({self.solver}, steps={self.steps}, {self.key['process'].get('type')}, "
            f"model={describe(self.key['model'])})"
        )

    # -- the run -------------------------------------------------------------------------------

    @classmethod
    def run_key(cls, sde: SDE, solver: str, options: Mapping[str, Any], t_end: float) -> dict[str, Any]:
        """The key of a run, the model aside: process, solver, its options, steps, t_end, grid hash."""
        opts = {k: v for k, v in options.items() if k not in cls.NOT_KEYED}
        grid = time_grid(sde, opts["grid"], options["steps"], sde.T, t_end, opts["rho"])
        if explicit_times(opts["grid"]) is not None:
            opts["grid"] = "explicit"  # the times themselves are keyed by the grid hash
        return {
            "process": sde.config(),
            "solver": solver,
            "options": opts,
            "steps": int(options["steps"]),
            "t_end": float(t_end),
            "grid": grid_hash(grid),
        }

    def check_run(self, sde: SDE, solver: str, options: Mapping[str, Any], t_end: float) -> None:
        """ValueError naming the first key field (process, solver, options, steps, t_end, grid) that differs."""
        super().check_run(sde, solver, options, t_end)
        if self.coefficients.shape[0] != self.steps - 1:
            raise ValueError(f"IIA table has {self.coefficients.shape[0]} coefficient rows for {self.steps} steps")

    # -- files ---------------------------------------------------------------------------------

    def tensors(self) -> dict[str, Tensor]:
        tensors = {"coefficients": self.coefficients.to(torch.float64)}
        if self.probe is not None:
            tensors["probe"] = self.probe.to(torch.float64)
        return tensors

    def metadata(self) -> dict[str, Any]:
        return {"format": FORMAT, "key": self.key, "directions": list(self.directions), "fit": self.fit}

    @classmethod
    def read(cls, f: Fields, tensors: dict[str, Any], where: str) -> IIATable:
        key, _, steps, _, probe = read_key_common(f, tensors)
        solver = key.string("solver", choices=tuple(IIA_BASES.values()))
        options = key.obj("options")
        read_grid_hash(key)
        directions = tuple(f.strings("directions", min_length=1))
        expected = iia_directions(solver, options.data)
        if directions != expected:
            raise f.error("directions", f"{list(expected)} (the directions of {solver} with these options)", directions)
        coefficients = check_tensor(where, tensors, "coefficients", (steps - 1, len(directions)))
        fit = f.obj("fit", {}).data
        return cls(coefficients=coefficients, key=key.data, directions=directions, fit=fit, probe=probe)

    # -- shipped tables ------------------------------------------------------------------------

    @classmethod
    def file_name(cls, model: str, solver: str, steps: int, variant: str | None = None) -> str:
        """File name of a table: <model>-<base solver>[-<variant>]-<steps>.safetensors."""
        base = iia_base(solver) or solver
        tag = f"-{variant}" if variant and variant != "iia" else ""
        return f"{model}-{base}{tag}-{steps}.safetensors"


def load_iia(path: Any) -> IIATable:
    """Read a table written by :meth:`IIATable.save` (safetensors; nothing is unpickled)."""
    return IIATable.load(path)


def table_name(model: str, solver: str, steps: int, variant: str | None = None) -> str:
    """File name of a table: <model>-<base solver>[-<variant>]-<steps>.safetensors."""
    return IIATable.file_name(model, solver, steps, variant)


def shipped_table(model: str, solver: str, steps: int, variant: str | None = None) -> IIATable | None:
    """The table shipped in the package for this model, solver and steps, or None."""
    return IIATable.shipped(model, solver, steps, variant)


def read_shipped(name: str) -> IIATable:
    """A shipped table by its file name (see :func:`shipped_tables`)."""
    return IIATable.read_shipped(name)


def shipped_tables() -> list[str]:
    """File names of the tables shipped in the package."""
    return IIATable.shipped_names()

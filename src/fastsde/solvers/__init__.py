"""Solver registry: one line per solver. Each module declares its SolverSpec(s)."""

from __future__ import annotations

from .base import SolverSpec
from .em import EM
from .ode import ODE

SOLVERS: dict[str, SolverSpec] = {spec.name: spec for spec in (EM, ODE)}


def get_solver(name: str | SolverSpec) -> SolverSpec:
    """Look a solver up by name (or pass a SolverSpec through)."""
    if isinstance(name, SolverSpec):
        return name
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; valid solvers: {sorted(SOLVERS)}")
    return SOLVERS[name]


__all__ = ["SOLVERS", "SolverSpec", "get_solver"]

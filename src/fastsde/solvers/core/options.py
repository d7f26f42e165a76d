"""Solver options: :class:`Option` (default, check, doc), the checks options use, and the grid options
every fixed-step solver shares."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...grids import GRIDS, check_grid_choice, default_grid
from ...sde import SDE

__all__ = [
    "Option",
    "as_python_number",
    "MAX_STEPS",
    "positive_int",
    "positive_float",
    "nonnegative_float",
    "unit_interval",
    "one_of",
    "optional",
    "positive_or_inf",
    "boolean",
    "grid_options",
]


@dataclass(frozen=True)
class Option:
    """One solver option: its default (a value, or a function of the process) and its check."""

    default: Any
    check: Callable[[str, Any], None]
    doc: str = ""

    def default_for(self, sde: SDE) -> Any:
        return self.default(sde) if callable(self.default) else self.default


def as_python_number(v: Any) -> Any:
    """numpy (or any numbers.Integral / numbers.Real) scalars as Python int / float, numpy's bool as
    bool; everything else unchanged, so that options accept ``np.int64(10)`` as they accept ``10``
    (a bool stays a bool, which the integer and number checks refuse)."""
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, bool) or type(v) in (int, float) or not isinstance(v, numbers.Real):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    return float(v)


#: the most grid points (steps) a fixed-grid solver takes: far beyond any use (EM's default is 1000),
#: while a typo such as 1e11 would allocate the grid and its per-step state before failing
MAX_STEPS = 10**6


def positive_int(minimum: int = 1, maximum: int | None = None) -> Callable[[str, Any], None]:
    def check(name: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
        if maximum is not None and v > maximum:
            raise ValueError(f"{name} must be an integer <= {maximum} (the limit fastsde sets), got {v!r}")

    return check


def _finite_number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def positive_float(name: str, v: Any) -> None:
    if _finite_number(name, v) <= 0:
        raise ValueError(f"{name} must be > 0, got {v!r}")


def nonnegative_float(name: str, v: Any) -> None:
    if _finite_number(name, v) < 0:
        raise ValueError(f"{name} must be >= 0, got {v!r}")


def unit_interval(name: str, v: Any) -> None:
    x = _finite_number(name, v)
    if not 0 < x <= 1:
        raise ValueError(f"{name} must lie in (0, 1], got {v!r}")


def one_of(*choices: Any) -> Callable[[str, Any], None]:
    def check(name: str, v: Any) -> None:
        if v not in choices:
            raise ValueError(f"{name} must be one of {list(choices)}, got {v!r}")

    return check


def optional(check: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
    """The check of an option whose None means "chosen for you"; any other value must pass ``check``."""

    def check_optional(name: str, v: Any) -> None:
        if v is not None:
            check(name, v)

    return check_optional


def positive_or_inf(name: str, v: Any) -> None:
    """A positive number; math.inf for no limit."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or not v > 0:
        raise ValueError(f"{name} must be a number > 0 (math.inf for no cap), got {v!r}")


def boolean(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be True or False, got {v!r}")


def grid_options(steps: int, family: str = "sde") -> dict[str, Option]:
    """The options of every fixed-grid solver: number of grid points, grid kind, ρ."""
    return {
        "steps": Option(steps, positive_int(2, MAX_STEPS), "grid points from T to t_end, both included"),
        "grid": Option(
            lambda sde: default_grid(sde, family),
            check_grid_choice,
            f"time grid: one of {', '.join(GRIDS)}, or explicit times (a tensor, or fastsde.fit_grid's result)",
        ),
        "rho": Option(7.0, positive_float, "ρ of the EDM grid"),
    }

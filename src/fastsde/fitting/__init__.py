"""Fitting procedures: they run solvers (through the registry and the front door's checks) to make the
fitted artifacts of ``fastsde.artifacts``: IIA coefficient tables (``fit_iia``), time grids
(``fit_grid``) and learned ML-EM schedules (``fit_mlem``), and recipes (``tune``: the best sampler per NFE budget). Above the solvers and the front door."""

from .grid import fit_grid
from .iia import fit_iia, iia_step_errors
from .mlem import fit_mlem
from .tune import TuneSettings, tune

__all__ = ["fit_grid", "fit_iia", "fit_mlem", "iia_step_errors", "tune", "TuneSettings"]

"""Fitted artifacts: data fitted once for a model and a run (IIA coefficient tables, time grids, ML-EM
schedules), keyed to what they were fitted for, saved as safetensors + JSON, and the copies shipped in
the package (``fastsde/_assets``).

Below the solvers: a solver declares the artifact it takes (``SolverSpec.artifact``) and the front
door checks it against the run; the fitting procedures that make them are ``fastsde.fitting``.
"""

from .artifact import FittedArtifact
from .grid import FittedGrid, load_grid, shipped_grid, shipped_grids
from .iia_table import IIATable, load_iia
from .mlem import MLEMSchedule, load_mlem
from .recipe import Recipe, load_recipe

__all__ = [
    "FittedArtifact",
    "FittedGrid",
    "load_grid",
    "shipped_grid",
    "shipped_grids",
    "IIATable",
    "load_iia",
    "MLEMSchedule",
    "load_mlem",
    "Recipe",
    "load_recipe",
]

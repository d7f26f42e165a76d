"""fastsde: sample score-based diffusion models, and compute their likelihoods, with few network
evaluations."""

from . import problems
from .api import SampleResult, sample
from .files import FileFormatError
from .grid_fit import FittedGrid, fit_grid, load_grid, shipped_grid, shipped_grids
from .grids import time_grid
from .guidance import CFGScore, ClassifierGuidance
from .iia import IIATable, fit_iia, load_iia
from .levels import Levels
from .likelihood import LikelihoodResult, bits_per_dim, log_likelihood
from .likelihood_data import DatasetLikelihood, dataset_likelihood, differentiable_score
from .mlem_fit import MLEMSchedule, fit_mlem, load_mlem
from .models import list_models, load_model
from .noise import NoiseSource
from .score import (
    CountingScore,
    DenoiserScore,
    DiffusersUNetScore,
    GaussianMixture,
    NoisePredictionScore,
    NonFiniteScoreError,
    VelocityScore,
)
from .sde import EDM, SDE, VESDE, VPSDE, DiscreteVPSDE, RectifiedFlow, SubVPSDE
from .sharding import ShardRun, load_samples, sample_to_dir
from .sharding_likelihood import likelihood_to_dir, load_likelihood
from .solvers import SOLVERS, get_solver
from .solvers.driver import BudgetError, IntegrationError, NonFiniteSolveError

__version__ = "0.1.0"

__all__ = [
    "RectifiedFlow",
    "VelocityScore",
    "SDE",
    "VPSDE",
    "DiscreteVPSDE",
    "SubVPSDE",
    "VESDE",
    "EDM",
    "GaussianMixture",
    "NoisePredictionScore",
    "DenoiserScore",
    "DiffusersUNetScore",
    "CountingScore",
    "CFGScore",
    "ClassifierGuidance",
    "NonFiniteScoreError",
    "FileFormatError",
    "NonFiniteSolveError",
    "BudgetError",
    "IntegrationError",
    "NoiseSource",
    "SampleResult",
    "sample",
    "time_grid",
    "SOLVERS",
    "problems",
    "get_solver",
    "log_likelihood",
    "bits_per_dim",
    "LikelihoodResult",
    "dataset_likelihood",
    "DatasetLikelihood",
    "differentiable_score",
    "load_model",
    "list_models",
    "fit_iia",
    "fit_grid",
    "load_grid",
    "shipped_grid",
    "shipped_grids",
    "FittedGrid",
    "load_iia",
    "IIATable",
    "Levels",
    "MLEMSchedule",
    "fit_mlem",
    "load_mlem",
    "sample_to_dir",
    "load_samples",
    "ShardRun",
    "likelihood_to_dir",
    "load_likelihood",
]

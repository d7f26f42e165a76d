"""fastsde: sample score-based diffusion models, and compute their likelihoods, with few network
evaluations."""

from . import problems
from .api import SampleResult, sample
from .artifacts import (
    FittedGrid,
    IIATable,
    MLEMSchedule,
    Recipe,
    load_grid,
    load_iia,
    load_mlem,
    load_recipe,
    shipped_grid,
    shipped_grids,
)
from .files import FileFormatError
from .fitting import TuneSettings, fit_grid, fit_iia, fit_mlem, tune
from .grids import time_grid
from .guidance import CFGScore, ClassifierGuidance
from .levels import Levels
from .likelihood.dataset import DatasetLikelihood, dataset_likelihood, differentiable_score
from .likelihood.pf_ode import LikelihoodResult, bits_per_dim, log_likelihood
from .likelihood.sharded import likelihood_to_dir, load_likelihood
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
from .sharding import load_samples, sample_to_dir
from .shards import ShardRun
from .solvers import SOLVERS, get_solver
from .solvers.core.driver import BudgetError, IntegrationError, NonFiniteSolveError

__version__ = "0.1.0"

__all__ = [
    "Recipe",
    "load_recipe",
    "tune",
    "TuneSettings",
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

"""Solver registry: one line per solver. Each module declares its SolverSpec; its stepper declares
what the method is (order, error order, NFE per step, stochasticity, coordinate)."""

from __future__ import annotations

from .adaptive import ADAPTIVE
from .adaptive_sde_dpm import ADAPTIVE_SDE_DPM
from .adaptive_sde_dpm_2m import ADAPTIVE_SDE_DPM_2M
from .ancestral import ANCESTRAL
from .core.spec import SolverSpec
from .ddim import DDIM
from .deis import DEIS
from .dpmpp_2m import DPMPP_2M
from .dpmpp_2m_sde import DPMPP_2M_SDE
from .dpmpp_3m import ADAPTIVE_DPMPP_3M, DPMPP_3M
from .dpmpp_3m_sde import DPMPP_3M_SDE
from .em import EM
from .er_sde import ER_SDE
from .euler import EULER
from .heun import HEUN
from .iia import IIA_DDIM, IIA_DPMPP_2M, IIA_HEUN
from .ipndm import IPNDM
from .lms import LMS
from .mlem import MLEM
from .ode import ODE
from .ode_corrector import ODE_CORRECTOR
from .pc import PC
from .reverse_diffusion import REVERSE_DIFFUSION
from .sa_solver import SA_SOLVER
from .unipc import UNIPC

SOLVERS: dict[str, SolverSpec] = {
    spec.name: spec
    for spec in (
        EM,
        ADAPTIVE,
        ADAPTIVE_SDE_DPM,
        ADAPTIVE_SDE_DPM_2M,
        REVERSE_DIFFUSION,
        ANCESTRAL,
        PC,
        EULER,
        HEUN,
        DDIM,
        DPMPP_2M,
        DPMPP_2M_SDE,
        DPMPP_3M,
        ADAPTIVE_DPMPP_3M,
        DPMPP_3M_SDE,
        ER_SDE,
        SA_SOLVER,
        LMS,
        IPNDM,
        UNIPC,
        DEIS,
        ODE,
        ODE_CORRECTOR,
        IIA_HEUN,
        IIA_DDIM,
        IIA_DPMPP_2M,
        MLEM,
    )
}


def get_solver(name: str | SolverSpec) -> SolverSpec:
    """Look a solver up by name (or pass a SolverSpec through)."""
    if isinstance(name, SolverSpec):
        return name
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; valid solvers: {sorted(SOLVERS)}")
    return SOLVERS[name]


__all__ = ["SOLVERS", "SolverSpec", "get_solver"]

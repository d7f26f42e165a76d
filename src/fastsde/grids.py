"""Time grids for fixed-step solvers, built in float64 from t_start down to t_end.

- ``uniform``: uniform in t (Score SDE).
- ``edm``: Karras et al.'s ρ-schedule, uniform in σ̃^{1/ρ} where σ̃ = σ/m is the EDM noise level.
- ``logsnr``: uniform in the half log-SNR λ = log(m/σ) (DPM-Solver).
- ``quadratic``: uniform in √t (DDIM's quadratic skip, for continuous time).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sde import EDM, SDE

__all__ = ["GRIDS", "time_grid", "default_grid"]

GRIDS = ("uniform", "edm", "logsnr", "quadratic")


def default_grid(sde: SDE, family: str = "sde") -> str:
    """Sensible default per process: σ-time processes use the ρ-schedule, SDE samplers on VP/VE use
    uniform t (Score SDE), exponential integrators use log-SNR."""
    if isinstance(sde, EDM):
        return "edm"
    return {"sde": "uniform", "ode": "edm", "exp": "logsnr"}[family]


def time_grid(sde: SDE, kind: str, n: int, t_start: float, t_end: float, rho: float = 7.0) -> Tensor:
    """n grid points (float64), decreasing from t_start to t_end, both included."""
    if kind not in GRIDS:
        raise ValueError(f"grid must be one of {list(GRIDS)}, got {kind!r}")
    if n < 2:
        raise ValueError(f"a grid needs at least 2 points, got {n}")
    ends = torch.tensor([t_start, t_end], dtype=torch.float64)
    u = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    if kind == "uniform":
        grid = t_start + u * (t_end - t_start)
    elif kind == "quadratic":
        a, b = ends.sqrt().tolist()
        grid = (a + u * (b - a)) ** 2
    elif kind == "logsnr":
        lam = sde.log_snr(ends)
        grid = sde.t_from_lambda(lam[0] + u * (lam[1] - lam[0]))
    else:
        s = sde.edm_sigma(ends) ** (1.0 / rho)
        grid = sde.t_from_edm_sigma((s[0] + u * (s[1] - s[0])) ** rho)
    inner = grid[1:-1]
    if not bool(torch.isfinite(inner).all()) or (n > 2 and not bool((grid[:-1] > grid[1:]).all())):
        why = (
            f" with rho = {rho!r} (σ^(1/rho) overflows or rounds to equal points): choose rho near 7"
            if kind == "edm"
            else ""
        )
        raise ValueError(
            f"the {kind} grid of {n} points from t = {t_start:g} to {t_end:g} is not finite and decreasing{why}"
        )
    grid[0], grid[-1] = t_start, t_end  # exact ends despite round trips through λ
    return grid

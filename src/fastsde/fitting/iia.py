"""Fitting IIA coefficient tables (``fit_iia``) and measuring them (``iia_step_errors``).

``fit_iia`` fits, step by step, the coefficients β_i of an IIA solver (``fastsde.solvers.iia``) by
least squares against the base solver run on ``fine_steps`` sub-steps of the same step (a grid of the
same family inside [t_{i+1}, t_i]), in float64 with a tiny ridge, from ``n`` prior draws of ``seed``,
advancing the batch with the fitted step so that step i + 1 is fitted on the states it will meet.
The result is an :class:`~fastsde.artifacts.iia_table.IIATable` keyed to the run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..artifacts.artifact import data_shape, model_fingerprint
from ..artifacts.iia_table import IIATable, iia_solver_name
from ..grids import explicit_times
from ..noise import NoiseSource, Stream
from ..score import CountingScore, ScoreFn, check_score_and_process
from ..sde import SDE
from ..solvers import get_solver
from ..solvers.core.context import SolverContext
from ..solvers.core.driver import integrate
from ..solvers.core.stepper import Step
from ..solvers.iia import IIAStepper

__all__ = ["fit_iia", "iia_step_errors"]


def _ridge_solve(gram: list[list[float]], rhs: list[float], ridge: float) -> list[float]:
    """(GᵀG + λI)β = Gᵀr with λ = ridge · mean diagonal, by Cholesky in Python floats (m ≤ 4:
    exact same bits on every machine); zeros when GᵀG is zero."""
    m = len(rhs)
    lam = ridge * sum(gram[i][i] for i in range(m)) / m
    if all(gram[i][i] == 0 for i in range(m)):
        return [0.0] * m
    a = [[gram[i][j] + (lam if i == j else 0.0) for j in range(m)] for i in range(m)]
    low = [[0.0] * m for _ in range(m)]
    for i in range(m):
        for j in range(i + 1):
            acc = a[i][j] - sum(low[i][k] * low[j][k] for k in range(j))
            if i == j:
                if not acc > 0:
                    raise ValueError("IIA fit: the directions' Gram matrix is not positive definite; raise ridge")
                low[i][i] = math.sqrt(acc)
            else:
                low[i][j] = acc / low[j][j]
    y = [0.0] * m
    for i in range(m):
        y[i] = (rhs[i] - sum(low[i][k] * y[k] for k in range(i))) / low[i][i]
    out = [0.0] * m
    for i in reversed(range(m)):
        out[i] = (y[i] - sum(low[k][i] * out[k] for k in range(i + 1, m))) / low[i][i]
    return out


@dataclass(frozen=True)
class _Run:
    """One fitting (or checking) solve: the IIA solver and its resolved options, the dims of one
    sample, ``n`` prior draws of ``seed``, the end time, the reference's sub-steps per step, the ridge,
    the coefficients to use (None: fit them), and where it runs."""

    solver: str
    options: dict[str, Any]
    shape: tuple[int, ...]
    n: int
    seed: int
    t_end: float
    fine_steps: int
    ridge: float
    coefficients: Tensor | None = None
    progress: bool = False
    dtype: torch.dtype = torch.float64
    device: torch.device | str = "cpu"


class _Loop:
    """One coarse solve in which each step is compared with the base solver on fine sub-steps of it:
    ``fit`` solves for β_i and advances with it; otherwise the given coefficients are used."""

    def __init__(
        self,
        score: ScoreFn,
        sde: SDE,
        stepper: IIAStepper,
        fine_steps: int,
        n: int,
        ridge: float,
        coefficients: Tensor | None,
    ) -> None:
        self.sde, self.stepper, self.fine = sde, stepper, fine_steps
        self.ridge, self.coefficients = ridge, coefficients
        self.ref_score = CountingScore(score, n)
        self.base_spec = stepper.base_spec
        self.betas: list[Tensor] = []
        self.mse_base: list[float] = []
        self.mse_iia: list[float] = []

    def reference(self, x: Tensor, t: float, t_next: float) -> Tensor:
        """The base solver from (x, t) to t_next on ``fine_steps`` moves of its grid family."""
        ctx = SolverContext(
            sde=self.sde, score=self.ref_score, noise=NoiseSource.from_seed(0, 1), t_start=t, t_end=t_next
        )
        opts = dict(self.stepper.base.options, steps=self.fine + 1)
        if explicit_times(opts.get("grid")) is not None:
            opts["grid"] = "logsnr"  # an explicit (e.g. fitted) grid: its sub-steps uniform in log-SNR
        if "lower_order_final" in opts:
            opts["lower_order_final"] = False  # the reference should be accurate, not few-step safe
        return self.base_spec.run(ctx, x, **opts)

    def __call__(self, x: Tensor, s: Step, base: Tensor, dirs: list[Tensor | None]) -> Tensor:
        t, t_next = float(s.t64[0]), float(s.t_next64[0])
        b = x.shape[0]
        r = (self.reference(x, t, t_next) - base).reshape(b, -1).to(torch.float64)
        cols = [j for j, g in enumerate(dirs) if g is not None]
        m = len(dirs)
        beta = torch.zeros(m, dtype=torch.float64)
        if self.coefficients is not None:
            beta = self.coefficients[int(s.index[0])].clone()
        elif cols:
            g = torch.stack([dirs[j].reshape(b, -1).to(torch.float64) for j in cols], dim=-1).reshape(-1, len(cols))
            # elementwise products and sums, not BLAS: the same bits on every run (MKL's dgemm is not)
            gram = (g[:, :, None] * g[:, None, :]).sum(0).tolist()
            rhs = (g * r.reshape(-1, 1)).sum(0).tolist()
            beta[cols] = torch.tensor(_ridge_solve(gram, rhs, self.ridge), dtype=torch.float64)
        corr = sum(
            (beta[j] * dirs[j].reshape(b, -1).to(torch.float64) for j in cols if beta[j] != 0),
            torch.zeros_like(r),
        )
        self.betas.append(beta)
        self.mse_base.append(float(r.pow(2).mean()))
        self.mse_iia.append(float((r - corr).pow(2).mean()))
        return beta.to(x.device)


def _run_loop(score: ScoreFn, sde: SDE, run: _Run) -> tuple[_Loop, CountingScore]:
    """The IIA solve of ``run`` with the fitting hook in place of the table."""
    spec = get_solver(run.solver)
    noise = NoiseSource.from_seed(run.seed, run.n)
    counted = CountingScore(score, run.n)
    ctx = SolverContext(
        sde=sde, score=counted, noise=noise, t_start=sde.T, t_end=float(run.t_end), progress=run.progress
    )
    plan = spec.build(ctx, dict(run.options, table=None))
    loop = _Loop(score, sde, plan["stepper"], run.fine_steps, run.n, run.ridge, run.coefficients)
    plan["stepper"].fit_hook = loop
    with torch.no_grad():
        x = sde.prior_sample(noise.normal(run.shape, Stream.PRIOR, 0, dtype=run.dtype, device=run.device))
        desc = f"fit {run.solver}" if run.coefficients is None else f"check {run.solver}"
        integrate(ctx, x, desc=desc, **plan)
    if plan["stepper"].shared_first_move:
        # from m(T) = 0 (a rectified flow) move 0 is the driver's shared first move, exact in x̂0 and not an
        # IIA step: its row of coefficients is zero (not fitted; mse_base / mse_iia cover the later moves)
        loop.betas.insert(0, torch.zeros(len(plan["stepper"].directions(run.options)), dtype=torch.float64))
    return loop, counted


def _check_common(score: Any, sde: Any, n: Any, fine_steps: Any, ridge: Any, seed: Any) -> None:
    check_score_and_process(score, sde)
    for name, v, lo in (("n", n, 1), ("fine_steps", fine_steps, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not (ridge >= 0 and math.isfinite(ridge)):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")


def fit_iia(
    score: ScoreFn,
    sde: SDE,
    solver: str = "dpmpp_2m",
    steps: int = 8,
    n: int = 256,
    seed: int = 0,
    *,
    fine_steps: int = 10,
    shape: tuple[int, ...] | None = None,
    t_end: float | None = None,
    ridge: float = 1e-10,
    progress: bool = False,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    **options: Any,
) -> IIATable:
    """Fit the per-step coefficients of an IIA solver for this model, process and run.

    Args:
        score, sde: the model and its process.
        solver: the base solver, "dpmpp_2m", "heun" or "ddim" (or the iia_ name).
        steps: grid points of the runs the table is for.
        n: prior draws fitted on (from ``seed``; evaluate on other seeds).
        fine_steps: sub-steps of the base solver per step for the reference.
        shape: dims of one sample (read off the score when it has ``.shape``).
        t_end: end time (default: the process's).
        ridge: ridge λ relative to the mean diagonal of GᵀG.
        **options: the IIA solver's options (grid, rho, lower_order_final, variant).
    """
    _check_common(score, sde, n, fine_steps, ridge, seed)
    iia = iia_solver_name(solver)
    spec = get_solver(iia)
    t_end = sde.default_t_end if t_end is None else float(t_end)
    sde.check_time("t_end", t_end)
    if "table" in options:
        raise ValueError("fit_iia takes no table option")
    opts = spec.resolve(sde, {**options, "steps": steps}, t_end)
    dims = data_shape(score, shape)
    start = time.perf_counter()
    run = _Run(iia, opts, dims, n, seed, t_end, fine_steps, ridge, None, progress, dtype, device)
    loop, counted = _run_loop(score, sde, run)
    seconds = time.perf_counter() - start
    fingerprint, probe = model_fingerprint(score, sde, dims, t_end, dtype, device)
    key = {**IIATable.run_key(sde, iia, opts, t_end), "model": fingerprint}
    evaluations = float(counted.nfe_per_sample.sum() + loop.ref_score.nfe_per_sample.sum())
    fit = {
        "n": n,
        "seed": seed,
        "fine_steps": fine_steps,
        "ridge": ridge,
        "dtype": str(dtype).replace("torch.", ""),
        "nfe_per_sample": evaluations / n,
        "evaluations": evaluations,
        "calls": counted.calls + loop.ref_score.calls,
        "seconds": seconds,
        "mse_base": loop.mse_base,
        "mse_iia": loop.mse_iia,
    }
    coef = torch.stack(loop.betas) if loop.betas else torch.zeros(0, len(loop.stepper.directions(opts)))
    return IIATable(coef, key, loop.stepper.directions(opts), fit, probe)


def iia_step_errors(
    score: ScoreFn,
    sde: SDE,
    table: IIATable,
    n: int = 256,
    seed: int = 1,
    *,
    fine_steps: int | None = None,
    shape: tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Per-step MSE of the base step and of the IIA step against the fine reference on the states of
    an IIA run from ``n`` prior draws of ``seed`` (use a seed other than the table's): {"base", "iia"}."""
    fine = int(table.fit.get("fine_steps", 10)) if fine_steps is None else fine_steps
    _check_common(score, sde, n, fine, 0.0, seed)
    opts = {**table.key["options"], "steps": table.steps}
    t_end = float(table.key["t_end"])
    spec = get_solver(table.solver)
    opts = spec.resolve(sde, opts, t_end)
    table.check_run(sde, table.solver, opts, t_end)
    dims = data_shape(score, shape)
    table.check_model(score, dims, dtype, device)
    run = _Run(table.solver, opts, dims, n, seed, t_end, fine, 0.0, table.coefficients, False, dtype, device)
    loop, _ = _run_loop(score, sde, run)
    return {"base": loop.mse_base, "iia": loop.mse_iia}

"""Fitted time grids (fastsde.fit_grid) against each solver's default grid at 4-10 NFE, on the 16-D
and 64-D mixtures in the EDM and VP forms: fitted on seed 0 (n = 128 draws, M = 60, one refinement
sweep), evaluated on held-out seed 1 with 4096 samples: per-mode Fréchet distance over its
finite-sample floor, and the MSE to the exact PF-ODE solution from the same noise (`ode`, rtol 1e-8).

    .venv/bin/python benchmarks/fit_grid.py

Prints the markdown table of docs/benchmarks/few-step.md, "Fitted time grids on the exact mixtures". Took about
8 minutes on a shared core.
"""

from __future__ import annotations

import time

import torch

import fastsde
from fastsde.metrics.mixture import mixture_frechet, mixture_frechet_floor, mse

N_EVAL, N_FIT, FIT_SEED, EVAL_SEED = 4096, 128, 0, 1
NFES = (4, 5, 6, 8, 10)
SOLVERS = ("dpmpp_2m", "dpmpp_3m", "unipc")
PROBLEMS = [("EDM", 16), ("EDM", 64), ("VP", 16), ("VP", 64)]
F64 = torch.float64


def steps_for(solver: str, nfe: int) -> int:
    """Grid points whose fixed NFE (denoise included) is nfe."""
    spec = fastsde.SOLVERS[solver]
    for steps in range(2, 64):
        if spec.fixed_nfe({"steps": steps}) == nfe:
            return steps
    raise ValueError(f"{solver}: no step count gives {nfe} NFE")


def main() -> None:
    torch.set_num_threads(1)
    print(
        "| problem | solver | NFE | default FD / floor | fitted FD / floor | default MSE | fitted MSE | fit NFE / sample | fit s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for proc, dim in PROBLEMS:
        sde = fastsde.EDM() if proc == "EDM" else fastsde.VPSDE()
        gm = fastsde.problems.mixture_nd(sde, dim=dim)
        floor, _ = mixture_frechet_floor(gm, N_EVAL, draws=3)
        ref = fastsde.sample(gm, sde, (N_EVAL, dim), solver="ode", seed=EVAL_SEED, dtype=F64, rtol=1e-8, atol=1e-8)
        for solver in SOLVERS:
            for nfe in NFES:
                steps = steps_for(solver, nfe)
                t0 = time.perf_counter()
                grid = fastsde.fit_grid(
                    gm, sde, solver=solver, steps=steps, n=N_FIT, seed=FIT_SEED, shape=(dim,), sweeps=1, refine_iters=6
                )
                secs = time.perf_counter() - t0
                row = [f"{proc} {dim}-D", solver, str(nfe)]
                fds, mses = [], []
                for g in (None, grid):
                    kw = {} if g is None else {"grid": g}
                    r = fastsde.sample(
                        gm, sde, (N_EVAL, dim), solver=solver, steps=steps, seed=EVAL_SEED, dtype=F64, **kw
                    )
                    assert r.nfe == nfe
                    fds.append(f"{mixture_frechet(r.samples, gm).value / floor:.2f}")
                    mses.append(f"{mse(r.samples, ref.samples):.3g}")
                row += fds + mses + [f"{grid.record['fit_nfe_per_sample']:.0f}", f"{secs:.0f}"]
                print("| " + " | ".join(row) + " |", flush=True)
    print(f"\nfloor: FD of {N_EVAL} exact samples (mean of 3 draws). MSE: mean over samples and elements.")


if __name__ == "__main__":
    main()

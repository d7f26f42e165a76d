"""Fit the time grids shipped for the `digits` model (docs/benchmarks/few-step.md, "Fitted grids on the digits
model"): for each deterministic few-NFE solver
and each budget of 4-10 NFE, `fastsde.fit_grid` on seed 100 (n = 128 prior draws, an M = 60 `lms`
teacher, one refinement sweep of 6 golden-section steps per node), written to
src/fastsde/_assets/fitted_grids/digits-<solver>-<steps>.safetensors (`fastsde.shipped_grid`). Seed 100 is
held out from the bench's seeds 0 and 1, on which the grids are judged (`fastsde bench --problem
digits --samplers unipc_fitted,...`).

    .venv/bin/python benchmarks/fit_digits_grids.py            # resumable: existing files are kept
    .venv/bin/python benchmarks/fit_digits_grids.py --force    # refit everything

Prints a markdown table: the training loss (mean squared distance to the teacher's end point, data
scale) of the solver's default grid and of the fitted grid, the fit's evaluations per fitting sample
and its seconds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import fastsde
from fastsde.artifacts.grid import grid_file_name
from fastsde.bench.runner import steps_for_budget

MODEL, FIT_SEED, N_FIT = "digits", 100, 128
SOLVERS = ("unipc", "ipndm", "deis", "dpmpp_2m", "dpmpp_3m")
BUDGETS = (4, 5, 6, 8, 10)
OUT = Path(__file__).resolve().parents[1] / "src" / "fastsde" / "_assets" / "fitted_grids"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="refit grids that exist already")
    ap.add_argument("--solvers", default=",".join(SOLVERS))
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = fastsde.load_model(MODEL)
    OUT.mkdir(parents=True, exist_ok=True)
    print("| solver | NFE | steps | default-grid loss | fitted-grid loss | refined from | fit NFE / sample | fit s |")
    print("|---|---|---|---|---|---|---|---|")
    for solver in args.solvers.split(","):
        for nfe in (int(b) for b in args.budgets.split(",")):
            steps = steps_for_budget(solver, model.sde, nfe)
            if steps is None:
                continue
            path = OUT / grid_file_name(MODEL, solver, steps)
            if path.is_file() and not args.force:
                grid = fastsde.load_grid(path)
            else:
                grid = fastsde.fit_grid(
                    model.score,
                    model.sde,
                    solver=solver,
                    steps=steps,
                    n=N_FIT,
                    seed=FIT_SEED,
                    shape=tuple(model.shape),
                    dtype=torch.float32,
                    sweeps=1,
                    refine_iters=6,
                )
                grid.save(path)
            r = grid.record
            print(
                f"| {solver} | {nfe} | {steps} | {r['loss_default']:.4g} | {r['loss_refined']:.4g} | "
                f"{r['refined_from']} | {r['fit_nfe_per_sample']:.0f} | {r['seconds']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

"""`fastsde fit-grid`: fit time grids (fastsde.fit_grid) for a shipped model, a model folder or the
exact 2-D mixture, at one or more step counts, one file per step count.

    fastsde fit-grid --model digits --solver dpmpp_2m --steps 4,5,6,8,10

writes ``grids/digits-dpmpp_2m-4.safetensors`` … and prints each grid with its fitting cost and
losses; pass one to ``fastsde sample --solver dpmpp_2m --grid grids/digits-dpmpp_2m-4.safetensors``.
"""

from __future__ import annotations

import argparse

from . import CLIError
from .fit_iia import check_fit_sizes, model_tag, parse_steps

#: limits of --fine (teacher intervals) and --sweeps (each sweep re-solves every point)
MAX_FINE = 10_000
MAX_SWEEPS = 100


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "fit-grid",
        help="fit the time grid of a fixed-grid solver for a model (GITS dynamic programme + refinement)",
        description="Fit the N times that minimise a solver's error against a fine teacher solve from the same "
        "noise; one grid file per step count.",
    )
    p.add_argument(
        "--model",
        default="digits",
        help="a shipped model (fastsde.list_models()), a model folder (fastsde train --out DIR) or 'mixture'",
    )
    p.add_argument("--solver", default="dpmpp_2m", help="a fixed-grid solver (default dpmpp_2m)")
    p.add_argument("--steps", default="4,5,6,8,10", help="comma-separated grid point counts (default 4,5,6,8,10)")
    p.add_argument("--n", type=int, default=256, help="prior draws to fit on (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fitting draws (default 0)")
    p.add_argument("--fine", type=int, default=60, help="intervals of the teacher's fine grid, M (default 60)")
    p.add_argument("--sweeps", type=int, default=2, help="refinement sweeps (0: the DP grid only; default 2)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", default="grids", help="output folder (default grids/)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    import fastsde
    from fastsde.artifacts.grid import grid_file_name

    from .checks import check_device, check_int, check_out_dir, fit_model

    steps = parse_steps(args.steps)
    check_int("--fine", args.fine, 1, MAX_FINE)
    check_int("--sweeps", args.sweeps, 0, MAX_SWEEPS)
    check_fit_sizes(args, args.fine)
    device = check_device(args.device)
    try:
        spec = fastsde.get_solver(args.solver)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if max(steps) - 1 > args.fine:
        raise CLIError(
            f"--steps {max(steps)} needs a fine grid of at least {max(steps) - 1} intervals, got --fine {args.fine}"
        )
    out = check_out_dir(args.out)
    sde, score, shape, dtype = fit_model(args.model, device)
    from .checks import check_memory

    check_memory("--n", args.n * (args.fine + 1), shape, 8, " (the teacher's trajectories at every fine time)")
    for n_steps in steps:
        try:
            grid = fastsde.fit_grid(
                score,
                sde,
                solver=spec.name,
                steps=n_steps,
                n=args.n,
                seed=args.seed,
                M=args.fine,
                refine=args.sweeps > 0,
                sweeps=max(args.sweeps, 1),
                shape=shape,
                dtype=dtype,
                device=device,
            )
        except ValueError as exc:
            raise CLIError(str(exc)) from None
        out.mkdir(parents=True, exist_ok=True)  # only now: a refused or failed fit leaves no folder
        path = grid.save(out / grid_file_name(model_tag(args.model), spec.name, n_steps))
        rec = grid.record
        times = ", ".join(f"{v:.4g}" for v in grid.times.tolist())
        losses = (
            ""
            if rec["loss_default"] is None
            else (f"  loss default {rec['loss_default']:.4g} -> fitted {rec['loss_refined']:.4g}")
        )
        print(
            f"{path}  steps {n_steps}  [{times}]  fit NFE {rec['fit_nfe_per_sample']:.0f} per sample x {rec['n']} "
            f"({rec['seconds']:.1f} s){losses}"
        )
    return 0

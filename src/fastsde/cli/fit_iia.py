"""`fastsde fit-iia`: fit IIA coefficient tables for a shipped model (or the exact 2-D mixture) at
one or more step counts and write one table file per step count.

    fastsde fit-iia --model digits --solver dpmpp_2m --steps 4,5,6,8,10

writes ``iia_tables/digits-dpmpp_2m-4.safetensors`` … and prints each table's fitting cost; pass one
to ``fastsde sample --solver iia_dpmpp_2m --steps 4 --table iia_tables/digits-dpmpp_2m-4.safetensors``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import CLIError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "fit-iia",
        help="fit IIA coefficient tables (iia_heun / iia_ddim / iia_dpmpp_2m) for a shipped model",
        description="Fit per-step IIA coefficients against the base solver on fine sub-steps; one table per step count.",
    )
    p.add_argument(
        "--model",
        default="digits",
        help="a shipped model (fastsde.list_models()), a model folder (fastsde train --out DIR) or 'mixture'",
    )
    p.add_argument("--solver", default="dpmpp_2m", help="base solver: dpmpp_2m, heun or ddim (default dpmpp_2m)")
    p.add_argument("--steps", default="4,5,6,8,10", help="comma-separated grid point counts (default 4,5,6,8,10)")
    p.add_argument("--n", type=int, default=256, help="prior draws to fit on (default 256)")
    p.add_argument("--fine-steps", type=int, default=10, help="base-solver sub-steps per step (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fitting draws (default 0)")
    p.add_argument("--variant", default=None, help="iia_heun only: iia (default) or biia")
    p.add_argument("--out", default="iia_tables", help="output folder (default iia_tables/)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


#: the most step counts one --steps may list (one file each)
MAX_STEP_COUNTS = 100


#: the most base-solver sub-steps per step --fine-steps may ask for
MAX_FINE_STEPS = 10_000


def parse_steps(text: str) -> list[int]:
    """--steps: comma-separated grid point counts, each in [2, checks.MAX_STEPS]."""
    from .checks import MAX_STEPS

    try:
        steps = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"--steps must be comma-separated integers, got {text!r}") from None
    if not steps or any(not 2 <= s <= MAX_STEPS for s in steps):
        raise CLIError(f"--steps must be integers in [2, {MAX_STEPS}], got {text!r}")
    if len(steps) > MAX_STEP_COUNTS:
        raise CLIError(f"--steps lists {len(steps)} step counts; at most {MAX_STEP_COUNTS}")
    return steps


def check_fit_sizes(args: argparse.Namespace, per_sample: int) -> None:
    """--n and --seed of a fitting command within their limits; ``per_sample``: the fine solve's steps
    per draw, which bound the memory of the fit (its trajectories are held)."""
    from ..noise import check_seed
    from .checks import MAX_N, MAX_STEPS, check_int

    check_int("--n", args.n, 1, MAX_N)
    check_seed(args.seed, "--seed")
    if per_sample > MAX_STEPS:
        raise CLIError(f"the fit's fine solve would take {per_sample} steps per draw; at most {MAX_STEPS}")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    import fastsde
    from fastsde.artifacts.iia_table import iia_base, iia_solver_name, table_name

    from .checks import check_int, check_out_dir, fit_model

    steps = parse_steps(args.steps)
    check_int("--fine-steps", args.fine_steps, 1, MAX_FINE_STEPS)
    check_fit_sizes(args, max(steps) * args.fine_steps)
    try:
        iia = iia_solver_name(args.solver)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if args.variant is not None and args.variant not in ("iia", "biia"):
        raise CLIError(f"--variant must be iia or biia, got {args.variant!r}")
    out = check_out_dir(args.out)
    base = iia_base(iia)
    options = {}
    if args.variant is not None:
        if iia != "iia_heun":
            raise CLIError("--variant applies to --solver heun only")
        options["variant"] = args.variant
    sde, score, shape, _ = fit_model(args.model)
    from .checks import check_memory

    check_memory("--n", args.n * (max(steps) + 1), shape, 8, " (the fit's trajectories at every step)")
    bar = tqdm(steps, desc=f"fit-iia {args.model} {base}", disable=args.quiet)
    for n_steps in bar:
        table = fastsde.fit_iia(
            score,
            sde,
            solver=base,
            steps=n_steps,
            n=args.n,
            seed=args.seed,
            fine_steps=args.fine_steps,
            progress=not args.quiet,
            **options,
        )
        out.mkdir(parents=True, exist_ok=True)  # only now: a refused or failed fit leaves no folder
        path = table.save(out / table_name(model_tag(args.model), iia, n_steps, args.variant))
        fit = table.fit
        gain = sum(fit["mse_base"]) / max(sum(fit["mse_iia"]), 1e-300)
        tqdm.write(
            f"{path}  steps {n_steps}  fit NFE {fit['nfe_per_sample']:.0f} per sample x {fit['n']} "
            f"({fit['calls']} calls, {fit['seconds']:.1f} s)  training step MSE base/IIA {gain:.2f}x"
        )
    return 0


def model_tag(model: str) -> str:
    """The model's part of a table's file name: its name, or a model folder's last component."""
    return Path(model).name if Path(model).is_dir() else model


def table_for_sample(model: str, solver: str, options: dict, path: str | None):
    """The table `fastsde sample` uses for an iia_ solver: --table PATH, else the one shipped for the
    model, solver and steps; without one, a CLIError that names the command that makes it."""
    import fastsde
    from fastsde.artifacts.iia_table import iia_base, shipped_table, table_name

    if path is not None:
        return fastsde.load_iia(path)
    steps = options.get("steps", fastsde.SOLVERS[solver].options["steps"].default)
    variant = options.get("variant")
    shipped = model != "mixture" and model in fastsde.list_models()  # a folder has no shipped table
    table = shipped_table(model, solver, steps, variant) if shipped else None
    if table is None:
        base = iia_base(solver)
        extra = f" --variant {variant}" if variant and variant != "iia" else ""
        name = table_name(model_tag(model), solver, steps, variant)
        raise CLIError(
            f"no IIA table for model {model}, solver {solver}, steps {steps}; make one with "
            f"`fastsde fit-iia --model {model} --solver {base} --steps {steps}{extra}` "
            f"and pass --table iia_tables/{name}"
        )
    return table

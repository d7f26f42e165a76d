"""`fastsde tune`: the best fixed-grid sampler for a model at each NFE budget, found and fitted.

    fastsde tune --model digits --budgets 4,6,8,10 --out recipe/

writes the recipe folder (recipe.safetensors, the fitted grid / IIA table files it chose,
candidates.md, errors.png); then ``fastsde sample --model digits --recipe recipe/ --steps 6``.
"""

from __future__ import annotations

import argparse
import math

from . import CLIError
from .fit_iia import model_tag, parse_steps


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "tune",
        help="find and fit the best fixed-grid sampler for a model at each NFE budget (writes a recipe)",
        description="Score every candidate fixed-grid solver (default grid, fitted grid, IIA table) against a fine "
        "reference on held-out seeds and keep the best per budget.",
    )
    p.add_argument("--model", default="digits", help="a shipped model, a model folder (fastsde train) or 'mixture'")
    p.add_argument("--budgets", default="4,6,8,10", help="comma-separated NFE budgets (default 4,6,8,10)")
    p.add_argument("--stochastic", action="store_true", help="tune the stochastic solvers (chosen by FD)")
    p.add_argument("--solvers", default=None, help="comma-separated candidate solvers (default: the standard set)")
    p.add_argument("--n-eval", type=int, default=256, help="held-out samples per candidate (default 256)")
    p.add_argument("--n-fit", type=int, default=64, help="samples the grids and tables are fitted on (default 64)")
    p.add_argument(
        "--measure",
        choices=("mse", "fd"),
        default=None,
        help="what chooses: MSE to the reference (default for deterministic solvers) or FD between the sample sets",
    )
    p.add_argument(
        "--fit-top", type=int, default=2, help="fitted grids for the best K default-grid solvers per budget (default 2)"
    )
    p.add_argument("--max-minutes", type=float, default=10.0, help="no candidate starts after this (default 10)")
    p.add_argument("--cache", default=None, help="folder of finished candidates (default OUT/.cache): reruns resume")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", required=True, help="the recipe folder to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    import fastsde
    from fastsde.fitting.tune import DETERMINISTIC, STOCHASTIC, write_report

    from .checks import check_device, check_int, check_out_dir, fit_model

    budgets = parse_steps(args.budgets)
    check_int("--n-eval", args.n_eval, 2, 1 << 20)
    check_int("--n-fit", args.n_fit, 2, 1 << 20)
    check_int("--fit-top", args.fit_top, 0, 100)
    if not (math.isfinite(args.max_minutes) and args.max_minutes > 0):
        raise CLIError(f"--max-minutes must be a positive number, got {args.max_minutes}")
    device = check_device(args.device)
    out = check_out_dir(args.out)
    solvers = None if args.solvers is None else tuple(s.strip() for s in args.solvers.split(",") if s.strip())
    sde, score, shape, dtype = fit_model(args.model, device)
    cache = args.cache or str(out / ".cache")
    n_candidates = len(solvers or (STOCHASTIC if args.stochastic else DETERMINISTIC))
    evals = sum(budgets) * n_candidates * args.n_eval
    print(
        f"tuning {model_tag(args.model)}: {len(budgets)} budgets × {n_candidates} solvers (+ fitted grids and IIA "
        f"tables), ~{evals:,} sample-evaluations for the candidates; at most {args.max_minutes:g} min; cache {cache}"
    )
    try:
        recipe = fastsde.tune(
            score, sde, shape, budgets, stochastic=args.stochastic, solvers=solvers, n_eval=args.n_eval,
            n_fit=args.n_fit, fit_top=args.fit_top, measure=args.measure, max_minutes=args.max_minutes, cache=cache, dtype=dtype, device=device,
        )  # fmt: skip
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    recipe.record["model_name"] = model_tag(args.model)
    recipe.save(out)
    write_report(recipe, out)
    for budget in recipe.budgets:
        c = recipe.choices[budget]
        extra = " + fitted grid" if c.grid_file else (" + IIA table" if c.table_file else "")
        print(f"NFE {budget}: {c.solver}{extra}  MSE {c.errors['mse']:.4g}  FD {c.errors['fd']:.4g}")
    skipped = recipe.record.get("skipped") or []
    if skipped:
        print(f"time box reached: {len(skipped)} candidates not run (rerun with a larger --max-minutes to resume)")
    print(
        f"{out}  (this run {recipe.record['seconds']:.0f} s; fitting, cached fits included: {recipe.record['fitting_seconds']:.0f} s)"
    )
    return 0

"""`fastsde fit-mlem`: learn the ML-EM probabilities p_k(t) for a hierarchy of shipped models (or
model folders) and one run (steps, base), and write the schedule file.

    fastsde fit-mlem --levels digits-small,digits,digits-large --steps 1000 --out mlem-digits.safetensors
    fastsde sample --solver mlem --levels digits-small,digits,digits-large --steps 1000 --p mlem-digits.safetensors

The objective and its gradient are described in ``fastsde.fitting.mlem``, the file's key in
``fastsde.artifacts.mlem``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from . import CLIError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "fit-mlem",
        help="learn the ML-EM probabilities p_k(t) for --solver mlem --levels ...",
        description="Fit p_k(t) = sigmoid(polynomial in log-SNR) by stochastic gradient on MSE to the "
        "coupled finest-level reference + lam x relative compute; write a keyed schedule file.",
    )
    p.add_argument("--levels", required=True, help="models coarse to fine, comma-separated (names or folders)")
    p.add_argument("--steps", type=int, default=1000, help="grid points of the runs it is for (default 1000)")
    p.add_argument("--base", default="em", choices=("em", "ddim"), help="the base step (default em)")
    p.add_argument("--n", type=int, default=64, help="fitting samples (default 64)")
    p.add_argument("--iters", type=int, default=30, help="gradient iterations (default 30)")
    p.add_argument(
        "--lr", type=float, default=0.2, help="Adam step on the logit coefficients (default 0.2, as fastsde.fit_mlem)"
    )
    p.add_argument("--budget", type=float, default=1e-3, help="the theory rule's variance budget it starts from")
    p.add_argument("--lam", type=float, default=None, help="weight of relative compute (default: the rule's price)")
    p.add_argument("--degree", type=int, default=2, help="degree of the logit polynomial in log-SNR (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fitting draws (default 0)")
    p.add_argument("--out", required=True, help="the schedule file to write (.safetensors)")
    p.add_argument("--quiet", action="store_true", help="no per-iteration lines")
    p.set_defaults(func=run)


#: limits of --iters (gradient iterations) and --degree (of the logit polynomial in log-SNR)
MAX_ITERS = 100_000
MAX_DEGREE = 20


def run(args: argparse.Namespace) -> int:
    from .sample_levels import load_levels, parse_levels

    names = parse_levels(args.levels)
    if len(names) < 2:
        raise CLIError(f"--levels needs at least 2 models, got {args.levels!r}")
    from ..noise import check_seed
    from .checks import MAX_N, MAX_STEPS, check_int, check_memory, reading

    for flag, v, low, high in (
        ("--steps", args.steps, 2, MAX_STEPS),
        ("--n", args.n, 2, MAX_N),
        ("--iters", args.iters, 1, MAX_ITERS),
        ("--degree", args.degree, 0, MAX_DEGREE),
    ):
        check_int(flag, v, low, high)
    check_seed(args.seed, "--seed")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise CLIError(f"--lr must be a positive number, got {args.lr}")
    if not (math.isfinite(args.budget) and args.budget > 0):
        raise CLIError(f"--budget must be a positive number, got {args.budget}")
    if args.lam is not None and not (math.isfinite(args.lam) and args.lam >= 0):
        raise CLIError(f"--lam must be a non-negative number, got {args.lam}")
    out = Path(args.out)
    if out.is_dir():
        raise CLIError(f"--out {args.out!r} is a folder; give a file name such as mlem.safetensors")
    from ..files import check_writable

    try:
        check_writable(out)
    except OSError as exc:
        raise CLIError(f"cannot write {args.out!r}: {exc}") from None
    import fastsde

    with reading("--levels", args.levels, "a list of loadable models"):
        levels = load_levels(names, "cpu")
    first = levels.models[0]
    check_memory("--n", args.n * len(names), tuple(first.shape), 8, " (the coupled samples of every level)")
    try:
        sched = fastsde.fit_mlem(
            levels,
            first.sde,
            first.shape,
            steps=args.steps,
            base=args.base,
            n=args.n,
            seed=args.seed,
            iters=args.iters,
            lr=args.lr,
            lam=args.lam,
            budget=args.budget,
            degree=args.degree,
            progress=not args.quiet,
        )
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    sched.save(out)
    fit = sched.fit
    print(
        f"wrote {out}: {len(names)} levels, steps {args.steps}, base {args.base}; objective "
        f"{fit['objective_start']:.4g} (theory rule) -> {fit['objective_best']:.4g} (learned) on the fit's "
        f"evaluation draws; lam {fit['lambda']:.4g}; fit compute {fit['fit_compute']:.4g} "
        f"(level-1 evaluations), {fit['seconds']:.1f} s"
    )
    return 0

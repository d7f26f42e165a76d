"""``fastsde bench``: every fastsde sampler and every installed peer on the same score and the same
starting noise; writes JSON, CSV, a markdown table and PNG plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..sde import PROCESSES
from . import CLIError


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _float_list(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals:  # an empty list would silently mean the defaults
        raise argparse.ArgumentTypeError(f"expected at least one number, got {text!r}")
    return vals


def _str_list(text: str) -> list[str]:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    if not vals:  # an empty list would silently run nothing (or everything)
        raise argparse.ArgumentTypeError(f"expected at least one name, got {text!r}")
    return vals


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="compare fastsde's samplers with the peers (quality vs NFE and wall time)",
        description=(
            "Run every fastsde sampler and every installed peer (k-diffusion, diffusers, torchsde, scipy, "
            "torchdiffeq) on the same score and the same starting noise. Fixed-step samplers get each NFE "
            "budget; adaptive ones a sweep of tolerances. Writes results.json, results.csv, table.md and PNG plots."
        ),
    )
    p.add_argument(
        "--problem",
        choices=["mixture", "digits", "fashion"],
        default="mixture",
        help="the exact mixtures, or a shipped image model (digits, fashion) judged by its classifier FD",
    )
    p.add_argument("--budgets", type=_int_list, default=[5, 10, 20, 50, 100, 200], help="NFE budgets, e.g. 5,10,20")
    p.add_argument(
        "--samplers", type=_str_list, default=None, help="names (fastsde solvers, peers, or 'fastsde'/'peers')"
    )
    p.add_argument(
        "--processes", type=_str_list, default=["vp", "subvp", "ve"], help=f"mixture only: any of {','.join(PROCESSES)}"
    )
    p.add_argument("--n", type=int, default=2000, help="number of samples")
    p.add_argument("--dim", type=int, default=16, help="mixture dimension (2: the 2-D three-mode mixture)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerances", type=_float_list, default=None, help="tolerance sweep for adaptive samplers")
    p.add_argument("--no-peers", action="store_true", help="run fastsde's samplers only")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="output folder")
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        metavar="DIR",
        help="instead of running: pool the results.json of earlier runs (same problem, n, dim, seed; "
        "e.g. deterministic and stochastic samplers run apart) into one table and one set of plots in --out",
    )
    p.set_defaults(func=run)


#: the largest mixture dimension --dim may ask for (the exact score holds dim x dim covariances)
MAX_DIM = 4096


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bench.runner import merge_results
    from .checks import check_out_dir, reading

    torch.set_num_threads(1)
    check_out_dir(args.out)
    if args.merge:
        from ..bench.runner import read_results

        pieces = []
        for folder in args.merge:
            path = folder / "results.json"
            if not path.is_file():
                raise CLIError(f"--merge expects folders written by fastsde bench; {str(path)!r} does not exist")
            with reading("--merge", path, "the results.json of a fastsde bench run"):
                piece = read_results(path)  # every field merging, tables and plots read, checked
            pieces.append(piece)
        with reading("--merge", " ".join(str(f) for f in args.merge), "bench results that can be merged"):
            result = merge_results(pieces)
            paths = _write_all(result, args.out)
    else:
        result = _run_bench(args)
        paths = _write_all(result, args.out)
    print((args.out / "table.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _write_all(result: dict, out: Path) -> list[Path]:
    """Write every output (``write_outputs``) into a staging folder first and move them into ``out``
    only when all are written: a result that cannot be rendered (a malformed --merge piece) leaves
    neither a half-written set nor a temporary folder behind."""
    import shutil
    import tempfile

    from ..bench.runner import write_outputs

    base = out.absolute().parent
    while not base.exists():
        base = base.parent
    staging = Path(tempfile.mkdtemp(dir=base, prefix=".fastsde-bench-", suffix=".tmp"))
    try:
        written = write_outputs(result, staging)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for path in written:
            target = out / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), str(target))
            paths.append(target)
        return paths
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _run_bench(args: argparse.Namespace) -> dict:
    """Run the bench as configured on the command line (validated before any compute)."""
    from ..bench.runner import DEFAULT_TOLS, BenchConfig, run_bench

    cfg = BenchConfig(
        problem=args.problem,
        budgets=args.budgets,
        processes=args.processes,
        samplers=args.samplers,
        n=args.n,
        dim=args.dim,
        seed=args.seed,
        tolerances=list(args.tolerances or DEFAULT_TOLS),
        peers=not args.no_peers,
        progress=not args.no_progress,
    )
    cfg.check()
    from ..noise import check_seed
    from .checks import MAX_N, MAX_STEPS, check_int, check_memory

    check_seed(args.seed, "--seed")
    check_int("--n", args.n, 2, MAX_N)
    check_int("--dim", args.dim, 1, MAX_DIM)
    if max(args.budgets) > MAX_STEPS:
        raise CLIError(f"--budgets must be at most {MAX_STEPS} NFE each, got {max(args.budgets)}")
    if args.problem == "mixture":
        check_memory("--n", args.n, (args.dim,), 8, " (the samples of one sampler run)")
    return run_bench(cfg)

"""``fastsde likelihood``: bits/dim of a data set under a model, through the probability-flow ODE.

The command reads the data and the model and prints; the work (data preparation, dequantisation,
the batched loop) is ``fastsde.likelihood.dataset.dataset_likelihood``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from ..sde import PROCESSES
from . import CLIError
from .checks import MAX_SHARDS, check_memory, reading
from .common import DEFAULT_SHARD_SIZE, likelihood_options

#: Exact models for trying the command without a trained network: the 2-D mixture under a process.
MIXTURES = tuple(f"mixture2d-{name}" for name in PROCESSES)
_NPZ_KEYS = ("x", "data", "test", "heldout", "images", "samples", "arr_0")  # samples: `fastsde sample`'s .npz


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "likelihood",
        help="bits/dim of data under a model (PF-ODE, adaptive RK45)",
        description=(
            "Log-likelihood and bits/dim of the rows of an .npy/.npz array under a model, by integrating "
            "the probability-flow ODE with its divergence (exact or Hutchinson trace). Quantised data (integer "
            "levels, or floats on a level grid such as the digits') is dequantised with keyed uniform noise; "
            "continuous float data must lie in the model's range [-1, 1]. Without --data: the model's "
            "held-out split (the digits)."
        ),
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help=".npy/.npz array (n, *model shape) or (n, D); default: held-out digits",
    )
    p.add_argument("--key", default=None, help="array name inside an .npz (default: its only array, or x/data/test)")
    p.add_argument(
        "--model", default="digits", help=f"shipped model name (fastsde.list_models()) or one of {', '.join(MIXTURES)}"
    )
    p.add_argument("--trace", choices=["exact", "hutchinson"], default=None, help="default: exact if D <= 16")
    p.add_argument("--probes", type=int, default=1, help="Hutchinson probes per sample")
    p.add_argument("--probe", choices=["rademacher", "gaussian"], default="rademacher")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--method", choices=["rk45", "scipy"], default="rk45", help="scipy: solve_ivp on each batch")
    p.add_argument("--n", type=int, default=None, help="use the first N rows")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="keys the dequantisation noise and the probes")
    p.add_argument(
        "--passes", type=int, default=1, help="passes over the data, each with fresh dequantisation noise and probes"
    )
    p.add_argument(
        "--levels",
        type=int,
        default=None,
        help="quantisation levels (default: integer data 17 if max <= 16, else 256; float data: found from its grid)",
    )
    p.add_argument("--offset", type=float, default=None, help="bits/dim offset (default log2(levels) - 1, 7 for 8-bit)")
    p.add_argument("--dtype", choices=["float32", "float64"], default=None, help="default float64 for mixtures")
    p.add_argument("--max-steps", type=int, default=10_000, help="RK45 step attempts allowed per sample")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--out",
        default=None,
        help="a run folder: resumable shards of per-sample log p and a manifest (also under torchrun; "
        "rerun the same command to resume)",
    )
    p.add_argument("--shard-size", type=int, default=None, help="rows per shard file with --out (default 1000)")
    p.set_defaults(func=run)


def _positive(name: str, v: Any, kind=int) -> None:
    if v is not None and (not isinstance(v, kind) or not math.isfinite(v) or v <= 0):
        raise CLIError(f"--{name.replace('_', '-')} must be a positive number, got {v!r}")


#: limits of the sizing options (each error message states its limit)
MAX_PROBES = 10_000
MAX_PASSES = 10_000
MAX_LEVELS = 2**16
MAX_STEP_ATTEMPTS = 10**7


def _check_limits(args: argparse.Namespace) -> None:
    """Sizes within their limits, --seed, --shard-size and --out (a writable run folder), before the
    model or the data are read."""
    from ..noise import check_seed
    from .checks import MAX_N, MAX_SHARDS, check_int, check_out_dir

    if args.n is not None:
        check_int("--n", args.n, 1, MAX_N)
    check_int("--probes", args.probes, 1, MAX_PROBES)
    check_int("--passes", args.passes, 1, MAX_PASSES)
    check_int("--max-steps", args.max_steps, 1, MAX_STEP_ATTEMPTS)
    if args.levels is not None:
        check_int("--levels", args.levels, 2, MAX_LEVELS, " (quantisation levels: 256 for 8-bit data)")
    check_seed(args.seed, "--seed")
    if args.shard_size is not None and (args.out is None or args.shard_size < 1):
        raise CLIError(f"--shard-size must be a positive integer with --out DIR, got {args.shard_size}")
    if args.out is not None:
        check_out_dir(args.out)
        if args.n is not None and -(-args.n // (args.shard_size or DEFAULT_SHARD_SIZE)) > MAX_SHARDS:
            raise CLIError(f"--n {args.n} makes more than {MAX_SHARDS} shards; raise --shard-size")


def _load_model(name: str):
    """(score, sde, sample shape) for a model name."""
    import fastsde

    from ..likelihood.dataset import differentiable_score
    from ..sde import process_by_name

    if name in MIXTURES:
        sde = process_by_name(name.split("-", 1)[1])
        return fastsde.problems.mixture_2d(sde), sde, (2,)
    if name not in fastsde.list_models():
        raise CLIError(f"unknown model {name!r}; available: {', '.join(fastsde.list_models() + list(MIXTURES))}")
    model = fastsde.load_model(name)
    return differentiable_score(model), model.sde, tuple(model.shape)


def _read_data(path: Path, key: str | None):
    from ..data import read_array

    if path.exists() and path.suffix.lower() not in (".npy", ".npz"):
        raise CLIError(f"--data must be an .npy or .npz file, got {path.name!r}")
    return read_array(path, key, prefer=_NPZ_KEYS, key_hint="--key")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..data import load_digits
    from ..likelihood.dataset import dataset_likelihood
    from ..score import NonFiniteScoreError
    from ..solvers.ode import IntegrationError

    torch.set_num_threads(1)
    _positive("n", args.n)
    _positive("batch_size", args.batch_size)
    _positive("probes", args.probes)
    _positive("passes", args.passes)
    _positive("max_steps", args.max_steps)
    _positive("rtol", args.rtol, float)
    _positive("atol", args.atol, float)
    if args.levels is not None and args.levels < 2:
        raise CLIError(f"--levels must be >= 2, got {args.levels}")
    if args.offset is not None and not math.isfinite(args.offset):
        raise CLIError(f"--offset must be a finite number, got {args.offset}")
    _check_limits(args)

    score, sde, shape = _load_model(args.model)
    if args.data is None and args.model in MIXTURES:
        raise CLIError(
            f"--data is required for {args.model} (an .npy/.npz of (n, 2) points); only digits models have a held-out split"
        )
    if args.data is not None:
        with reading("--data", args.data, "an .npy/.npz array of data rows"):
            arr = _read_data(args.data, args.key)
        source = str(args.data)
    else:
        arr = load_digits("heldout").numpy()
        source = f"held-out split of {args.model}"
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(args.dtype or "")
    if dtype is None:
        dtype = torch.float64 if args.model in MIXTURES else torch.float32
    arr = np.asarray(arr)[: args.n]
    if arr.ndim < 1 or arr.shape[0] < 1:
        raise CLIError(f"--data: no rows to evaluate (array of shape {arr.shape})")
    if args.out is not None and -(-arr.shape[0] // (args.shard_size or DEFAULT_SHARD_SIZE)) > MAX_SHARDS:
        raise CLIError(f"--data: {arr.shape[0]} rows make more than {MAX_SHARDS} shards; raise --shard-size")
    rows = min(arr.shape[0], args.batch_size)
    check_memory("--batch-size", rows * args.probes, shape, 8, " (a batch of rows times --probes)")
    try:
        if args.out is not None:
            from .likelihood_dir import run_sharded

            res = run_sharded(args, score, sde, arr, shape, dtype)
            if res is None:  # a rank other than 0
                return 0
        else:
            res = dataset_likelihood(
                score, sde, arr, shape, progress=not args.no_progress, **likelihood_options(args, dtype)
            )
    except (IntegrationError, NonFiniteScoreError) as exc:
        hint = str(exc).replace(
            "Raise max_steps, loosen rtol/atol, or ask for partial results", "raise --max-steps, loosen --rtol / --atol"
        )
        raise CLIError(hint) from None
    n, nfe = res.logp.shape[0], res.nfe_per_sample
    print(f"data: {source}, {n} samples of shape {shape} ({res.note}); model: {args.model}, {sde!r}")
    print(f"trace: {res.trace}" + (f" ({args.probes} {args.probe} probe(s))" if res.trace == "hutchinson" else ""))
    print(f"method: {args.method}, rtol={args.rtol:g}, atol={args.atol:g}")
    print(f"bits/dim: {res.bits_per_dim:.4f} ± {res.standard_error:.4f} (offset {res.offset:.4g})")
    if args.passes > 1:
        print(f"bits/dim per pass: {', '.join(f'{b:.4f}' for b in res.pass_bpd)}")
    print(f"log-likelihood: {float(res.logp.mean()):.4f} nats per sample")
    print(
        f"NFE: {res.nfe:.1f} per sample{' and pass' if args.passes > 1 else ''} (min {float(nfe.min()):.0f}, max {float(nfe.max()):.0f}), {res.calls} calls"
    )
    print(f"time: {res.wall_time:.2f} s")
    return 0

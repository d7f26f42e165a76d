"""`fastsde sample`: draw samples from a shipped model (default: `digits` with the adaptive solver),
write a PNG grid (or an .npz) and print NFE, wall time and the quality metric.

``--model mixture`` samples the exact 2-D Gaussian mixture (fastsde.problems.mixture_2d under VP) and
writes a scatter over the true density contours.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import time
from pathlib import Path
from typing import Any

from . import CLIError

_DEFAULT_OUT = "samples.png"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sample",
        help="sample a shipped model (default: digits, adaptive solver, 64 samples -> samples.png)",
        description="Sample a shipped model and write a PNG grid or an .npz; prints NFE, wall time and quality.",
    )
    p.add_argument("--model", default="digits", help="a shipped model (fastsde.list_models()) or 'mixture'")
    p.add_argument("--solver", default=None, help="solver name (default: adaptive if registered, else em)")
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per batch (default: all at once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=_DEFAULT_OUT, help="output .png (grid / scatter) or .npz (default samples.png)")
    p.add_argument("--steps", type=int, default=None, help="grid points for fixed-step solvers")
    p.add_argument("--eps-rel", type=float, default=None, help="relative tolerance of the adaptive solver")
    p.add_argument("--eps-abs", type=float, default=None, help="absolute tolerance of the adaptive solver")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance of the ODE solver")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance of the ODE solver")
    p.add_argument("--snr", type=float, default=None, help="corrector signal-to-noise ratio (pc)")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other solver option, e.g. --option corrector_steps=2 (repeatable)",
    )
    p.add_argument("--table", default=None, help="IIA table for an iia_ solver (default: the shipped one)")
    p.add_argument("--no-metric", action="store_true", help="skip the quality metric")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.set_defaults(func=run)


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("inf", "+inf", "-inf", "nan"):
        return float(low)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def solver_options(args: argparse.Namespace) -> dict[str, Any]:
    """The solver options given on the command line (only those set)."""
    opts: dict[str, Any] = {}
    for flag in ("steps", "eps_rel", "eps_abs", "rtol", "atol", "snr"):
        value = getattr(args, flag)
        if value is not None:
            opts[flag] = value
    for item in args.option:
        if "=" not in item:
            raise CLIError(f"--option must be KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        opts[key.strip().replace("-", "_")] = _parse_value(value)
    return opts


def default_solver() -> str:
    import fastsde

    return "adaptive" if "adaptive" in fastsde.SOLVERS else "em"


def check_output(path: str) -> Path:
    """The output must be a .png or .npz in an existing, writable folder (checked before compute)."""
    out = Path(path)
    if out.suffix.lower() not in (".png", ".npz"):
        raise CLIError(f"--out must end in .png or .npz, got {path!r}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(f"cannot write {path!r}: folder {str(parent)!r} does not exist")
    if out.is_dir():
        raise CLIError(f"cannot write {path!r}: it is a folder")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise CLIError(f"cannot write {path!r}: permission denied")
    return out


def run(args: argparse.Namespace) -> int:
    import fastsde

    if args.n < 1:
        raise CLIError(f"--n must be a positive integer, got {args.n}")
    if args.batch_size is not None and args.batch_size < 1:
        raise CLIError(f"--batch-size must be a positive integer, got {args.batch_size}")
    solver = args.solver or default_solver()
    if solver not in fastsde.SOLVERS:
        raise CLIError(f"unknown solver {solver!r}; valid solvers: {', '.join(sorted(fastsde.SOLVERS))}")
    spec = fastsde.SOLVERS[solver]
    opts = solver_options(args)
    out = check_output(args.out)
    mixture = args.model == "mixture"
    if not mixture and args.model not in fastsde.list_models():
        raise CLIError(f"unknown model {args.model!r}; available: {', '.join(fastsde.list_models() + ['mixture'])}")

    import torch

    if mixture:
        sde = fastsde.VPSDE()
        gm = fastsde.problems.mixture_2d(sde)
        score, shape, dtype = gm.score, tuple(gm.shape), torch.float64
    else:
        model = fastsde.load_model(args.model)
        sde, score, shape, dtype = model.sde, model.score, tuple(model.shape), torch.float32
    if solver.startswith("iia_"):
        from .fit_iia import table_for_sample

        opts["table"] = table_for_sample(args.model, solver, opts, args.table)
    elif args.table is not None:
        raise CLIError("--table applies to the iia_ solvers only")
    # validate options (names and values) before any compute
    spec.resolve(sde, dict(opts), sde.default_t_end)

    n = args.n
    batch = args.batch_size or n
    noise = fastsde.NoiseSource.from_seed(args.seed, n)
    chunks, nfe_rows = [], []
    calls = 0
    start = time.perf_counter()
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        res = fastsde.sample(
            score,
            sde,
            (hi - lo, *shape),
            solver=solver,
            seed=noise.subset(list(range(lo, hi))),
            dtype=dtype,
            progress=args.progress,
            **opts,
        )
        chunks.append(res.samples)
        nfe_rows.append(res.nfe_per_sample)
        calls += res.calls
    wall = time.perf_counter() - start
    samples = torch.cat(chunks)
    nfe_per_sample = torch.cat(nfe_rows)
    nfe = float(nfe_per_sample.mean())

    quality: dict[str, float] = {}
    if not args.no_metric:
        if mixture:
            from ..metrics.mixture import mixture_frechet

            quality = {"fd": float(mixture_frechet(samples, gm).value)}
        elif tuple(shape) == (1, 8, 8):
            from ..metrics.digits import digits_quality

            if n >= 2:
                quality = digits_quality(samples)

    if out.suffix.lower() == ".npz":
        import numpy as np

        np.savez_compressed(
            out,
            samples=samples.double().cpu().numpy(),
            nfe_per_sample=nfe_per_sample.numpy(),
            seed=np.array(args.seed),
        )
    elif mixture:
        from ..plots import save_mixture_scatter

        save_mixture_scatter(samples, gm, out, title=f"{solver}: {n} samples, NFE {nfe:.1f}")
    else:
        from ..plots import save_image_grid

        save_image_grid(samples, out, ncol=min(8, n) if n <= 64 else None)

    print(f"model {args.model}  solver {solver}  options {opts or '{}'}  n {n}")
    print(f"NFE {nfe:.1f} per sample  ({calls} batched calls)  wall {wall:.2f} s")
    if quality:
        if "floor" in quality:
            fd, floor = quality["fd"], quality["floor"]
            ratio = fd / floor if math.isfinite(fd) and floor > 0 else math.inf
            print(
                f"quality: FD {fd:.3f} (real-data floor at n={n}: {floor:.3f} ± {quality['floor_sd']:.3f}, "
                f"ratio {ratio:.2f})  confidence {quality['confidence']:.3f}"
            )
        else:
            print(f"quality: mixture FD {quality['fd']:.4f}")
    print(f"wrote {out}")
    return 0

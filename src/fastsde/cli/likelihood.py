"""``fastsde likelihood``: bits/dim of a data set under a model, through the probability-flow ODE.

Integer data (quantised levels, 0..255 by default) is dequantised with keyed uniform noise and
mapped to the model's range [-1, 1]; float data is taken as already in that range. The bits/dim
offset is log2(levels) − 1 (7 for 8-bit data), as Score SDE reports it.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from . import CLIError

#: Exact models for trying the command without a trained network: the 2-D mixture under a process.
MIXTURES = ("mixture2d-vp", "mixture2d-subvp", "mixture2d-ve", "mixture2d-edm")
_NPZ_KEYS = ("x", "data", "test", "heldout", "images", "arr_0")


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
    p.set_defaults(func=run)


def _positive(name: str, v: Any, kind=int) -> None:
    if v is not None and (not isinstance(v, kind) or not math.isfinite(v) or v <= 0):
        raise CLIError(f"--{name.replace('_', '-')} must be a positive number, got {v!r}")


def _load_model(name: str):
    """(score, sde, shape, heldout-or-None) for a model name."""
    import fastsde

    if name in MIXTURES:
        proc = name.split("-", 1)[1]
        sde = {
            "vp": fastsde.VPSDE,
            "subvp": fastsde.SubVPSDE,
            "ve": fastsde.VESDE,
            "edm": fastsde.EDM,
        }[proc]()
        gm = fastsde.problems.mixture_2d(sde)
        return gm, sde, (2,), None
    load = getattr(fastsde, "load_model", None)
    if load is None:
        try:
            from fastsde.models import load_model as load  # type: ignore[no-redef]
        except ImportError:
            raise CLIError(
                f"no shipped models in this install, so --model {name!r} is unavailable; "
                f"use one of {', '.join(MIXTURES)}"
            ) from None
    try:
        model = load(name)
    except (KeyError, LookupError) as exc:
        raise CLIError(f"unknown model {name!r}: {exc}") from None
    heldout = None
    for attr in ("heldout", "held_out", "test_data"):
        if hasattr(model, attr):
            heldout = getattr(model, attr)
            heldout = heldout() if callable(heldout) else heldout
            break
    return differentiable_score(model), model.sde, tuple(model.shape), heldout


def differentiable_score(model):
    """model.score if autograd flows through it, else the same score rebuilt from the model's
    noise-prediction network (shipped models run their score under no_grad for sampling); the
    rebuilt score is checked against model.score before use."""
    import torch

    from ..score import NoisePredictionScore

    probe_x = torch.zeros(2, *model.shape)
    probe_t = torch.tensor([0.5 * model.sde.T, 0.9 * model.sde.T])
    with torch.enable_grad():
        xin = probe_x.clone().requires_grad_(True)
        out = model.score(xin, probe_t)
        if out.requires_grad:
            return model.score
        net = getattr(model, "network", None)
        if net is None or not hasattr(net, "time_input"):
            raise CLIError(f"model {model!r} has no differentiable score; the likelihood needs autograd through it")
        rebuilt = NoisePredictionScore(net, model.sde, time_input=net.time_input)
        again = rebuilt(xin, probe_t)
    if not again.requires_grad or not torch.allclose(again.detach(), out, rtol=1e-5, atol=1e-6):
        raise CLIError(f"model {model!r} has no differentiable score; the likelihood needs autograd through it")
    return rebuilt


def _heldout_digits():
    """The shipped held-out digits split, if the data module provides one (else None)."""
    try:
        from fastsde import data as data_mod  # type: ignore[attr-defined]
    except ImportError:
        return None
    for fn in ("digits_heldout", "load_digits_heldout", "heldout_digits"):
        if hasattr(data_mod, fn):
            return getattr(data_mod, fn)()
    if hasattr(data_mod, "load_digits"):
        try:
            return data_mod.load_digits(split="heldout")
        except TypeError:
            return None
    return None


def _read_array(path: Path, key: str | None):
    import numpy as np

    if not path.exists():
        raise FileNotFoundError(f"no such data file: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise CLIError(f"--data must be an .npy or .npz file, got {path.name!r}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:  # a corrupt or non-numpy file
        raise CLIError(f"cannot read {path}: {exc}") from None
    if suffix == ".npy":
        return loaded
    with loaded:
        keys = list(loaded.keys())
        if key is not None:
            if key not in keys:
                raise CLIError(f"{path.name} has no array {key!r}; it holds {keys}")
            return loaded[key]
        if len(keys) == 1:
            return loaded[keys[0]]
        for k in _NPZ_KEYS:
            if k in keys:
                return loaded[k]
        raise CLIError(f"{path.name} holds several arrays {keys}; name one with --key")


def _grid_levels(arr, levels: int | None) -> int | None:
    """Number of levels L if every value of float data in [-1, 1] sits on the grid −1 + 2k/(L−1)
    (quantised data stored as floats, e.g. the digits' 17 levels), else None."""
    import numpy as np

    u = np.unique(arr.astype(np.float64))
    if u.size > 256:
        return None
    v = (u + 1.0) / 2.0
    for k in [levels - 1] if levels is not None else range(1, 256):
        r = v * k
        if np.all(np.abs(r - np.round(r)) < 1e-4):
            return k + 1
    return None


def prepare_data(arr, shape: tuple[int, ...], levels: int | None, seed: int, dtype, pass_index: int = 0):
    """Check shape and range; dequantise quantised data. Returns (x, offset_default, note).

    Integer data holds levels 0..levels−1 (default 256). Float data must lie in [-1, 1]; if it sits
    on a grid of L levels (found, or ``levels`` if given) it is mapped back to levels and dequantised,
    since a density evaluated at lattice points is meaningless; otherwise it is used as given.
    """
    import numpy as np
    import torch

    from ..likelihood import bpd_offset, dequantize

    arr = np.asarray(arr)
    d = math.prod(shape)
    if arr.ndim < 2 or arr.shape[0] == 0:
        raise CLIError(f"data must have shape (n, {', '.join(map(str, shape))}) or (n, {d}), got {arr.shape}")
    if tuple(arr.shape[1:]) != shape:
        if math.prod(arr.shape[1:]) != d:
            raise CLIError(
                f"data shape {arr.shape} does not match the model's sample shape {shape}: "
                f"expected (n, {', '.join(map(str, shape))}) or (n, {d})"
            )
        arr = arr.reshape(arr.shape[0], *shape)
    if arr.dtype.kind in "iub":
        lo, hi = int(arr.min()), int(arr.max())
        # as fastsde.data reads arrays: integers up to 16 are the digits' 17 levels, else 8-bit
        lv = levels if levels is not None else (17 if hi <= 16 else 256)
        if lo < 0 or hi > lv - 1:
            raise CLIError(f"integer data must hold levels 0..{lv - 1} (set --levels), got values in [{lo}, {hi}]")
        ints = arr.astype(np.int64)
        note = f"dequantised {lv} levels onto [-1, 1]" + (" (--levels to override)" if levels is None else "")
    elif arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise CLIError("data holds NaN or Inf")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
            raise CLIError(
                f"float data must lie in the model's range [-1, 1], got values in [{lo:.4g}, {hi:.4g}]; "
                "pass integer levels to have them dequantised"
            )
        lv = _grid_levels(arr, levels)
        if lv is None:
            if levels is not None:
                raise CLIError(f"float data does not sit on the grid of {levels} levels in [-1, 1] (--levels)")
            return torch.from_numpy(arr).to(dtype), bpd_offset(256), "continuous float data used as given"
        ints = np.round((arr.astype(np.float64) + 1.0) / 2.0 * (lv - 1)).astype(np.int64)
        note = f"float data on a grid of {lv} levels, dequantised onto [-1, 1]"
    else:
        raise CLIError(f"data must be integer levels or floats, got dtype {arr.dtype}")
    x = dequantize(torch.from_numpy(ints), seed=seed, levels=lv, pass_index=pass_index, dtype=dtype)
    return x, bpd_offset(lv), note


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..integrate import IntegrationError
    from ..likelihood import bits_per_dim, log_likelihood
    from ..score import NonFiniteScoreError

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

    score, sde, shape, heldout = _load_model(args.model)
    if args.data is not None:
        arr = _read_array(args.data, args.key)
        source = str(args.data)
    else:
        arr = heldout if heldout is not None else _heldout_digits()
        if arr is None:
            raise CLIError("--data is required (no held-out split ships with this model)")
        source = f"held-out split of {args.model}"
        if isinstance(arr, torch.Tensor):
            arr = arr.detach().cpu().numpy()
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(args.dtype or "")
    if dtype is None:
        dtype = torch.float64 if args.model in MIXTURES else torch.float32
    if args.n is not None:
        arr = np.asarray(arr)[: args.n]
    arr = np.asarray(arr)
    x, offset, note = prepare_data(arr, shape, args.levels, args.seed, dtype)
    offset = args.offset if args.offset is not None else offset
    d = math.prod(shape)
    trace = args.trace or ("exact" if d <= 16 else "hutchinson")
    n = x.shape[0]

    from ..noise import NoiseSource

    noise = NoiseSource.from_seed(args.seed, n)
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n * args.passes, desc="likelihood", unit="sample")
    logps, nfes, calls, pass_bpd = [], [], 0, []
    start = time.perf_counter()
    try:
        for p in range(args.passes):
            if p > 0:  # fresh dequantisation noise (integer data) and fresh probes
                x, _, _ = prepare_data(arr, shape, args.levels, args.seed, dtype, pass_index=p)
            pass_logps = []
            for lo in range(0, n, args.batch_size):
                rows = list(range(lo, min(n, lo + args.batch_size)))
                out = log_likelihood(
                    score,
                    sde,
                    x[rows[0] : rows[-1] + 1],
                    trace=trace,
                    seed=noise.subset(rows),
                    rtol=args.rtol,
                    atol=args.atol,
                    probes=args.probes,
                    probe=args.probe,
                    method=args.method,
                    max_steps=args.max_steps,
                    pass_index=p,
                )
                pass_logps.append(out.logp.detach().cpu().to(torch.float64))
                nfes.append(out.nfe_per_sample)
                calls += out.calls
                if bar is not None:
                    bar.update(len(rows))
                    bar.set_postfix(bpd=f"{float(bits_per_dim(torch.cat(pass_logps), d, offset).mean()):.4f}")
            logps.append(torch.cat(pass_logps))
            pass_bpd.append(float(bits_per_dim(logps[-1], d, offset).mean()))
    except (IntegrationError, NonFiniteScoreError) as exc:
        raise CLIError(str(exc)) from None
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - start
    logp = torch.stack(logps).mean(dim=0)  # per sample, averaged over passes
    bpd = bits_per_dim(logp, d, offset)
    nfe = torch.cat(nfes)
    se = float(bpd.std() / math.sqrt(n)) if n > 1 else float("nan")
    print(f"data: {source}, {n} samples of shape {shape} ({note}); model: {args.model}, {sde!r}")
    print(f"trace: {trace}" + (f" ({args.probes} {args.probe} probe(s))" if trace == "hutchinson" else ""))
    print(f"method: {args.method}, rtol={args.rtol:g}, atol={args.atol:g}")
    print(f"bits/dim: {float(bpd.mean()):.4f} ± {se:.4f} (offset {offset:.4g})")
    if args.passes > 1:
        print(f"bits/dim per pass: {', '.join(f'{b:.4f}' for b in pass_bpd)}")
    print(f"log-likelihood: {float(logp.mean()):.4f} nats per sample")
    print(
        f"NFE: {float(nfe.mean()):.1f} per sample{' and pass' if args.passes > 1 else ''} (min {float(nfe.min()):.0f}, max {float(nfe.max()):.0f}), {calls} calls"
    )
    print(f"time: {wall:.2f} s")
    return 0

"""`fastsde sample`: draw samples from a shipped model (default: `digits` with fastsde's default
solver), write a PNG grid (or an .npz) with a JSON record next to it, and print NFE, wall time and
the quality metric.

``--model mixture`` samples the exact 2-D Gaussian mixture (fastsde.problems.mixture_2d under VP) and
writes a scatter over the true density contours.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import CLIError
from .common import DEFAULT_SHARD_SIZE, cli_hint, command_line, compute_quality, is_run_dir, quality_line

_DEFAULT_OUT = "samples.png"


QUALITY_HELP = (
    "The quality line: for digits, FD is the Fréchet distance between the samples and 300 held-out "
    "digits in the features of the shipped classifier (lower is better); the floor is the FD of n real "
    "digits (it grows as n shrinks, so compare FD with the floor at the same n; ± is its spread over "
    "subsets, i.e. the noise of one FD); ratio = FD / floor (about 1: as good as real data); confidence "
    "is the classifier's mean top probability (held-out digits: 0.989). With --label, FD and its floor use only "
    "the digits of the requested labels (held-out for FD, train for the floor). For the mixture, FD is the "
    "Fréchet distance to the exact mixture (per mode, plus a weight term)."
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sample",
        help="sample a shipped model (default: digits, 64 samples -> samples.png)",
        description=(
            "Sample a shipped model and write a PNG grid or an .npz, with a JSON record of every setting "
            "next to it (<out>.json); prints NFE, wall time and quality."
        ),
        epilog=QUALITY_HELP,
    )
    p.add_argument(
        "--model",
        default=None,
        help="a shipped model (fastsde.list_models()), 'mixture', or a model folder by path (default digits)",
    )
    p.add_argument("--solver", default=None, help="solver name (default: fastsde.sample's default solver)")
    p.add_argument(
        "--levels",
        default=None,
        metavar="A,B,...",
        help="with --solver mlem: shipped models coarse to fine (e.g. digits-small,digits,digits-large), "
        "costs = their measured FLOP ratio; prints the cost per level and the compute against EM with the last",
    )
    p.add_argument(
        "--p",
        default=None,
        help="with --levels: 'auto' (default) or the probability of each correction, e.g. 0.2,0.05",
    )
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per batch (default: all at once)")
    p.add_argument("--seed", type=int, default=0, help="an integer in [0, 2**64) (default 0)")
    p.add_argument(
        "--out",
        default=_DEFAULT_OUT,
        help="output .png (grid / scatter) or .npz (default samples.png), or a run folder (a path ending in / "
        "or an existing folder): resumable shards and a manifest (fastsde.sample_to_dir), also under torchrun",
    )
    p.add_argument("--shard-size", type=int, default=None, help="samples per shard file of a run folder (default 1000)")
    p.add_argument("--steps", type=int, default=None, help="grid points for fixed-step solvers")
    p.add_argument("--eps-rel", type=float, default=None, help="relative tolerance of the adaptive solver")
    p.add_argument("--eps-abs", type=float, default=None, help="absolute tolerance of the adaptive solver")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance of the ODE solver")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance of the ODE solver")
    p.add_argument("--snr", type=float, default=None, help="corrector signal-to-noise ratio (pc)")
    p.add_argument("--t-end", type=float, default=None, help="end time of the solve (default: the process's ε)")
    p.add_argument("--no-denoise", action="store_true", help="skip the final Tweedie denoise at t_end")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None, help="default float32 (mixture float64)")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other solver option, e.g. --option corrector_steps=2 (repeatable)",
    )
    p.add_argument("--table", default=None, help="IIA table for an iia_ solver (default: the shipped one)")
    p.add_argument(
        "--recipe",
        default=None,
        metavar="DIR|auto",
        help="a recipe folder (fastsde tune): the solver, grid and table it chose for --steps NFE; 'auto': the "
        "recipe shipped for this shipped model",
    )
    p.add_argument(
        "--grid",
        default=None,
        metavar="FILE|fitted",
        help="a fitted time grid (fastsde fit-grid) for a fixed-grid solver, --steps defaulting to its points; "
        "'fitted': the grid shipped for this shipped model, solver and --steps (fastsde.shipped_grids())",
    )
    p.add_argument("--no-metric", action="store_true", help="skip the quality metric")
    p.add_argument(
        "--label",
        default=None,
        help="class labels of a class-conditional model (digits-cond): one label for all samples ('3'), "
        "a range cycled over the samples ('0-9') or a list cycled ('1,7')",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance weight w (needs --label; 1 = the conditional model, 0 = unconditional; "
        "costs 2 network evaluations per NFE)",
    )
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None, help="show a progress bar")
    bar.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar (default: shown on a terminal)"
    )
    p.set_defaults(func=run)


#: solver options that have their own flag (flag name = option name)
_FLAGS = ("steps", "eps_rel", "eps_abs", "rtol", "atol", "snr")
#: keywords of fastsde.sample that --option may also set
_SAMPLE_KEYWORDS = ("t_end", "denoise")


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
    """The solver options given on the command line (only those set); an option given twice (by
    its flag and by --option, or by two --option) is an error rather than a silent choice."""
    opts: dict[str, Any] = {}
    given: dict[str, str] = {}
    for flag in _FLAGS:
        value = getattr(args, flag)
        if value is not None:
            opts[flag] = value
            given[flag] = f"--{flag.replace('_', '-')} {value}"
    if getattr(args, "t_end", None) is not None:
        opts["t_end"] = args.t_end
        given["t_end"] = f"--t-end {args.t_end}"
    if getattr(args, "no_denoise", False):
        opts["denoise"] = False
        given["denoise"] = "--no-denoise"
    for item in args.option:
        if "=" not in item:
            raise CLIError(f"--option must be KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key:
            raise CLIError(f"--option must be KEY=VALUE, got {item!r}")
        if key in given:
            raise CLIError(f"{key} is given twice ({given[key]} and --option {item}); give it once")
        opts[key] = _parse_value(value)
        given[key] = f"--option {item}"
    return opts


def default_solver() -> str:
    """The CLI's default solver: the library's (fastsde.sample's default)."""
    from ..api import DEFAULT_SOLVER

    return DEFAULT_SOLVER


def check_output(path: str) -> Path:
    """The output must be a .png or .npz that can be created (checked by creating a file next to it,
    before compute), and so must its JSON record."""
    from .checks import check_out_file

    out = Path(path)
    if out.suffix.lower() not in (".png", ".npz"):
        raise CLIError(f"--out must end in .png or .npz, got {path!r}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(f"cannot write {path!r}: folder {str(parent)!r} does not exist")
    check_out_file(out)
    if record_path(out).is_dir():
        raise CLIError(f"cannot write the record {str(record_path(out))!r}: it is a folder")
    return out


def record_path(out: Path) -> Path:
    """The JSON record written next to an output: samples.png -> samples.png.json."""
    return out.with_name(out.name + ".json")


def _device(name: str):
    """--device as a torch.device available here (see checks.check_device)."""
    from .checks import check_device

    return check_device(name)


def shipped_grid_for(model: str, solver: str, steps: Any) -> Any:
    """The shipped fitted grid for ``--grid fitted``, or a one-line error naming what is shipped."""
    from fastsde.artifacts.grid import shipped_grid, shipped_grids

    if steps is None:
        raise CLIError("--grid fitted needs --steps (the shipped grids are fitted per step count)")
    grid = shipped_grid(model, solver, int(steps))
    if grid is None:
        mine = [g.removesuffix(".safetensors") for g in shipped_grids() if g.startswith(f"{model}-{solver}-")]
        listed = ", ".join(mine) if mine else f"none for {model!r} and {solver!r}"
        raise CLIError(
            f"no fitted grid is shipped for model {model!r}, solver {solver!r}, steps {steps}; shipped: {listed}"
        )
    return grid


#: the most samples a --label run may label (the labels are one array in memory)
MAX_LABELLED = 10**8

#: the most labels --label may name (a class-conditional model has far fewer classes)
MAX_LABEL = 10**6


def label_values(text: str) -> list[int]:
    """--label as its distinct-ordered values ('k', 'a-b' or 'a,b,c'), before the model is known: each
    in 0..MAX_LABEL, a range checked before it is expanded (never a list of 10**11 entries)."""
    try:
        if "-" in text.strip("-") and "," not in text:
            lo, hi = (int(v) for v in text.split("-"))
            if not 0 <= lo <= hi <= MAX_LABEL:
                raise ValueError
            values = list(range(lo, hi + 1))
        else:
            values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 0 or v > MAX_LABEL for v in values):
        raise CLIError(
            f"--label must be a label, a range a-b (a <= b) or a list a,b,c of labels in 0..{MAX_LABEL}, got {text!r}"
        )
    return values


def parse_labels(text: str, n: int, num_classes: int):
    """--label as n per-sample labels: 'k', 'a-b' (a..b cycled) or 'a,b,c' (cycled); each in 0..num_classes-1."""
    import torch

    try:
        values = label_values(text)
    except CLIError:
        values = []
    if not values or any(v < 0 or v >= num_classes for v in values):
        raise CLIError(
            f"--label must be a label, a range a-b or a list a,b,c of labels in 0..{num_classes - 1}, got {text!r}"
        )
    table = torch.tensor(values, dtype=torch.long)
    return table[torch.arange(n) % len(values)]


_INT_OPTION_LIMITS = {
    # solver options that size arrays or loops: (limit, why)
    "steps": "MAX_STEPS",
    "corrector_steps": "MAX_STEPS",
    "buckets": "MAX_STEPS",
    "calibration_samples": "MAX_STEPS",
}


def check_sizes(args: argparse.Namespace, opts: dict[str, Any], sharded: bool) -> None:
    """--n, --batch-size, --shard-size and the step-like solver options within the limits of
    fastsde.cli.checks, before anything is loaded."""
    from . import checks

    if sharded:
        checks.check_int("--n", args.n, 1, checks.MAX_SHARDED_N, " (a run folder)")
    else:
        checks.check_int("--n", args.n, 1, checks.MAX_N, "; for more, write a run folder (--out DIR/)")
    if args.batch_size is not None:
        checks.check_int("--batch-size", args.batch_size, 1)
    if args.shard_size is not None:
        if not sharded:
            raise CLIError(f"--shard-size must be a positive integer with --out DIR/, got {args.shard_size}")
        checks.check_int("--shard-size", args.shard_size, 1, None, " with --out DIR/")
    if sharded:
        size = args.shard_size or DEFAULT_SHARD_SIZE
        shards = -(-args.n // size)
        if shards > checks.MAX_SHARDS:
            raise CLIError(
                f"--n {args.n} in shards of {size} makes {shards} shards, more than the limit of "
                f"{checks.MAX_SHARDS}; raise --shard-size"
            )
    for key, limit in _INT_OPTION_LIMITS.items():
        value = opts.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > getattr(checks, limit):
            raise CLIError(f"{key} must be at most {getattr(checks, limit)} (the command line's limit), got {value}")


def check_memory(args: argparse.Namespace, shape: tuple[int, ...], dtype: Any, sharded: bool, png: bool) -> None:
    """The arrays a run holds at once (all samples in memory, or one shard) within checks.MAX_BYTES,
    and a PNG grid within checks.MAX_PNG images; before any compute."""
    from . import checks

    itemsize = dtype.itemsize if hasattr(dtype, "itemsize") else 8
    if sharded:
        size = min(args.n, args.shard_size or DEFAULT_SHARD_SIZE)
        checks.check_memory("--shard-size", size, shape, itemsize, "; lower --shard-size")
    else:
        checks.check_memory("--n", args.n, shape, itemsize, "; write a run folder (--out DIR/) for more")
        if png and args.n > checks.MAX_PNG:
            raise CLIError(
                f"--n {args.n}: a PNG grid holds at most {checks.MAX_PNG} images; write an .npz or a run folder"
            )


@dataclass
class _Request:
    """What `fastsde sample` was asked for, checked before any model is loaded."""

    sharded: bool
    device: Any
    solver: str
    spec: Any
    opts: dict[str, Any]
    keywords: dict[str, Any]
    level_names: list[str]
    out: Path
    mixture: bool


@dataclass
class _Model:
    """The loaded model: its process, score, sample shape and dtype, and where they came from (the
    ML-EM levels, the exact mixture, or a shipped / trained model), with the per-sample labels."""

    sde: Any
    score: Any
    shape: tuple[int, ...]
    dtype: Any
    levels: Any = None
    gm: Any = None
    model: Any = None
    labels: Any = None


@dataclass
class _Drawn:
    """The samples of an in-memory run and what they cost."""

    samples: Any
    nfe_per_sample: Any
    statuses: list[str]
    calls: int
    wall: float
    net_evals: float
    level_rows: list[Any]
    cost_sum: float
    multilevel: dict[str, Any]

    @property
    def nfe(self) -> float:
        return float(self.nfe_per_sample.mean())


def _check_request(args: argparse.Namespace) -> _Request:
    """Every check before any model is loaded: sizes, seed, device, solver and its options, output."""
    import fastsde

    from .checks import check_out_dir
    from .sample_levels import check_args

    sharded = is_run_dir(args.out)
    if args.n < 1:
        raise CLIError(f"--n must be a positive integer, got {args.n}")
    if args.batch_size is not None and args.batch_size < 1:
        raise CLIError(f"--batch-size must be a positive integer, got {args.batch_size}")
    fastsde.noise.check_seed(args.seed, "--seed")
    device = _device(args.device)
    solver = args.solver or ("mlem" if getattr(args, "levels", None) else default_solver())
    if solver not in fastsde.SOLVERS:
        raise CLIError(f"unknown solver {solver!r}; valid solvers: {', '.join(sorted(fastsde.SOLVERS))}")
    spec = fastsde.SOLVERS[solver]
    opts = solver_options(args)
    check_sizes(args, opts, sharded)
    keywords = {k: opts.pop(k) for k in _SAMPLE_KEYWORDS if k in opts}
    if args.model is not None and not args.model.strip():
        raise CLIError("--model must name a model, got ''")
    level_names = check_args(args, solver, opts)
    args.model = args.model or ("+".join(level_names) if level_names else "digits")
    out = check_out_dir(args.out) if sharded else check_output(args.out)
    mixture = args.model == "mixture"
    if not level_names and not mixture and args.model not in fastsde.list_models() and not is_model_dir(args.model):
        raise CLIError(
            f"unknown model {args.model!r}; available: {', '.join(fastsde.list_models() + ['mixture'])}, "
            "or the path of a folder written by `fastsde train --out DIR`"
        )
    if args.label is not None:
        label_values(args.label)  # its form and size, before the model says how many classes it has
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise CLIError(f"--guidance must be a finite number, got {args.guidance}")
    if sharded:  # under torchrun a bare cuda is this rank's GPU (LOCAL_RANK), for the network too
        from ..shards import device_for_rank

        device = device_for_rank(device)
    return _Request(sharded, device, solver, spec, opts, keywords, level_names, out, mixture)


def _load_model(args: argparse.Namespace, req: _Request) -> _Model:
    """The model asked for (the levels, the exact mixture, or a shipped / trained model), the labels
    and guidance of a class-conditional one, and the dtype; the memory the run holds checked."""
    import torch

    import fastsde

    from .checks import reading

    if req.level_names:
        from .sample_levels import load_levels

        with reading("--levels", args.levels, "a list of loadable models"):
            levels = load_levels(req.level_names, req.device)
        m = _Model(levels.sde, levels, tuple(levels.models[0].shape), torch.float32, levels=levels)
    elif req.mixture:
        sde = fastsde.VPSDE()
        gm = fastsde.problems.mixture_2d(sde)
        m = _Model(sde, gm.score, tuple(gm.shape), torch.float64, gm=gm)
    else:
        with reading("--model", args.model, "a model (a shipped name or a folder written by `fastsde train`)"):
            model = fastsde.load_model(args.model)
            model.network.to(req.device)
        m = _Model(model.sde, model.score, tuple(model.shape), torch.float32, model=model)
    if args.label is not None or args.guidance is not None:
        classes = 0 if m.model is None else m.model.num_classes
        if not classes:
            raise CLIError(f"--label and --guidance need a class-conditional model (digits-cond), not {args.model!r}")
        if args.label is None:
            raise CLIError("--guidance needs --label (the classes to guide towards)")
        if not req.sharded or args.n <= MAX_LABELLED:
            m.labels = parse_labels(args.label, args.n, classes)
        else:
            raise CLIError(f"--label: at most {MAX_LABELLED} labelled samples in one run, got --n {args.n}")
        if args.guidance is not None:
            m.score = m.model.guided(args.guidance)
    if args.dtype is not None:
        m.dtype = getattr(torch, args.dtype)
    check_memory(args, m.shape, m.dtype, req.sharded, png=not req.sharded and req.out.suffix.lower() == ".png")
    return m


def _recipe(args: argparse.Namespace, req: _Request, m: _Model) -> None:
    """--recipe: the solver and options (fitted grid, table) the recipe chose for --steps, after checking
    that it was tuned for this model, process and sample shape."""
    if getattr(args, "recipe", None) is None:
        return
    import fastsde
    from fastsde.artifacts.recipe import shipped_recipe

    from .checks import reading

    if args.solver is not None or args.grid is not None or args.table is not None:
        raise CLIError("--recipe chooses the solver, grid and table: drop --solver / --grid / --table")
    if "steps" not in req.opts:
        raise CLIError("--recipe needs --steps (one of the recipe's NFE budgets)")
    if args.recipe == "auto":
        recipe = shipped_recipe(args.model)
        if recipe is None:
            raise CLIError(
                f"no recipe ships for model {args.model!r}; tune one: fastsde tune --model {args.model} --out DIR"
            )
    else:
        with reading("--recipe", args.recipe, "a recipe folder (fastsde tune --out DIR)"):
            recipe = fastsde.load_recipe(args.recipe)
    try:
        recipe.check_for(m.score, m.sde, tuple(m.shape), m.dtype, req.device)
        solver, options = recipe.choose(int(req.opts["steps"]))
    except ValueError as exc:
        raise CLIError(f"--recipe: {exc}") from None
    req.solver, req.spec = solver, fastsde.SOLVERS[solver]
    req.opts = {**options, **{k: v for k, v in req.opts.items() if k != "steps"}}


def _solver_files(args: argparse.Namespace, req: _Request) -> None:
    """--table (an iia_ solver's IIA table) and --grid (a fitted time grid) into the solver options."""
    import fastsde

    from .checks import reading

    opts = req.opts
    if "table" in req.spec.artifact_options():
        from .fit_iia import table_for_sample

        with reading("--table", args.table, "an IIA table file (fastsde fit-iia)"):
            opts["table"] = table_for_sample(args.model, req.solver, opts, args.table)
    elif args.table is not None:
        raise CLIError("--table applies to the iia_ solvers only")
    if getattr(args, "grid", None) is not None:
        if "grid" in opts:
            raise CLIError(f"grid is given twice (--grid {args.grid} and --option grid=...); give it once")
        if args.grid == "fitted":
            fitted = shipped_grid_for(args.model, req.solver, opts.get("steps"))
        else:
            with reading("--grid", args.grid, "a fitted grid file (fastsde fit-grid)"):
                fitted = fastsde.load_grid(args.grid)
        opts["grid"] = fitted
        opts.setdefault("steps", int(fitted.steps))
        check_sizes(args, opts, req.sharded)


def _check_keywords(req: _Request, sde: Any) -> tuple[float, dict[str, Any]]:
    """The options (names and values) and the sample keywords, before any compute: (t_end, the
    solver's resolved options)."""
    keywords = req.keywords
    from ..api import run_t_end

    if not isinstance(keywords.get("denoise", True), bool):
        raise CLIError(f"denoise must be true or false, got {keywords['denoise']!r}")
    try:
        t_end = run_t_end(sde, req.spec, keywords.get("t_end"), keywords.get("denoise", True), dict(req.opts))
    except ValueError as err:
        raise CLIError(str(err)) from None
    return t_end, req.spec.resolve(sde, dict(req.opts), t_end)


def _draw(args: argparse.Namespace, req: _Request, m: _Model, progress: bool) -> _Drawn:
    """The samples in memory, in batches of --batch-size (each the rows lo..hi of the run's noise)."""
    import torch

    import fastsde

    from ..score import NonFiniteScoreError
    from ..solvers.core.driver import IntegrationError

    n = args.n
    batch = args.batch_size or n
    chunks, nfe_rows, statuses = [], [], []
    calls, level_rows, cost_sum, multilevel, net_evals = 0, [], 0.0, {}, 0.0
    start = time.perf_counter()
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        try:
            res = fastsde.sample(
                m.score,
                m.sde,
                (hi - lo, *m.shape),
                solver=req.solver,
                seed=fastsde.NoiseSource.from_seed(args.seed, hi - lo, start=lo),  # = rows lo..hi of the run
                dtype=m.dtype,
                device=req.device,
                progress=progress,
                cond=None if m.labels is None else {"class_labels": m.labels[lo:hi]},
                **req.keywords,
                **req.opts,
            )
        except (IntegrationError, NonFiniteScoreError) as exc:
            raise CLIError(cli_hint(str(exc))) from None
        chunks.append(res.samples.cpu())
        nfe_rows.append(res.nfe_per_sample)
        statuses += res.stats.get("status", ["done"] * (hi - lo))
        calls += res.calls
        net_evals += float(res.network_evals) * (hi - lo)
        if res.nfe_per_level is not None:
            level_rows.append(res.stats["nfe_per_level_per_sample"])
            cost_sum += float(res.cost) * (hi - lo)
            multilevel = res.multilevel or {}
    wall = time.perf_counter() - start
    return _Drawn(
        torch.cat(chunks), torch.cat(nfe_rows), statuses, calls, wall, net_evals, level_rows, cost_sum, multilevel
    )


def _record(
    args: argparse.Namespace, req: _Request, m: _Model, drawn: _Drawn, t_end: float, resolved: dict[str, Any]
) -> dict[str, Any]:
    """The JSON record written next to the output: every setting, the cost and the quality."""
    import torch

    import fastsde

    n = args.n
    record = {
        "fastsde": fastsde.__version__,
        "command": command_line(args),
        "model": args.model,
        "sde": m.sde.config(),
        "solver": req.solver,
        "options": {k: _jsonable(v) for k, v in resolved.items()},
        "t_end": float(t_end),
        "denoise": req.keywords.get("denoise", True),
        "seed": args.seed,
        "n": n,
        "batch_size": args.batch_size or n,
        "dtype": str(m.dtype).removeprefix("torch."),
        "device": str(req.device),
        "nfe": drawn.nfe,
        "calls": drawn.calls,
        "wall_s": round(drawn.wall, 3),
        "unfinished": _unfinished(drawn),
        "quality": {} if args.no_metric else compute_quality(drawn.samples, m.gm, m.labels),
        "output": req.out.name,
    }
    if m.labels is not None:
        record["labels"] = m.labels.tolist()
        record["guidance"] = args.guidance
        record["network_evals"] = drawn.net_evals / n
    if m.levels is not None:
        per_level = [float(v) for v in torch.cat(drawn.level_rows).mean(0)]
        multilevel = drawn.multilevel
        record["levels"] = {"models": m.levels.names, "flops": m.levels.flops, "costs": m.levels.costs}
        record["multilevel"] = {k: _jsonable(v) if not isinstance(v, dict) else v for k, v in multilevel.items()}
        record["multilevel"]["nfe_per_level"] = per_level
        record["multilevel"]["compute"] = drawn.cost_sum / n
    return record


def _unfinished(drawn: _Drawn) -> int:
    """Samples that did not reach t_end (on_budget=partial)."""
    return sum(1 for st in drawn.statuses if st not in ("done", "stopped"))


def _write(args: argparse.Namespace, req: _Request, m: _Model, drawn: _Drawn, record: dict[str, Any]) -> None:
    """The output (an .npz, the mixture's scatter or a PNG grid) and its JSON record, each whole or
    not at all."""
    from ..files import write_atomic, write_json_atomic

    out, samples, n = req.out, drawn.samples, args.n
    if out.suffix.lower() == ".npz":
        import numpy as np

        def write_npz(path: Path) -> None:
            with open(path, "wb") as fh:  # a file object: numpy would append .npz to a name
                np.savez_compressed(
                    fh,
                    samples=samples.double().numpy(),
                    nfe_per_sample=drawn.nfe_per_sample.numpy(),
                    seed=np.array(args.seed, dtype=np.uint64),
                    model=np.array(args.model),
                    solver=np.array(req.solver),
                    options=np.array(json.dumps(record["options"])),
                    status=np.array(drawn.statuses),
                    record=np.array(json.dumps(record)),
                )

        write_atomic(out, write_npz)
    elif req.mixture:
        from ..plots import save_mixture_scatter

        title = f"{req.solver}: {n} samples, NFE {drawn.nfe:.1f}"
        write_atomic(out, lambda p: save_mixture_scatter(samples, m.gm, p, title=title))
    else:
        from ..plots import save_image_grid

        write_atomic(out, lambda p: save_image_grid(samples, p, ncol=min(8, n) if n <= 64 else None))
    write_json_atomic(record_path(out), record)


def _report(args: argparse.Namespace, req: _Request, m: _Model, drawn: _Drawn, record: dict[str, Any]) -> None:
    """The lines `fastsde sample` prints after an in-memory run."""
    n = args.n
    print(f"model {args.model}  solver {req.solver}  options {req.opts or '{}'}  n {n}")
    print(f"NFE {drawn.nfe:.1f} per sample  ({drawn.calls} batched calls)  wall {drawn.wall:.2f} s")
    if m.labels is not None:
        guided = f"guidance w = {args.guidance:g}" if args.guidance is not None else "no guidance"
        print(f"labels {args.label}  {guided}  network evaluations {record['network_evals']:.1f} per sample")
    if m.levels is not None:
        from .sample_levels import report

        multilevel = record["multilevel"]
        lines = report(
            m.levels,
            multilevel["nfe_per_level"],
            drawn.cost_sum / n,
            req.keywords.get("denoise", True),
            drawn.multilevel,
        )
        for line in lines:
            print(line)
    if record["quality"]:
        print(quality_line(record["quality"], n))
    print(f"wrote {req.out} and {record_path(req.out).name}")


def run(args: argparse.Namespace) -> int:
    req = _check_request(args)
    m = _load_model(args, req)
    _recipe(args, req, m)
    _solver_files(args, req)
    t_end, resolved = _check_keywords(req, m.sde)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    if req.sharded:
        from .sample_dir import run_sharded

        if m.labels is not None:
            req.keywords["cond"] = {"class_labels": m.labels}
        return run_sharded(
            args, m.score, m.sde, m.shape, m.dtype, req.device, req.solver, req.opts, req.keywords, progress, m.gm
        )
    drawn = _draw(args, req, m, progress)
    unfinished = _unfinished(drawn)
    if unfinished:
        print(
            f"fastsde sample: warning: {unfinished} of {args.n} samples did not reach t_end (on_budget=partial); "
            f"they are written as they stopped and counted in {record_path(req.out).name}",
            file=sys.stderr,
        )
    record = _record(args, req, m, drawn, t_end, resolved)
    _write(args, req, m, drawn, record)
    _report(args, req, m, drawn, record)
    return 0


def _jsonable(value: Any) -> Any:
    """An option value as JSON data (numbers, strings, bools, None; objects with a ``config()`` and
    tensors as res.config() records them; anything else by repr)."""
    from fastsde.api import _recordable

    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    recorded = _recordable(value)
    return repr(value) if recorded is value else _jsonable(recorded)


def is_model_dir(path: str) -> bool:
    """Whether --model names an existing folder (one written by `fastsde train`, or a diffusers one);
    never the empty name (which pathlib reads as the current folder)."""
    from pathlib import Path

    return bool(path.strip()) and Path(path).is_dir()

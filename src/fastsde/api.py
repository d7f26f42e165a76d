"""The front door: ``fastsde.sample`` picks a solver, runs it, applies the final denoise and returns
the samples with their accounting."""

from __future__ import annotations

import math
import numbers
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .grids import explicit_times, time_grid
from .guidance import ClassifierGuidance, with_null_rows
from .noise import NoiseSource, Stream, as_noise_source
from .score import (
    ScoreFn,
    check_cond,
    check_score_for_run,
    counter_for,
    data_prediction_of,
    is_hierarchy,
    scores_of,
)
from .sde import SDE
from .solvers import SolverSpec, get_solver
from .solvers.core.common import LOWER_ORDER_FINAL_BELOW
from .solvers.core.context import SolverContext, StepInfo
from .solvers.core.options import as_python_number
from .solvers.core.stepper import starts_at_zero_mean

__all__ = [
    "DEFAULT_SOLVER",
    "SampleResult",
    "sample",
    "check_shape",
    "check_dtype",
    "check_t_start",
]


@dataclass
class SampleResult:
    """Samples and their accounting.

    ``nfe`` is the mean over samples of the score evaluations each sample received (rejected steps
    and the final denoise included); ``calls`` counts calls made to the score (batched).
    """

    samples: Tensor
    nfe: float
    nfe_per_sample: Tensor
    calls: int
    solver: str
    options: dict[str, Any]
    wall_time: float
    stats: dict[str, Any] = field(default_factory=dict)
    stopped_early: bool = False
    #: mean compute per sample: evaluations × cost per evaluation (equals ``nfe`` for a plain score)
    cost: float | None = None

    def __post_init__(self) -> None:
        if self.cost is None:
            self.cost = self.nfe

    #: the seed as given (an int or a list of per-sample ints; None for a NoiseSource, which keeps
    #: no record of the seeds it was made from), and where the solve ran
    seed: int | list[int] | None = None
    dtype: str = "float32"
    device: str = "cpu"
    #: with fastsde.Levels: (K,) mean evaluations per sample of each level, and the multilevel record
    #: (schedule used, expected and realised cost, calibration) that config() reports as "multilevel"
    nfe_per_level: Tensor | None = None
    multilevel: dict[str, Any] | None = None
    #: mean network evaluations per sample: ``nfe`` times the network evaluations one score
    #: evaluation costs (2 under classifier-free guidance, which evaluates a conditional and an
    #: unconditional row in one call); equals ``nfe`` for a plain score
    network_evals: float | None = None

    def config(self) -> dict[str, Any]:
        """Every knob that produced these samples (for benchmark records): the solver, its resolved
        options, t_end, denoise, the process, n, the seed, the dtype and the device (and, for
        Levels, the multilevel accounting; under guidance, the network evaluations per sample)."""
        opts = {k: _recordable(v) for k, v in self.options.items()}
        out = {"solver": self.solver, **opts, "seed": self.seed, "dtype": self.dtype, "device": self.device}
        if self.network_evals is not None and self.network_evals != self.nfe:
            out["network_evals"] = self.network_evals
        return out if self.multilevel is None else {**out, "multilevel": self.multilevel}


def _recordable(value: Any) -> Any:
    """An option value as res.config() records it: objects with a ``config()`` (a learned ML-EM
    schedule, ...) by that description, other callables (a p(t), ...) by their name, tensors as lists."""
    if hasattr(value, "config") and callable(value.config):
        return value.config()
    if isinstance(value, Tensor):
        return value.tolist()
    if callable(value):
        return f"<callable {getattr(value, '__qualname__', type(value).__name__)}>"
    return value


#: The solver ``sample`` and ``fastsde sample`` use when none is named: the fastest sampler measured
#: to be unbiased at its defaults on exact problems (docs/guides/choose-a-solver.md, with the
#: measurements in docs/benchmarks/which-solver.md). ``adaptive`` is Gotta Go Fast as published.
DEFAULT_SOLVER = "adaptive_sde_dpm_2m"


def check_dtype(dtype: Any) -> torch.dtype:
    """A floating torch dtype (None: torch's default); an integer or bool dtype would round every
    step and return garbage."""
    if dtype is None:
        return torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
        raise ValueError(f"dtype must be a floating torch dtype (torch.float32, torch.float64), got {dtype!r}")
    return dtype


def check_shape(shape: Any) -> tuple[int, ...]:
    """shape must be (n, *dims) of positive ints with at least one data dimension."""
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    ok = (
        isinstance(shape, (tuple, list))
        and len(shape) >= 2
        and all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in shape)
    )
    if not ok:
        raise ValueError(
            f"shape must be a tuple (n, *dims) of positive ints with at least one data dimension, got {shape!r}"
        )
    return tuple(int(s) for s in shape)


def check_run(
    score: Any,
    sde: SDE,
    shape: Sequence[int],
    solver: str | SolverSpec,
    t_end: Any,
    denoise: Any,
    options: Mapping[str, Any] | None = None,
) -> tuple[tuple[int, ...], SolverSpec, float, bool]:
    """The checks of a sampling call before any compute (``sample``, ``sample_to_dir``): the score
    (or each level of a ``Levels``) against the process, the shape, the solver, t_end and denoise.
    Returns (shape, solver spec, t_end, denoise) as Python values; t_end=None is the run's default
    (:func:`default_t_end`, which reads the solver's ``options``)."""
    check_score_for_run(score, sde, get_solver(solver).name)
    shape = check_shape(shape)
    spec = get_solver(solver)
    denoise = as_python_number(denoise)
    if not isinstance(denoise, bool):
        raise ValueError(f"denoise must be True or False, got {denoise!r}")
    return shape, spec, run_t_end(sde, spec, t_end, denoise, options or {}), denoise


def run_t_end(sde: SDE, spec: SolverSpec, t_end: Any, denoise: bool, options: Mapping[str, Any]) -> float | int:
    """The t_end of a run: the given one checked (:func:`check_t_end`), or for None the run's default
    (:func:`default_t_end`); t_end=0 needs the denoise, which is then its last move."""
    t_end = check_t_end(sde, t_end) if t_end is not None else default_t_end(sde, spec, options, denoise)
    if t_end == 0 and not denoise:
        raise ValueError("t_end=0 makes the denoise the grid's last move (to x̂0 at σ = 0): it needs denoise=True")
    return t_end


def check_t_end(sde: SDE, t_end: Any) -> float | int:
    """t_end as a number in the process's range below T (None: its default); 0 where σ(0) = 0."""
    t_end = sde.default_t_end if t_end is None else as_python_number(t_end)
    if isinstance(t_end, bool) or not isinstance(t_end, (int, float)):
        raise ValueError(f"t_end must be a number, got {t_end!r}")
    if t_end == 0:
        check_zero_end(sde)
    else:
        sde.check_time("t_end", t_end)
    if not t_end < sde.T:
        raise ValueError(f"t_end must be < T = {sde.T:g}, got {t_end!r}")
    return t_end


def default_t_end(sde: SDE, spec: SolverSpec, options: Mapping[str, Any], denoise: bool) -> float:
    """The t_end of a run that names none: the process's ``default_t_end``, except 0 (the grid runs to
    σ = 0 and the denoise at its last interior point is the last move) for a run of fewer than
    ZERO_END_BELOW grid points of a fixed-grid solver that takes no fitted table, on a named grid that
    reaches 0 (``uniform``, ``quadratic``), under a process that starts from pure noise and ends at σ = 0
    (a rectified flow), with the denoise on. Measured on digits-flow (3 seeds, docs/benchmarks/model-kinds.md):
    at 4-8 NFE it is far better (UniPC at 4 NFE: FD 22 against 52), at 10-12 level; at 40 steps the
    denoise from σ(1/40) moved a narrow mode's mean by 0.022 on an exact mixture, so longer runs keep t_end."""
    t_end = sde.default_t_end
    if not denoise or spec.adaptive or spec.artifact is not None or not starts_at_zero_mean(sde, float(sde.T)):
        return t_end
    if noise_at_zero(sde) != 0.0:
        return t_end
    try:
        resolved = spec.resolve(sde, dict(options), t_end)
    except ValueError:
        return t_end  # the run's own checks name the problem
    grid, steps = resolved.get("grid"), resolved.get("steps")
    few = isinstance(steps, int) and steps < ZERO_END_BELOW
    return 0.0 if few and isinstance(grid, str) and grid in ZERO_END_GRIDS else t_end


#: below this many grid points a rectified flow's fixed-grid run ends at σ = 0 by default: the threshold of
#: diffusers' lower_order_final rule (see :func:`default_t_end`)
ZERO_END_BELOW = LOWER_ORDER_FINAL_BELOW


#: the named grids that reach t = 0 (λ and σ/m are infinite there for the others)
ZERO_END_GRIDS = ("uniform", "quadratic")


def noise_at_zero(sde: SDE) -> float:
    """σ(0) of the process: 0 where a grid can run to t = 0 (VP, sub-VP, rectified flow)."""
    return float(sde.marginal_std(torch.zeros(1, dtype=torch.float64))[0])


def check_zero_end(sde: SDE) -> None:
    """``t_end=0`` is a solve to σ = 0: only for a process whose σ(0) is 0 (VP, sub-VP, a rectified flow)."""
    sigma0 = noise_at_zero(sde)
    if sigma0 != 0.0:
        raise ValueError(
            f"t_end=0 (a grid to σ = 0 whose last move is the denoise) needs σ(0) = 0, but σ(0) = {sigma0:g} for "
            f"{sde!r}: give t_end > 0"
        )


def zero_end_time(sde: SDE, spec: SolverSpec, opts: dict[str, Any], t_start: float) -> float:
    """Where a ``t_end=0`` run's solver stops: the last interior point of the named grid of steps + 1
    points from t_start to 0. The solver covers the grid's first ``steps`` points (the same points, as the
    uniform and quadratic grids are self-similar) and the denoise there is the exact data-prediction move
    to σ = 0: diffusers' ``final_sigmas_type="zero"`` and k-diffusion's σ-schedules ending in 0. N points
    cost N NFE as for any t_end, but no evaluation is spent at a tiny t_end."""
    grid = opts.get("grid")
    if not {"steps", "grid", "rho"} <= set(opts):
        raise ValueError(f"t_end=0 needs a fixed-grid solver (one with steps= and grid=), not {spec.name!r}")
    if isinstance(grid, (Tensor, list, tuple)):  # an explicit grid: its last point is the last interior one
        times = explicit_times(grid)
        if times is None or times.numel() < 2 or not float(times[-1]) > 0.0:
            raise ValueError(
                f"t_end=0 with an explicit grid needs its last time > 0 (the denoise goes to 0), got {grid!r}"
            )
        return float(times[-1])
    if not isinstance(grid, str) or grid not in ZERO_END_GRIDS:
        raise ValueError(
            f"t_end=0 needs grid one of {list(ZERO_END_GRIDS)} (the others have λ = ∞ at t = 0; an explicit grid "
            f"ends at a t_end > 0), got grid={grid!r}"
        )
    return float(time_grid(sde, grid, int(opts["steps"]) + 1, t_start, 0.0, opts["rho"])[-2])


def available_devices() -> list[str]:
    """The devices this machine has (cpu, each cuda index, mps), for checks and error messages."""
    have = ["cpu"]
    if torch.cuda.is_available():
        have += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        have.append("mps")
    return have


def check_device(device: Any, what: str = "device") -> torch.device:
    """``device`` as a torch.device this machine has (cpu, an available cuda index, mps), before any
    compute; 'meta' and unknown or absent devices are a ValueError naming ``what`` and what is available."""
    have = available_devices()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{what} must be a torch device available here ({', '.join(have)}), got {device!r}") from None
    ok = dev.type == "cpu" or (
        dev.type == "cuda" and len(have) > 1 and (dev.index is None or f"cuda:{dev.index}" in have)
    )
    ok = ok or (dev.type == "mps" and "mps" in have)
    if not ok:
        raise ValueError(f"{what} {str(dev)!r} is not available on this machine; available: {', '.join(have)}")
    return dev


def check_memory(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a run whose samples alone (n × prod(dims) × itemsize) exceed the device's memory (the
    machine's RAM on the CPU), before allocating them; larger runs belong in ``sample_to_dir``."""
    need = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device.index or 0).total_memory
        where = f"{device}'s memory"
    else:
        try:
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # no sysconf here: no check
            return
        where = "this machine's memory"
    if need > have:
        raise ValueError(
            f"shape {shape} in {str(dtype).removeprefix('torch.')} needs {need / 2**30:.3g} GiB for the samples "
            f"alone, more than {where} ({have / 2**30:.3g} GiB): draw them in shards with fastsde.sample_to_dir"
        )


def check_singular_start(score: Any, sde: SDE, spec: Any, t0: float, options: Any = None) -> None:
    """A start where m(t0) = 0 (a rectified flow's u = 1: pure noise, λ = −∞) needs the data prediction
    x̂0 there (the score is −x whatever the data), which every solver's first move from there uses (its
    own exact move, or the driver's shared one): a ValueError before any compute for a score without
    one (for ``fastsde.Levels``, the finest level's), and for mlem's p="auto", whose calibration pass
    moves by the score from T."""
    if float(sde.mean_coeff(torch.tensor([t0], dtype=torch.float64))[0]) != 0.0:
        return
    finest = scores_of(score)[-1]
    if data_prediction_of(finest) is None:
        why = ""
        if isinstance(finest, ClassifierGuidance):
            why = " (classifier guidance adds (σ²/m)·∇log p(y | x, t) to x̂0, 0·∞ at m = 0)"
        raise ValueError(
            f"a solve from t = {t0:g}, where m = 0 for {sde!r}, needs the data prediction x̂0 there, which the score "
            f"(−x at m = 0, whatever the data) cannot give: {type(finest).__name__} has no data_prediction(x, t)"
            f"{why}; use fastsde.VelocityScore for a velocity network, or start at t_start < {t0:g} (with x_init)"
        )
    if getattr(spec, "name", None) == "mlem" and isinstance(options, dict) and options.get("p") == "auto":
        raise ValueError(
            f"mlem's p='auto' calibrates with pilot moves by the coarsest score from T = {t0:g}, where m = 0 for "
            f"{sde!r} (x̂0 from the score is infinite there): give p explicitly (a list, number or callable)"
        )


def check_t_start(sde: SDE, t_start: Any, t_end: float, x_init: Any, solver: str | SolverSpec) -> float:
    """t_start as a float with T ≥ t_start > t_end; a t_start below T needs the image it starts from
    (x_init), and a solver whose artifact is fitted on the grid from T (an IIA table) cannot start elsewhere."""
    if t_start is None:
        return float(sde.T)
    t_start = as_python_number(t_start)
    if isinstance(t_start, bool) or not isinstance(t_start, (int, float)):
        raise ValueError(f"t_start must be a number with T = {sde.T:g} >= t_start > t_end = {t_end:g}, got {t_start!r}")
    sde.check_time("t_start", t_start)
    if not t_end < t_start <= sde.T:
        raise ValueError(f"t_start must satisfy T = {sde.T:g} >= t_start > t_end = {t_end:g}, got {t_start!r}")
    if x_init is None:
        raise ValueError(
            "t_start needs x_init: the clean image to noise to t_start (or the noised state with x_init_noised=True)"
        )
    spec = get_solver(solver)
    from_T = [cls for cls in spec.artifact_options().values() if cls.starts_at_T]
    if from_T and t_start != sde.T:
        raise ValueError(
            f"{spec.name} uses a {from_T[0].noun} fitted on the grid from T = {sde.T:g}: it cannot start at "
            f"t_start = {t_start:g}"
        )
    return float(t_start)


def check_artifacts(
    spec: SolverSpec, opts: dict[str, Any], score: Any, shape: tuple[int, ...], cond: Any, dtype, device
) -> None:
    """The fitted artifacts among the run's options (``spec.artifacts``: a fitted grid, an IIA table, an
    ML-EM schedule) against the run's model, before any compute; their keys were checked against the
    solver's options by ``spec.resolve``. A fitted grid is checked only against one plain score
    without ``cond`` (``plain_score_only``)."""
    for artifact in spec.artifacts(opts):
        if artifact.plain_score_only and (is_hierarchy(score) or cond is not None):
            continue
        artifact.check_model(score, shape[1:], dtype, device)


def sample(
    score: ScoreFn,
    sde: SDE,
    shape: Sequence[int],
    solver: str | SolverSpec = DEFAULT_SOLVER,
    seed: int | Sequence[int] | NoiseSource = 0,
    *,
    t_end: float | None = None,
    denoise: bool = True,
    callback: Callable[[StepInfo], Any] | None = None,
    progress: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    x_init: Tensor | None = None,
    cond: Tensor | dict[str, Tensor] | None = None,
    t_start: float | None = None,
    x_init_noised: bool = False,
    recipe: Any = None,
    **options: Any,
) -> SampleResult:
    """Draw samples from the model given by ``score`` under the process ``sde``.

    Args:
        score: callable score(x, t) with one time per row of x.
        sde: the forward process the score belongs to.
        shape: (n, *dims).
        solver: a solver name (see ``fastsde.SOLVERS``) or a SolverSpec; default ``DEFAULT_SOLVER``.
        seed: one int, one int per sample, or a NoiseSource; sample i's noise depends only on its seed
            (the samples are the same bits at any batch size only where docs/getting-started.md says so).
        t_end: end time of the solve (default: the process's ε). ``t_end=0`` (where σ(0) = 0, with a
            fixed-grid solver on grid "uniform" or "quadratic"): the grid of steps + 1 points runs to 0 and
            its last move is the denoise, taken at its last interior point (diffusers' and k-diffusion's
            final step to σ = 0); best at few NFE.
        denoise: apply the Tweedie denoise at t_end (1 NFE, counted).
        callback: called with a StepInfo after each step; return False to stop early.
        progress: show a tqdm progress bar.
        dtype, device: where the solve runs (default float32 on CPU; float64 works).
        x_init: without t_start, start from this state at T instead of a prior draw; with t_start, the
            clean image to start from (SDEdit / img2img), noised to m(t_start)·x_init + σ(t_start)·z with
            z the keyed prior noise of each sample (the same z for any batch size).
        cond: per-sample conditioning, one row per sample: a tensor, passed to the score as the keyword
            ``cond``, or a dict of tensors, passed as keywords: ``score(x, t, **cond_rows)`` with the rows
            of exactly the samples the score evaluates (compaction and finished samples included).
        t_start: start the solve at this time (T ≥ t_start > t_end; default T); needs x_init.
        x_init_noised: x_init is already the state at t_start (not noised again).
        recipe: a recipe from ``fastsde.tune`` (or its folder): the solver, options, fitted grid and table
            it chose for ``steps`` NFE (``steps=`` required); refused for another model or process.
        **options: solver options; unknown names are a ValueError listing the valid ones.
    """
    if recipe is not None:
        solver, options = recipe_run(recipe, score, sde, shape, solver, options, dtype, device)
    shape, spec, t_end, denoise = check_run(score, sde, shape, solver, t_end, denoise, options)
    opts = spec.resolve(sde, options, t_end)
    dtype = check_dtype(dtype)
    device = check_device(device)
    check_memory(shape, dtype, device)
    n = shape[0]
    noise = as_noise_source(seed, n)
    seed_record = _seed_record(seed)
    if x_init is not None and (not isinstance(x_init, Tensor) or tuple(x_init.shape) != shape):
        got = tuple(x_init.shape) if isinstance(x_init, Tensor) else type(x_init).__name__
        raise ValueError(f"x_init must have shape {shape}, got {got}")
    if not isinstance(x_init_noised, bool):
        raise ValueError(f"x_init_noised must be True or False, got {x_init_noised!r}")
    t0 = check_t_start(sde, t_start, float(t_end), x_init, spec.name)
    if t0 != sde.T and "grid" in opts and not isinstance(opts["grid"], (str, Tensor, list, tuple)):
        raise ValueError(
            f"t_start = {t0:g} needs a named grid or an explicit one that starts at t_start (a fitted grid's times "
            f"run from T), got grid={opts['grid']!r}"
        )
    check_singular_start(score, sde, spec, t0, opts)
    cond_kw = check_cond(with_null_rows(score, cond, n), n, device)  # CFG's per-sample null rows follow too
    if cond_kw is not None and is_hierarchy(score) and opts.get("p") == "auto":
        raise ValueError("p='auto' calibrates on pilot samples that have no conditioning: give p explicitly with cond=")

    check_artifacts(spec, opts, score, shape, cond_kw, dtype, device)  # the models they were fitted for
    counted = counter_for(score, n, cond_kw, defer_finite_checks(device))
    t_last = float(t_end) if t_end != 0 else zero_end_time(sde, spec, opts, t0)
    ctx = SolverContext(
        sde=sde, score=counted, noise=noise, t_start=t0, t_end=t_last, callback=callback, progress=progress,
        denoise_is_final_move=t_end == 0,
    )  # fmt: skip
    start = time.perf_counter()
    with torch.no_grad():
        if x_init is None:
            x = sde.prior_sample(noise.normal(shape[1:], Stream.PRIOR, 0, dtype=dtype, device=device))
        elif t_start is None or x_init_noised:
            x = x_init.to(device, dtype)
        else:  # SDEdit: the clean image diffused to t_start with the sample's keyed noise
            x = noise_image(sde, x_init.to(device, dtype), t0, noise)
        x = spec.run(ctx, x, **opts)
        if denoise and not ctx.stopped:
            t = ctx.times(ctx.t_end, x)
            x = sde.denoise(x, t, counted(x, t))
        counted.flush()  # deferred NaN/Inf checks (accelerators)
    wall = time.perf_counter() - start
    start_record = {} if t_start is None else {"t_start": t0, "x_init_noised": x_init_noised}
    if t_end == 0:
        start_record["t_last"] = t_last  # where the denoise (the move to σ = 0) was taken
    multilevel = counted.accounting(denoised=denoise and not ctx.stopped)  # None for one score
    if multilevel is not None:
        ctx.stats["nfe_per_level_per_sample"] = counted.nfe_per_level_per_sample
    return SampleResult(
        samples=x,
        nfe=counted.nfe,
        nfe_per_sample=counted.nfe_per_sample.clone(),
        calls=counted.calls,
        solver=spec.name,
        options={**opts, "t_end": float(t_end), "denoise": denoise, "sde": sde.config(), "n": n, **start_record},
        wall_time=wall,
        stats=dict(ctx.stats, rows_evaluated=counted.rows_evaluated),
        stopped_early=ctx.stopped,
        cost=counted.compute,
        seed=seed_record,
        dtype=str(dtype).removeprefix("torch."),
        device=str(x.device),
        nfe_per_level=None if multilevel is None else counted.nfe_per_level,
        multilevel=multilevel,
        network_evals=counted.network_evals,
    )


def recipe_run(
    recipe: Any, score: Any, sde: SDE, shape: Any, solver: Any, options: dict[str, Any], dtype: Any, device: Any
) -> tuple[str, dict[str, Any]]:
    """The solver and options a recipe chose for ``options['steps']`` NFE, after checking that it was tuned
    for this process, sample shape and model; the caller's other options are kept."""
    from .artifacts.recipe import Recipe, load_recipe

    if isinstance(recipe, (str, os.PathLike)):
        recipe = load_recipe(recipe)
    if not isinstance(recipe, Recipe):
        raise ValueError(f"recipe must be a fastsde.tune result or its folder, got {type(recipe).__name__}")
    if solver != DEFAULT_SOLVER:
        raise ValueError(f"give either recipe= or solver= (the recipe chooses the solver), got solver={solver!r}")
    if "steps" not in options:
        raise ValueError(f"a recipe needs steps= (one of its budgets, in NFE: {recipe.budgets})")
    clash = sorted({"grid", "table"} & set(options))
    if clash:
        raise ValueError(f"{clash} come from the recipe; remove them")
    shape = check_shape(shape)
    recipe.check_for(score, sde, shape[1:], check_dtype(dtype), device)
    chosen, chosen_options = recipe.choose(options["steps"])
    return chosen, {**chosen_options, **{k: v for k, v in options.items() if k != "steps"}}


def noise_image(sde: SDE, x0: Tensor, t: float, noise: NoiseSource) -> Tensor:
    """x0 diffused to time t: m(t)·x0 + σ(t)·z, z the keyed prior noise (sample i's own for any batch)."""
    z = noise.normal(x0.shape[1:], Stream.PRIOR, 0, dtype=x0.dtype, device=x0.device)
    tt = torch.full((x0.shape[0],), float(t), dtype=torch.float64)
    m = sde.mean_coeff(tt).to(x0.device, x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
    sig = sde.marginal_std(tt).to(x0.device, x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
    return m * x0 + sig * z


def defer_finite_checks(device: torch.device | str | None) -> bool:
    """Defer the score's NaN/Inf checks off the host on accelerators (no synchronisation per step);
    check at once on the CPU, where it costs nothing."""
    return device is not None and torch.device(device).type != "cpu"


def _seed_record(seed: Any) -> int | list[int] | None:
    """The seed as JSON-ready data: an int, a list of ints, or None for a NoiseSource."""
    if isinstance(seed, NoiseSource):
        return None
    if isinstance(seed, numbers.Integral):
        return int(seed)
    return [int(s) for s in (seed.tolist() if hasattr(seed, "tolist") else seed)]

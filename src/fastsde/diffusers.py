"""fastsde inside diffusers: a scheduler for every fixed-grid solver, and whole pipelines sampled by any
fastsde solver (adaptive ones included).

:class:`FastSDEScheduler` is a diffusers scheduler (``set_timesteps`` / ``timesteps`` / ``step``), so a
pipeline takes it as it is::

    pipe.scheduler = FastSDEScheduler.from_config(pipe.scheduler.config, solver="unipc")

How it works: a pipeline's loop hands the scheduler one network output per call, while a fastsde solver
calls its score function, several times per move for some methods. The scheduler runs the solve
(``fastsde.sample``, unchanged: same stepper, same counting, same keyed noise) in a worker thread whose
score function is the pipeline: each evaluation the solver asks for is returned to the pipeline as
``prev_sample`` at the next entry of ``timesteps``, and the network output the pipeline passes to
``step`` is that evaluation's answer. So the samples are exactly ``fastsde.sample``'s for the same
network, and ``timesteps`` lists every evaluation (a second-order method's intermediate points
included); one ``step`` call is one evaluation. Multistep history lives in the solve of one pipeline
call; ``set_timesteps`` ends any solve in flight and starts afresh.

:func:`sample_pipeline` runs a whole ``DDPMPipeline`` / ``DDIMPipeline`` / Stable-Diffusion-style
text-to-image pipeline through ``fastsde.sample`` instead (any solver, adaptive and compaction included;
per-sample prompts and negative prompts follow the rows) and returns the pipeline's images with
fastsde's accounting.
"""

from __future__ import annotations

import inspect
import math
import numbers
import queue
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from torch import Tensor

from .api import SampleResult, sample
from .artifacts import FittedGrid, IIATable
from .integrations.pipelines import PipelineResult, sample_pipeline
from .score import DiffusersUNetScore, broadcast_to_rows
from .sde import SDE, DiscreteVPSDE, RectifiedFlow
from .solvers import SOLVERS

__all__ = ["FastSDEScheduler", "PipelineResult", "sample_pipeline"]

#: source schedulers whose n timesteps are n points over [0, N − 1] (DDIM / DDPM); the multistep
#: solvers (DPM-Solver, UniPC, DEIS, ...) take n + 1 points and drop the last
_DDIM_RULE_SOURCES = (
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "DDIMParallelScheduler",
    "DDPMParallelScheduler",
)
_RULES = ("dpmsolver", "ddim")
_SPACINGS = ("linspace", "leading", "trailing")
_PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow_prediction")


class _Cancelled(Exception):
    """Raised inside a worker's score call when its solve is abandoned (set_timesteps again)."""


class _OutputScore(DiffusersUNetScore):
    """The score of a network output handed over from elsewhere (the pipeline, a dry run): the
    conversions of :class:`~fastsde.score.DiffusersUNetScore` around ``source(x, t)``."""

    def __init__(self, source: Any, sde: SDE, prediction_type: str) -> None:
        super().__init__(None, sde, prediction_type)  # type: ignore[arg-type]
        self.source = source

    def network_output(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        return self.source(x, t).to(x.dtype)


class _Solve:
    """One pipeline call's solve: ``fastsde.sample`` in a worker thread whose score asks the pipeline."""

    def __init__(self, run: Any) -> None:
        self.requests: queue.Queue = queue.Queue(maxsize=1)  # worker → pipeline
        self.replies: queue.Queue = queue.Queue(maxsize=1)  # pipeline → worker
        self.finished = False
        self._thread = threading.Thread(target=self._work, args=(run,), daemon=True, name="fastsde-scheduler")
        self._thread.start()

    def _work(self, run: Any) -> None:
        try:
            self.requests.put(("done", run(self._ask)))
        except _Cancelled:
            return
        except BaseException as exc:  # handed to the pipeline's thread, raised there
            self.requests.put(("error", exc))

    def _ask(self, x: Tensor, t: Tensor) -> Tensor:
        self.requests.put(("eval", x, t))
        out = self.replies.get()
        if out is None:
            raise _Cancelled
        return out

    def next_request(self) -> tuple:
        item = self.requests.get()
        if item[0] in ("error", "done"):
            self.finished = True
            self._thread.join()
        if item[0] == "error":
            raise item[1]
        return item

    def answer(self, output: Tensor) -> tuple:
        self.replies.put(output)
        return self.next_request()

    def cancel(self) -> None:
        """End the worker (it is waiting for an answer, or already done)."""
        if not self.finished and self._thread.is_alive():
            self.replies.put(None)
            self._thread.join(timeout=10)
        self.finished = True


def _source_class(cfg: Mapping[str, Any]) -> str:
    """The kind of scheduler a config dict without ``_class_name`` (``scheduler.config``) comes from, by
    its fields: a flow-matching one, one of the DDIM rule (DDIM, DDPM, PNDM), or a multistep solver."""
    if "beta_start" not in cfg and "shift" in cfg:
        return "FlowMatchEulerDiscreteScheduler"
    if "solver_order" not in cfg and any(k in cfg for k in ("set_alpha_to_one", "variance_type", "skip_prk_steps")):
        return "DDIMScheduler"
    return ""


def _spacing_timesteps(rule: str, spacing: str, n_train: int, n: int, offset: int) -> np.ndarray:
    """The n inference timesteps of a DDPM-family scheduler (decreasing): diffusers' spacing rules,
    ``rule='ddim'`` (DDIM / DDPM: n points) or ``'dpmsolver'`` (multistep solvers: n + 1, last dropped)."""
    k = n if rule == "ddim" else n + 1
    if spacing == "linspace":
        ts = np.linspace(0, n_train - 1, k).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, k) * (n_train // k)).round()[::-1] + offset
    else:  # trailing
        ts = np.round(np.arange(n_train, 0, -n_train / n)) - 1
        k = n
    ts = ts[:n].astype(np.float64)
    if len(np.unique(ts)) != n or ts.min() < 0 or ts.max() > n_train - 1:
        raise ValueError(
            f"{n} inference steps with timestep_spacing={spacing!r} do not give {n} distinct timesteps in "
            f"[0, {n_train - 1}]: use fewer steps or another spacing"
        )
    return ts


class FastSDEScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that runs a fastsde fixed-grid solver (see the module docstring).

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the training schedule, as
            in diffusers' DDPM-family schedulers (the process is fastsde's :class:`DiscreteVPSDE` of its
            ᾱ table, exact at the training timesteps).
        prediction_type: "epsilon", "sample", "v_prediction", or "flow_prediction" (``process="flow"``).
        timestep_spacing, steps_offset: diffusers' spacing of the inference timesteps ("linspace",
            "leading", "trailing").
        timestep_rule: "dpmsolver" (n + 1 points, last dropped: DPM-Solver, UniPC, DEIS) or "ddim" (n
            points: DDIM, DDPM, PNDM); :meth:`from_config` takes the source scheduler's.
        solver: a fastsde solver with a fixed number of evaluations per move (``fastsde.SOLVERS``).
        solver_options: its options (``steps`` and ``grid`` come from ``set_timesteps``).
        grid: None (the diffusers spacing above), a fastsde grid name ("edm", "logsnr", ...), or a fitted
            grid (``fastsde.fit_grid``); a grid name or fitted grid runs from the process's T.
        table: an IIA table for the ``iia_*`` solvers (with their own grid, from T).
        model: the network (the pipeline's unet), needed only with a fitted grid or table, whose model
            key is checked against it.
        process: "vp" (DDPM family) or "flow" (rectified flow; the fields below as in diffusers'
            ``FlowMatchEulerDiscreteScheduler``).
        seed: the noise seed of stochastic solvers when ``step`` is given no generator (default: drawn
            from torch's global generator, as diffusers' schedulers draw).

    After the last ``step``, :attr:`result` is the run's :class:`~fastsde.SampleResult` (NFE, config).
    """

    _compatibles = [
        "DDIMScheduler",
        "DDPMScheduler",
        "PNDMScheduler",
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "UniPCMultistepScheduler",
        "DEISMultistepScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "HeunDiscreteScheduler",
        "LMSDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "SASolverScheduler",
        "FlowMatchEulerDiscreteScheduler",
    ]
    ignore_for_config = ["grid", "table", "model"]
    order = 1

    @register_to_config
    def __init__(
        self,
        *,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | np.ndarray | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        timestep_rule: str = "dpmsolver",
        solver: str = "dpmpp_2m",
        solver_options: Mapping[str, Any] | None = None,
        grid: str | FittedGrid | None = None,
        table: IIATable | None = None,
        model: torch.nn.Module | None = None,
        process: str = "vp",
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        seed: int | None = None,
    ) -> None:
        self._check_config()
        self.grid_choice = grid
        self.table = table
        self.model = model
        self.timesteps: Tensor = torch.zeros(0)
        self.num_inference_steps: int | None = None
        self.init_noise_sigma = 1.0
        self.result: SampleResult | None = None
        self._solve: _Solve | None = None
        self._plan: dict[str, Any] | None = None
        self._index = 0
        self._begin_index: int | None = None
        self._last: Tensor | None = None
        self._n_requested: int | None = None
        self.sde: SDE = self._train_process(None)

    # -- configuration ------------------------------------------------------------------------
    def _check_config(self) -> None:
        c = self.config
        if c.process not in ("vp", "flow"):
            raise ValueError(f"process must be 'vp' or 'flow', got {c.process!r}")
        if c.prediction_type not in _PREDICTIONS:
            raise ValueError(f"prediction_type must be one of {list(_PREDICTIONS)}, got {c.prediction_type!r}")
        if (c.prediction_type == "flow_prediction") != (c.process == "flow"):
            raise ValueError(
                f"prediction_type={c.prediction_type!r} does not fit process={c.process!r}: a flow-matching model "
                "(process='flow') predicts 'flow_prediction', a DDPM-family one epsilon / sample / v_prediction"
            )
        if c.timestep_spacing not in _SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {list(_SPACINGS)}, got {c.timestep_spacing!r}")
        if c.timestep_rule not in _RULES:
            raise ValueError(f"timestep_rule must be one of {list(_RULES)}, got {c.timestep_rule!r}")
        n = c.num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {n!r}")
        if c.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {c.solver!r}")
        spec = SOLVERS[c.solver]
        if spec.nfe_per_step is None or c.solver == "mlem":
            fixed = sorted(k for k, s in SOLVERS.items() if s.nfe_per_step is not None and k != "mlem")
            raise ValueError(
                f"solver {c.solver!r} has no fixed number of evaluations, which a pipeline's timestep loop needs: "
                f"use one of {fixed}, or run the whole pipeline with fastsde.diffusers.sample_pipeline"
            )
        opts = dict(c.solver_options or {})
        for key in ("steps", "grid", "table"):
            if key in opts:
                raise ValueError(
                    f"solver_options[{key!r}] is set by the scheduler (set_timesteps' steps, grid=, table=): remove it"
                )
        unknown = sorted(set(opts) - set(spec.options))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for solver {c.solver!r}; valid: {sorted(spec.options)}")

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """From another scheduler's config (``pipe.scheduler.config``): its training schedule, prediction
        type and spacing, the spacing rule of its class, ``process="flow"`` for a flow-matching one."""
        cfg = dict(getattr(config, "config", config) or {})
        cfg.pop("_use_default_values", None)  # the source's defaults are its settings here (its spacing, ...)
        source = str(cfg.get("_class_name", "")) or _source_class(cfg)
        if source.startswith("FlowMatch"):
            kwargs.setdefault("process", "flow")
            kwargs.setdefault("prediction_type", "flow_prediction")
        elif "timestep_rule" not in cfg:
            kwargs.setdefault("timestep_rule", "ddim" if source in _DDIM_RULE_SOURCES else "dpmsolver")
        named = str(cfg.get("_class_name", "")) or "the source scheduler"
        for key in ("clip_sample", "thresholding"):
            if cfg.get(key) and source != cls.__name__:
                warnings.warn(
                    f"{named} has {key}=True: FastSDEScheduler does not clip or "
                    "threshold x̂0 (the fastsde solver's samples are returned as they are)",
                    stacklevel=2,
                )
        return super().from_config(cfg, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def from_recipe(
        cls, recipe: Any, steps: int, config: Any = None, *, model: torch.nn.Module, **kwargs: Any
    ) -> FastSDEScheduler:
        """The scheduler of a recipe's choice for ``steps`` NFE (``fastsde.tune``), on the training schedule
        of ``config`` (``pipe.scheduler.config``); ``model`` (the pipeline's network) is checked against the
        model the recipe was tuned for. ``set_timesteps(steps)`` then runs that choice."""
        from .artifacts.recipe import Recipe, load_recipe

        recipe = load_recipe(recipe) if not isinstance(recipe, Recipe) else recipe
        solver, options = recipe.choose(steps)
        grid, table = options.pop("grid", None), options.pop("table", None)
        options.pop("steps", None)
        base = cls.from_config(config or {}, solver=solver, solver_options=options or None, **kwargs)
        if grid is None:  # the solver's own default grid, on which the recipe measured it
            grid = SOLVERS[solver].options["grid"].default_for(base.sde)
        names = inspect.signature(cls.__init__).parameters
        settings = {k: v for k, v in base.config.items() if k in names and k not in cls.ignore_for_config}
        sched = cls(**settings, grid=grid, table=table, model=model)
        shape = tuple(recipe.key["shape"])
        recipe.check_for(DiffusersUNetScore(model, sched.sde, sched.config.prediction_type), sched.sde, shape,
                         next(model.parameters()).dtype, next(model.parameters()).device)  # fmt: skip
        return sched

    def _train_process(self, mu: float | None) -> SDE:
        c = self.config
        if c.process == "flow":
            cfg = {k: c[k] for k in ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
                                     "base_image_seq_len", "max_image_seq_len", "time_shift_type", "shift_terminal")}  # fmt: skip
            if cfg["use_dynamic_shifting"] and mu is None:
                return RectifiedFlow(1.0)  # placeholder until set_timesteps gives mu
            return RectifiedFlow.from_diffusers_scheduler(cfg, mu=mu)
        from diffusers import DDPMScheduler

        if (
            c.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
            and c.trained_betas is None
        ):
            raise ValueError(
                f"beta_schedule must be 'linear', 'scaled_linear', 'squaredcos_cap_v2' or 'sigmoid', got {c.beta_schedule!r}"
            )
        train = DDPMScheduler(
            num_train_timesteps=c.num_train_timesteps,
            beta_start=c.beta_start,
            beta_end=c.beta_end,
            beta_schedule=c.beta_schedule,
            trained_betas=c.trained_betas,
        )
        return DiscreteVPSDE(train.alphas_cumprod.to(torch.float64))

    # -- the diffusers scheduler interface ----------------------------------------------------------
    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """The network takes the state as it is (VP and flow states are unscaled)."""
        return sample

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next solve at ``timesteps[begin_index]`` (image-to-image pipelines)."""
        if begin_index and SOLVERS[self.config.solver].nfe_per_step != 1:
            raise ValueError(
                f"set_begin_index({begin_index}) needs a solver with one evaluation per move, got {self.config.solver!r}"
            )
        self._begin_index = int(begin_index)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Plan the solve: its grid, and ``timesteps``, the network's timestep at each evaluation.
        Any solve in flight is ended (no history crosses pipeline calls)."""
        self._reset()
        if self.config.process == "flow" and self.config.use_dynamic_shifting and mu is None:
            raise ValueError(
                "this scheduler uses dynamic shifting (use_dynamic_shifting=True): set_timesteps needs mu= (FLUX-style "
                "pipelines pass it; fastsde.RectifiedFlow.dynamic_mu computes it from the image sequence length)"
            )
        self.sde = self._train_process(mu)
        self._n_requested = num_inference_steps
        grid_times = self._grid(num_inference_steps, timesteps, sigmas)
        evals = self._evaluation_times(grid_times)
        labels = self._labels(evals)
        self.num_inference_steps = int(grid_times.numel()) if grid_times is not None else int(num_inference_steps)
        self.timesteps = labels.to(device) if device is not None else labels
        self._plan = {"grid": grid_times, "evals": evals}

    def _reset(self) -> None:
        if self._solve is not None:
            self._solve.cancel()
        self._solve, self._index, self._last, self.result, self._begin_index = None, 0, None, None, None

    def _grid(self, n: int | None, timesteps: Any, sigmas: Any) -> Tensor | None:
        """The grid's process times (float64), or None when a fastsde grid (name, fitted, table) is used."""
        c, sde = self.config, self.sde
        given = [name for name, v in (("timesteps", timesteps), ("sigmas", sigmas)) if v is not None]
        if self.grid_choice is not None or self.table is not None:
            if given:
                raise ValueError(f"{given[0]}= cannot be combined with the scheduler's grid= / table=")
            if isinstance(self.grid_choice, FittedGrid):
                if n is not None and n != self.grid_choice.steps:
                    raise ValueError(
                        f"the fitted grid has {self.grid_choice.steps} points, set_timesteps was given {n}"
                    )
                return None
            if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 2:
                raise ValueError(f"num_inference_steps must be an integer >= 2, got {n!r}")
            if self.table is not None and n != self.table.steps:
                raise ValueError(f"the IIA table was fitted for {self.table.steps} steps, set_timesteps was given {n}")
            return None
        if len(given) > 1:
            raise ValueError("give at most one of timesteps= and sigmas=")
        if c.process == "flow":
            if timesteps is not None:
                raise ValueError(
                    "a flow-matching FastSDEScheduler takes sigmas= (the unshifted σ list), not timesteps="
                )
            if sigmas is None:
                if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
                    raise ValueError(f"num_inference_steps must be a positive integer, got {n!r}")
                u = torch.linspace(1.0, float(sde.default_t_end), int(n), dtype=torch.float64)
            else:
                u = _decreasing("sigmas", sigmas, 0.0, 1.0)
            if u.numel() < 2:
                raise ValueError("a flow-matching solve needs at least 2 inference steps")
            return u
        n_train = c.num_train_timesteps
        if timesteps is not None:
            ts = _decreasing("timesteps", timesteps, 0.0, n_train - 1).numpy()
        else:
            if not isinstance(n, numbers.Integral) or isinstance(n, bool) or not 2 <= n <= n_train:
                raise ValueError(f"num_inference_steps must be an integer in [2, {n_train}], got {n!r}")
            ts = _spacing_timesteps(c.timestep_rule, c.timestep_spacing, n_train, int(n), int(c.steps_offset))
        return torch.from_numpy((ts + 1.0) / n_train)  # DiscreteVPSDE: timestep i sits at t = (i + 1)/N

    def _run_kwargs(self, grid_times: Tensor | None) -> dict[str, Any]:
        """sample()'s keywords for this plan: the options (steps, grid, table) and the grid's ends."""
        opts = dict(self.config.solver_options or {})
        if self.table is not None:
            opts.update(table=self.table, steps=self.table.steps)
        if grid_times is not None:
            t0 = float(grid_times[0])
            opts.update(grid=grid_times, steps=int(grid_times.numel()))
            # t_end = 0: the grid's last point is the last evaluation before the move to σ = 0, which is the
            # denoise (diffusers' final step to ᾱ = 1 / σ = 0; lower-order rules count it as the last move)
            return {"options": opts, "t_start": None if t0 == self.sde.T else t0, "t_end": 0.0}
        if isinstance(self.grid_choice, FittedGrid):
            opts.update(grid=self.grid_choice, steps=self.grid_choice.steps)
        else:
            if isinstance(self.grid_choice, str):
                opts["grid"] = self.grid_choice
            opts.setdefault("steps", self._n_requested)
        return {"options": opts, "t_start": None, "t_end": None}

    def _evaluation_times(self, grid_times: Tensor | None) -> Tensor:
        """Every time at which the solver evaluates the network on this plan, from a dry run on one
        scalar sample with a zero network (the times of a fixed-grid solve do not depend on the values)."""
        seen: list[float] = []

        def zero(x: Tensor, t: Tensor) -> Tensor:
            seen.append(float(t[0]))
            return torch.zeros_like(x)

        kw = self._run_kwargs(grid_times)
        opts = dict(kw["options"])
        if isinstance(opts.get("grid"), FittedGrid):
            opts["grid"] = opts["grid"].times  # the dry run has no model to check the grid against
        opts.pop("table", None)  # an IIA table changes coefficients, never the times
        score = _OutputScore(zero, self.sde, self.config.prediction_type)
        start = {} if kw["t_start"] is None else {"t_start": kw["t_start"]}
        x = torch.zeros(1, 1, dtype=torch.float64)
        sample(score, self.sde, (1, 1), self.config.solver, seed=0, x_init=x, x_init_noised=True,
               dtype=torch.float64, t_end=kw["t_end"], **start, **opts)  # fmt: skip
        return torch.tensor(seen, dtype=torch.float64)

    def _labels(self, evals: Tensor) -> Tensor:
        """The network's timestep at each evaluation: diffusers' integer timesteps at grid points of a
        DDPM-family schedule (fractional between them), 1000·σ for a flow."""
        if self.config.process == "flow":
            return (self.sde.marginal_std(evals) * self.config.num_train_timesteps).to(torch.float32)
        labels = self.sde.timestep(evals)
        rounded = labels.round()
        if bool(((labels - rounded).abs() < 1e-6).all()):
            return rounded.to(torch.int64)
        return labels.to(torch.float32)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def step(
        self,
        model_output: Tensor,
        timestep: Any,
        sample: Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        eta: float = 0.0,
        **unused: Any,
    ) -> SchedulerOutput | tuple:
        """Hand the network's output at ``timesteps[i]`` to the solve and return the state at the next
        evaluation (the final samples after the last)."""
        if self._plan is None:
            raise ValueError("call set_timesteps before step")
        if eta:
            raise ValueError(
                f"eta={eta!r}: choose the fastsde solver's own stochasticity (e.g. solver_options) instead"
            )
        begin = self._begin_index or 0
        i = self._index + begin
        if i >= len(self.timesteps) or (self._solve is not None and self._solve.finished):
            raise ValueError("step called after the last timestep: call set_timesteps to start a new solve")
        expected = self.timesteps[i]
        got = timestep if isinstance(timestep, Tensor) else torch.tensor(timestep)
        if not math.isclose(float(got), float(expected), rel_tol=1e-6, abs_tol=1e-6):
            raise ValueError(
                f"step was given timestep {float(got)!r}, the solve's next evaluation is at {float(expected)!r}"
            )
        if self._solve is None:
            self._start(sample, generator, begin)
        elif sample is not self._last and not torch.equal(sample, self._last):
            raise ValueError(
                "the pipeline changed the sample between steps (inpainting-style blending): FastSDEScheduler "
                "continues the solver's own state and cannot take a changed one"
            )
        t = self._plan["evals"][i]
        x0 = self._x0(model_output, sample, t)
        kind, *rest = self._solve.answer(model_output)
        self._index += 1
        if kind == "done":
            self.result = rest[0]
            out = self.result.samples.to(sample.dtype)
        else:
            out = rest[0]
        self._last = out
        return _Output(prev_sample=out, pred_original_sample=x0) if return_dict else (out,)

    def _x0(self, model_output: Tensor, sample: Tensor, t: Tensor) -> Tensor:
        """x̂0 of the network output at (sample, t)."""
        tt = torch.full((sample.shape[0],), float(t), dtype=torch.float64)  # coefficients in float64 on the CPU
        on_device = tt.to(sample.device, sample.dtype)
        score = _OutputScore(lambda x, _: model_output, self.sde, self.config.prediction_type)
        pred = score.data_prediction
        if pred is not None:
            return pred(sample, on_device)
        m = broadcast_to_rows(self.sde.mean_coeff(tt).to(sample.device, sample.dtype), sample)
        sig = broadcast_to_rows(self.sde.marginal_std(tt).to(sample.device, sample.dtype), sample)
        return (sample + sig**2 * score(sample, on_device)) / m

    def _start(self, x_t: Tensor, generator: Any, begin: int) -> None:
        """Start the worker: fastsde.sample from the pipeline's first state, noise from its generator."""
        grid = self._plan["grid"]
        if begin:
            if grid is None:
                raise ValueError("set_begin_index needs the diffusers spacing (no grid= / table=)")
            grid = grid[begin:]
            if grid.numel() < 2:
                raise ValueError(f"begin index {begin} leaves fewer than 2 grid points")
        kw = self._run_kwargs(grid)
        c = self.config
        seed = self._seed(generator, x_t.shape[0])
        start = {} if kw["t_start"] is None else {"t_start": kw["t_start"]}
        score = _OutputScore(None, self.sde, c.prediction_type)
        if self.model is not None:
            score.fingerprint_of = DiffusersUNetScore(self.model, self.sde, c.prediction_type)
        elif self.table is not None or isinstance(self.grid_choice, FittedGrid):
            raise ValueError(
                "a fitted grid or IIA table is checked against its model: pass model=pipe.unet to FastSDEScheduler"
            )
        solver, sde, shape = c.solver, self.sde, tuple(x_t.shape)

        def run(ask: Any) -> SampleResult:
            score.source = ask
            return sample(score, sde, shape, solver, seed=seed, x_init=x_t, x_init_noised=True, t_end=kw["t_end"],
                          dtype=x_t.dtype, device=x_t.device, **start, **kw["options"])  # fmt: skip

        self._solve = _Solve(run)
        kind, *rest = self._solve.next_request()
        if kind != "eval":
            raise RuntimeError("the solve ended before its first evaluation")

    def _seed(self, generator: Any, n: int) -> int | list[int]:
        """Seeds of a stochastic solver: one per sample from a list of generators, one for the batch
        from a generator (sample i keyed by it), the config's seed, or one from torch's global generator."""
        c = self.config
        if not SOLVERS[c.solver].is_stochastic(dict(c.solver_options or {})):
            return 0

        def draw(g: Any) -> int:
            return int(torch.randint(0, 2**62, (1,), generator=g, device=getattr(g, "device", "cpu")).item())

        if isinstance(generator, (list, tuple)):
            if len(generator) != n:
                raise ValueError(f"got {len(generator)} generators for a batch of {n}")
            return [draw(g) for g in generator]
        if generator is not None:
            return draw(generator)
        if c.seed is not None:
            return int(c.seed)
        return int(torch.randint(0, 2**62, (1,)).item())

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The forward process at ``timesteps``: m·x0 + σ·noise (image-to-image pipelines)."""
        ts = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1).cpu()
        if self.config.process == "flow":
            sig = ts / self.config.num_train_timesteps
            m = 1.0 - sig
        else:
            tt = (ts + 1.0) / self.config.num_train_timesteps
            m, sig = self.sde.mean_coeff(tt), self.sde.marginal_std(tt)
        x = original_samples
        m = broadcast_to_rows(m.to(x.device, x.dtype), x) if m.numel() > 1 else m.item()
        sig = broadcast_to_rows(sig.to(x.device, x.dtype), x) if sig.numel() > 1 else sig.item()
        return m * x + sig * noise


@dataclass
class _Output(SchedulerOutput):
    """``prev_sample`` and the network's x̂0 at the step's input."""

    pred_original_sample: Tensor | None = None


def _decreasing(name: str, values: Any, lo: float, hi: float) -> Tensor:
    v = torch.as_tensor(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=torch.float64).reshape(
        -1
    )
    if v.numel() and float(v[-1]) == 0.0:
        v = v[:-1]  # a trailing 0 (σ = 0, diffusers' final step) is the final denoise
    if v.numel() < 2 or not bool(torch.isfinite(v).all()) or not bool((v[:-1] > v[1:]).all()):
        raise ValueError(f"{name} must be a strictly decreasing list of at least 2 finite values, got {values!r}")
    if float(v.min()) <= lo and name == "sigmas" or float(v.min()) < lo or float(v.max()) > hi:
        raise ValueError(f"{name} must lie in ({lo}, {hi}], got {v.tolist()}")
    return v

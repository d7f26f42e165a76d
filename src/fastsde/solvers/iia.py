"""IIA: improved integration approximation (Zhang, Niwa, Kleijn, ICLR 2024) on Heun, DDIM and
DPM-Solver++(2M).

An IIA step is the base solver's step plus a weighted sum of "free" directions, vectors built from the
model outputs the base step already computed (no extra NFE):

    x_{i+1} = Φ_i(x_i) + Σ_j β_{i,j} · g_{i,j}

with per-step coefficients β fitted once by least squares against the base solver run on fine
sub-steps of each step (``fastsde.fit_iia``) and stored in a keyed table
(``fastsde.artifacts.iia_table.IIATable``, which also names the directions).
With β = 0 (or ``table=None``) the output is the base solver's, bit for bit: the base stepper itself
takes the step, and its evaluations are recorded on the way (a recording wrapper around
``Step.score``), so the directions never cost a call.

Directions (fastsde's reading of the paper; x̂ data prediction, ε̂ = (x − m·x̂)/σ noise prediction):

- ``iia_heun`` (EDM coordinates x̃ = x/m, D the denoiser, D′ the denoiser at the Euler point):
  ``variant="iia"`` (IIA-EDM, r = 1): x̃_i − D_i, D′_i − D_i, and the same two of the previous step;
  ``variant="biia"`` (BIIA-EDM): the two Heun slopes d_i = (x̃_i − D_i)/σ_i and d′_i. Every move of
  fastsde's Heun is a Heun move (the last Euler step to σ = 0 is the front door's denoise), so D′
  exists on every step.
- ``iia_ddim``, ``iia_dpmpp_2m``: x̂_i, x̂_i − x̂_{i−1}, ε̂_i − ε̂_{i−1}. The current x̂_i (a fastsde
  choice) lets the first step be corrected too; the differences are the paper's IIA-DDIM terms.

Directions that do not exist yet (no history on the first step, or after a corrector moved the
sample) are zero. A table is checked against the run (it is the solver's declared artifact,
``SolverSpec.artifact``): process, solver, options, grid, steps and t_end when the options are resolved,
the model fingerprint by the front door, both before any compute.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..artifacts.iia_table import IIATable, iia_directions
from ..sde import SDE, broadcast_to_rows
from .core.context import SolverContext, solver_grid
from .core.controllers import FixedGrid
from .core.options import Option, boolean, grid_options, one_of
from .core.spec import SolverSpec
from .core.stepper import State, Step, Stepper, StepResult
from .ddim import DDIM, DDIMStepper
from .dpmpp_2m import DPMPP_2M, DPMSolverPP2M
from .heun import HEUN, Heun

__all__ = ["IIA_HEUN", "IIA_DDIM", "IIA_DPMPP_2M", "IIAStepper", "IIAHeun", "IIADDIM", "IIADPMPP2M"]

#: A fitting hook: (x, step, base proposal, directions) -> coefficients (rows, m) or (m,).
FitHook = Callable[[Tensor, Step, Tensor, list[Tensor | None]], Tensor]


class _Recorder:
    """Wraps ``Step.score``: records each (x, t, score) the base step evaluates, passes it through."""

    def __init__(self, score: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.score = score
        self.calls: list[tuple[Tensor, Tensor, Tensor]] = []

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        out = self.score(x, t)
        self.calls.append((x, t, out))
        return out


class IIAStepper(Stepper):
    """The base stepper's step plus Σ_j β_j·g_j; subclasses name the base and build the directions."""

    base_cls: type[Stepper]
    base_spec: SolverSpec
    #: the IIA solver's name, which names its directions (the columns of its table)
    solver: str
    #: the options of the base solver this stepper passes on (the rest are fixed at their defaults)
    base_keys: tuple[str, ...] = ("steps", "grid", "rho")

    @classmethod
    def directions(cls, options: Mapping[str, Any]) -> tuple[str, ...]:
        """The directions :meth:`build` returns, in order (named by the table format)."""
        return iia_directions(cls.solver, options)

    @classmethod
    def declared_order(cls, options: Mapping[str, Any]) -> float:
        return cls.base_cls.declared_order(options)

    @classmethod
    def declared_nfe(cls, options: Mapping[str, Any]) -> int:
        return cls.base_cls.declared_nfe(options)

    @classmethod
    def base_options(cls, sde: SDE, options: Mapping[str, Any], t_end: float) -> dict[str, Any]:
        """The base solver's resolved options for these IIA options."""
        return cls.base_spec.resolve(sde, {k: options[k] for k in cls.base_keys if k in options}, t_end)

    def __init__(self, ctx: SolverContext, options: Mapping[str, Any]) -> None:
        super().__init__(ctx, options)
        self.base = self.base_cls(ctx, self.base_options(ctx.sde, options, ctx.t_end))
        self.table = options.get("table")
        self.coefficients = None if self.table is None else self.table.coefficients
        self.fit_hook: FitHook | None = None

    def init(self, x: Tensor) -> tuple[State, Tensor | None]:
        state, bad = self.base.init(x)
        return {**state, **self.history_init(x)}, bad

    def reset(self, state: State, rows: Tensor) -> None:
        self.base.reset(state, rows)
        state["iia_has"][rows.to(state["iia_has"].device)] = 0.0

    def history_init(self, x: Tensor) -> State:
        return {"iia_has": torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)}

    def build(
        self, x: Tensor, s: Step, calls: list[tuple[Tensor, Tensor, Tensor]]
    ) -> tuple[list[Tensor | None], State]:
        """The directions of this step (None where one does not exist yet) and the new history."""
        raise NotImplementedError

    def parts(self, x: Tensor, s: Step) -> tuple[StepResult, list[Tensor | None]]:
        """The base step's result (its state merged with the new history) and the directions."""
        rec = _Recorder(s.score)
        res = self.base.step(x, dataclasses.replace(s, score=rec))
        dirs, history = self.build(x, s, rec.calls)
        res.state = {**res.state, **history}
        return res, dirs

    def step(self, x: Tensor, s: Step) -> StepResult:
        res, dirs = self.parts(x, s)
        if self.fit_hook is not None:
            beta = self.fit_hook(x, s, res.x, dirs)
        elif self.coefficients is not None:
            moves = self.coefficients.shape[0]
            beta = self.coefficients[s.index.clamp_max(moves - 1)]
        else:
            return res
        if beta.dim() == 1:
            beta = beta.expand(x.shape[0], -1)
        out = res.x
        for j, g in enumerate(dirs):
            b = beta[:, j]
            if g is None or not bool((b != 0).any()):
                continue
            out = out + broadcast_to_rows(b.to(device=x.device, dtype=x.dtype), x) * g
        res.x = out
        return res


def _had(s: Step, x: Tensor) -> Tensor:
    """1 where the row has history, broadcast over x."""
    return broadcast_to_rows(s.get("iia_has"), x)


def _keep(g: Tensor, has: Tensor) -> Tensor:
    """g where the row has history, exactly 0 elsewhere (no 0·garbage)."""
    return torch.where(has > 0, g, torch.zeros_like(g))


class IIAHeun(IIAStepper):
    """IIA-EDM / BIIA-EDM on EDM's Heun (deterministic, 2 NFE per move)."""

    base_cls = Heun
    base_spec = HEUN
    solver = "iia_heun"
    order = 2.0
    nfe_per_step = 2

    def history_init(self, x: Tensor) -> State:
        z = torch.zeros_like(x)
        return {**super().history_init(x), "iia_g1": z, "iia_g2": z.clone()}

    def build(
        self, x: Tensor, s: Step, calls: list[tuple[Tensor, Tensor, Tensor]]
    ) -> tuple[list[Tensor | None], State]:
        sde = self.sde
        (x0_in, t0, s0), (x1_in, t1, s1) = calls
        m_next = broadcast_to_rows(sde.mean_coeff(s.t_next), x)
        d0 = sde.denoise(x0_in, t0, s0)
        d1 = sde.denoise(x1_in, t1, s1)
        xt = x0_in / broadcast_to_rows(sde.mean_coeff(t0), x)
        g1, g2 = xt - d0, d1 - d0
        if self.options.get("variant", "iia") == "biia":
            xe = x1_in / broadcast_to_rows(sde.mean_coeff(t1), x)
            slope0 = g1 / broadcast_to_rows(sde.edm_sigma(t0), x)
            slope1 = (xe - d1) / broadcast_to_rows(sde.edm_sigma(t1), x)
            return [m_next * slope0, m_next * slope1], {"iia_has": torch.ones_like(s.get("iia_has"))}
        has = _had(s, x)
        prev = [_keep(m_next * s.get("iia_g1"), has), _keep(m_next * s.get("iia_g2"), has)]
        history = {"iia_g1": g1, "iia_g2": g2, "iia_has": torch.ones_like(s.get("iia_has"))}
        return [m_next * g1, m_next * g2, *prev], history


class _PredictionHistory(IIAStepper):
    """Directions x̂_i, x̂_i − x̂_{i−1}, ε̂_i − ε̂_{i−1} from the step's one evaluation."""

    def history_init(self, x: Tensor) -> State:
        z = torch.zeros_like(x)
        return {**super().history_init(x), "iia_x0": z, "iia_eps": z.clone()}

    def build(
        self, x: Tensor, s: Step, calls: list[tuple[Tensor, Tensor, Tensor]]
    ) -> tuple[list[Tensor | None], State]:
        sde = self.sde
        (xi, ti, si) = calls[0]
        x0 = sde.denoise(xi, ti, si)
        eps = (xi - broadcast_to_rows(sde.mean_coeff(ti), x) * x0) / broadcast_to_rows(sde.marginal_std(ti), x)
        has = _had(s, x)
        dirs: list[Tensor | None] = [x0, _keep(x0 - s.get("iia_x0"), has), _keep(eps - s.get("iia_eps"), has)]
        return dirs, {"iia_x0": x0, "iia_eps": eps, "iia_has": torch.ones_like(s.get("iia_has"))}


class IIADDIM(_PredictionHistory):
    """IIA-DDIM on deterministic DDIM (η = 0, 1 NFE per move)."""

    base_cls = DDIMStepper
    base_spec = DDIM
    solver = "iia_ddim"
    order = 1.0


class IIADPMPP2M(_PredictionHistory):
    """IIA on DPM-Solver++(2M) (1 NFE per move)."""

    base_cls = DPMSolverPP2M
    base_spec = DPMPP_2M
    solver = "iia_dpmpp_2m"
    base_keys = ("steps", "grid", "rho", "lower_order_final")
    order = 2.0


def _table(name: str, v: Any) -> None:
    if v is not None and not isinstance(v, IIATable):
        raise ValueError(f"{name} must be an {IIATable.kind} ({IIATable.made_by}) or None, got {v!r}")


def _build(stepper_cls: type[IIAStepper]) -> Callable[[SolverContext, dict[str, Any]], dict[str, Any]]:
    def build(ctx: SolverContext, opts: dict[str, Any]) -> dict[str, Any]:
        return dict(stepper=stepper_cls(ctx, opts), controller=FixedGrid(solver_grid(ctx, opts)))

    return build


_TABLE = Option(None, _table, "coefficient table (fastsde.fit_iia / fastsde.load_iia); None: the base solver")

IIA_HEUN = SolverSpec(
    name="iia_heun",
    build=_build(IIAHeun),
    stepper=IIAHeun,
    options={
        **grid_options(10, "ode"),
        "variant": Option("iia", one_of("iia", "biia"), "iia: IIA-EDM (r = 1), biia: BIIA-EDM"),
        "table": _TABLE,
    },
    summary="EDM's Heun + fitted per-step coefficients (IIA-EDM / BIIA-EDM), 2N−1 NFE with denoise",
    artifact=("table", IIATable),
)

IIA_DDIM = SolverSpec(
    name="iia_ddim",
    build=_build(IIADDIM),
    stepper=IIADDIM,
    options={**grid_options(10, "sde"), "table": _TABLE},
    summary="deterministic DDIM + fitted per-step coefficients (IIA-DDIM), N NFE with denoise",
    artifact=("table", IIATable),
)

IIA_DPMPP_2M = SolverSpec(
    name="iia_dpmpp_2m",
    build=_build(IIADPMPP2M),
    stepper=IIADPMPP2M,
    options={
        **grid_options(10, "exp"),
        "lower_order_final": Option(True, boolean, "first-order last move when there are fewer than 15 moves"),
        "table": _TABLE,
    },
    summary="DPM-Solver++(2M) + fitted per-step coefficients (IIA), N NFE with denoise",
    artifact=("table", IIATable),
)

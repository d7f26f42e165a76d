"""Step-size controllers and the coordinate they step in.

- :class:`FixedGrid`: the times of a grid; every step is accepted; NFE known without running.
- :class:`Adaptive`: per-sample error control. One class covers Gotta Go Fast's controller (mixed
  tolerance δ = max(ε_abs, ε_rel·|x|), h ← θ·h·E^(−r), optional PI) and scipy's RK45 control (δ =
  atol + rtol·max(|y|, |y_new|), factor limits, no growth after a rejection, FSAL start-up), through
  its settings; the exponent follows from the stepper's declared error order unless given.

A :class:`Coordinate` maps the controller's increasing coordinate c to time: c = −t (time runs down),
c = t (the likelihood's forward solve), or c = λ, the half log-SNR.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ...sde import SDE

__all__ = ["Coordinate", "FixedGrid", "Adaptive", "ControllerState", "error_norm"]


@dataclass
class Coordinate:
    """c_start < c_end; ``to_t(c)`` maps float64 per-row coordinates to times; ``variance`` is the
    variance function of the Brownian path in c; ``t_end`` is the exact end time."""

    c_start: float | Tensor
    c_end: float
    to_t: Callable[[Tensor], Tensor]
    variance: Callable[[Tensor], Tensor]
    t_start: float | Tensor
    t_end: float
    #: the inverse of ``to_t`` (float64 times to coordinates), None where there is none
    from_t: Callable[[Tensor], Tensor] | None = None

    @staticmethod
    def time(t_start: float | Tensor, t_end: float) -> Coordinate:
        """c = ∓t so that c increases from t_start to t_end (either direction); t_start may hold one
        time per sample."""
        backwards = bool((torch.as_tensor(t_start) > t_end).all())
        if backwards:
            start = -t_start if isinstance(t_start, Tensor) else -float(t_start)
            return Coordinate(start, -float(t_end), lambda c: -c, lambda c: c, t_start, t_end, lambda t: -t)
        start = t_start if isinstance(t_start, Tensor) else float(t_start)
        return Coordinate(start, float(t_end), lambda c: c, lambda c: c, t_start, t_end, lambda t: t)

    @staticmethod
    def log_snr(sde: SDE, t_start: float, t_end: float) -> Coordinate:
        """c = λ = log(m/σ) with the exponential integrators' Brownian process (Var W(λ) = e^{2λ})."""
        lam = sde.log_snr(torch.tensor([t_start, t_end], dtype=torch.float64)).tolist()
        return Coordinate(lam[0], lam[1], sde.t_from_lambda, lambda v: torch.exp(2.0 * v), t_start, t_end, sde.log_snr)

    def restarted(self, t_start: float) -> Coordinate:
        """The same coordinate from a later start time (after the shared first move from m = 0)."""
        if self.from_t is None:
            raise ValueError("this coordinate cannot be restarted: it has no map from t to c")
        c = float(self.from_t(torch.tensor([float(t_start)], dtype=torch.float64))[0])
        return dataclasses.replace(self, c_start=c, t_start=float(t_start))


class FixedGrid:
    """Step from grid point k to k + 1 (the coordinate is the grid index); always accepts."""

    adaptive = False
    min_step = False

    def __init__(self, grid: Tensor) -> None:
        self.grid = grid.to(torch.float64)
        self.moves = len(grid) - 1
        g = self.grid
        on_device: dict[torch.device, Tensor] = {}  # the grid copied once per device, not per step

        def to_t(c: Tensor) -> Tensor:
            gd = on_device.get(c.device)
            if gd is None:
                gd = on_device[c.device] = g.to(c.device)
            return gd[c.round().to(torch.int64)]

        self.coordinate = Coordinate(0.0, float(self.moves), to_t, to_t, float(g[0]), float(g[-1]))

    def next_time(self, index: Tensor) -> Tensor | None:
        """The grid point after each row's current one (for correctors that need the next move)."""
        nxt = (index + 1).clamp_max(self.moves)
        return self.grid.to(index.device)[nxt]


def error_norm(ratio: Tensor, norm: str) -> Tensor:
    """Per-row norm of the scaled error: 'scaled_l2' (RMS), 'rms' (RMS as scipy computes it), 'l2', 'linf'."""
    r = ratio.reshape(ratio.shape[0], -1)
    if norm == "linf":
        return r.abs().amax(dim=1)
    if norm == "rms":
        return r.pow(2).mean(dim=1).sqrt()
    sq = (r * r).sum(dim=1)
    return (sq / r.shape[1]).sqrt() if norm == "scaled_l2" else sq.sqrt()


@dataclass
class ControllerState:
    """An adaptive controller's memory, one entry per sample (on the solve's device): what the next
    factor depends on besides the current attempt. The controller makes it (:meth:`Adaptive.init_state`)
    and returns the next one (:meth:`Adaptive.adapt`); the driver only gathers and scatters rows."""

    err_prev: Tensor  # error of the last accepted step, floored at 1e-4 (PI control; 1 before any)
    after_reject: Tensor  # the last attempt was rejected
    last_err: Tensor  # error of the last attempt if it was rejected, else 0 (the measured exponent)
    last_h: Tensor  # step of the last attempt

    def rows(self, idx: Tensor | None) -> ControllerState:
        """The memory of the samples ``idx`` (None: all, in order)."""
        if idx is None:
            return self
        return ControllerState(*(v[idx] for v in dataclasses.astuple(self)))

    def put(self, idx: Tensor | None, new: ControllerState) -> ControllerState:
        """This memory with the samples ``idx`` replaced by ``new`` (None: all of them)."""
        if idx is None:
            return new
        for name in ("err_prev", "after_reject", "last_err", "last_h"):
            getattr(self, name)[idx] = getattr(new, name)
        return self


@dataclass
class Adaptive:
    """Per-sample error control (see the module docstring); every field is a setting of the law.

    ``mixed``: "max" (δ = max(ε_abs, ε_rel·scale), scale from the reference proposal and, with
    ``use_prev``, the previous accepted one (True) or the current state ('x')) or "sum" (scipy's
    δ = atol + rtol·max(|x|, |x_new|)). The new step is h·clamp(θ·E^(−r), min_factor, max_growth),
    with PI control E_prev^β after an accepted step, no growth on the step after a rejection when
    ``grow_after_reject`` is False, ``nonfinite_factor`` after a non-finite error, and, with
    ``measured_exponent``, scipy's start-up shrink replaced by the exponent measured from two
    rejections in a row before the first accepted step. ``h_init`` None asks the stepper.
    ``stretch`` > 0 lets a step that would leave less than stretch·h to go take the rest at once.
    """

    rtol: float
    atol: float
    exponent: float
    mixed: str = "max"
    use_prev: bool | str = True
    norm: str = "scaled_l2"
    safety: float = 0.9
    max_growth: float = math.inf
    min_factor: float = 0.0
    nonfinite_factor: float = 0.1
    pi_beta: float = 0.0
    h_init: float | None = 0.01
    h_max: float = math.inf
    grow_after_reject: bool = True
    measured_exponent: bool = False
    accept_equal: bool = True
    stop_tol: float | None = 1e-6
    min_step: bool = False
    extrapolate: bool = True
    #: a step within a factor (1 + stretch) of the rest of the way takes the rest (no sliver of a
    #: last step; not right after a rejection, nor beyond h_max; 0: never)
    stretch: float = 0.0

    adaptive = True

    def error(self, x: Tensor, res, x_prev: Tensor | None) -> Tensor:
        """Per-row scaled error norm (float64) of a proposal ``res`` from state x."""
        dt = x.dtype
        if self.mixed == "sum":
            scale = self.atol + self.rtol * torch.maximum(x.abs(), res.x.abs())
            return error_norm(res.error / scale, self.norm).to(torch.float64)
        scale = res.x_ref.abs()
        if self.use_prev is True and x_prev is not None:
            scale = torch.maximum(scale, x_prev.abs())
        elif self.use_prev == "x":
            scale = torch.maximum(scale, x.abs())
        delta = torch.clamp_min(torch.clamp_min(self.rtol * scale, self.atol), torch.finfo(dt).tiny)
        return error_norm(res.error / delta, self.norm).to(torch.float64)

    def accepts(self, err: Tensor) -> Tensor:
        return err <= 1.0 if self.accept_equal else err < 1.0

    def init_state(self, n: int, device: torch.device | str) -> ControllerState:
        """The memory before any attempt."""
        f64 = torch.float64
        return ControllerState(
            err_prev=torch.ones(n, dtype=f64, device=device),
            after_reject=torch.zeros(n, dtype=torch.bool, device=device),
            last_err=torch.zeros(n, dtype=f64, device=device),
            last_h=torch.zeros(n, dtype=f64, device=device),
        )

    def adapt(
        self,
        state: ControllerState,
        err: Tensor,
        ok: Tensor,
        finite: Tensor,
        h: Tensor,
        act: Tensor,
        before_first: Tensor,
    ) -> tuple[Tensor, ControllerState]:
        """The factor of each attempted row's next step and the memory after this attempt (rows where
        ``act`` is False keep theirs)."""
        fac = self.factor(
            err, ok, finite, h, state.err_prev, state.after_reject, state.last_err, state.last_h, before_first
        )
        err_prev = torch.where(ok, err.clamp_min(1e-4), state.err_prev) if self.pi_beta > 0 else state.err_prev
        new = ControllerState(
            err_prev=err_prev,
            after_reject=torch.where(act, ~ok, state.after_reject),
            last_err=torch.where(ok, torch.zeros_like(err), err),
            last_h=h,
        )
        return fac, new

    def factor(
        self,
        err: Tensor,
        ok: Tensor,
        finite: Tensor,
        h: Tensor,
        err_prev: Tensor,
        after_reject: Tensor,
        last_err: Tensor,
        last_h: Tensor,
        before_first: Tensor,
    ) -> Tensor:
        """The factor by which each attempted row's step changes."""
        fac = self.safety * err.clamp_min(1e-300).pow(-self.exponent)
        if self.pi_beta > 0:  # PI control (Gustafsson): damp growth after a large accepted error
            fac = torch.where(ok, fac * err_prev.pow(self.pi_beta), fac)
        grow = fac.clamp_max(self.max_growth)
        if not self.grow_after_reject:
            grow = torch.where(after_reject, grow.clamp(max=1.0), grow)
        shrink = fac.clamp_min(self.min_factor) if self.min_factor > 0 else fac
        if self.measured_exponent:
            again = after_reject & finite & before_first
            shrink = _measured_shrink(shrink, err, h, last_err, last_h, again, self.safety, self.min_factor)
        out = torch.where(ok, grow, shrink)
        return torch.where(finite, out, torch.full_like(out, self.nonfinite_factor))


def _measured_shrink(
    shrink: Tensor, err: Tensor, h: Tensor, prev_err: Tensor, prev_h: Tensor, again: Tensor, safety: float, lo: float
) -> Tensor:
    """After a second rejection in a row at the start: 0.9·err^(−1/p) with the exponent p measured
    from the two attempts (clamped to [1, 5]) where it is smaller than ``shrink``. Only rows where
    ``again`` holds and the error fell as the step fell use the measurement."""
    use = again & torch.isfinite(prev_err) & (prev_err > err) & (err > 1.0) & (prev_h > h)
    ratio_h = torch.where(use, prev_h / h, torch.full_like(h, 2.0))
    ratio_e = torch.where(use, prev_err / err, torch.full_like(err, 2.0))
    p = (torch.log(ratio_e) / torch.log(ratio_h)).clamp(1.0, 5.0)
    fitted = torch.clamp(safety * err.clamp_min(1.0) ** (-1.0 / p), min=lo)
    return torch.where(use, torch.minimum(shrink, fitted), shrink)

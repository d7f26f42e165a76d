"""What a method is, for the driver: a stepper declares its order, error order, NFE per step,
stochasticity and time coordinate, makes its state, and takes one step at a time.

A stepper never loops, never counts NFE and never draws noise except through the :class:`Step` it is
handed: the driver (``solvers.core.driver``) owns the loop, the controller the step sizes, the Brownian
path the noise of a retried step, and the counting wrapper the evaluations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ...grids import zero_mean_at
from ...noise import Stream
from ...sde import SDE

if TYPE_CHECKING:
    from .context import SolverContext

__all__ = ["Step", "StepResult", "Stepper", "State", "embedded", "denoised"]

#: A stepper's per-sample state: name -> full-batch tensor whose first dimension is the sample.
State = dict[str, Tensor]


@dataclass
class Step:
    """One attempted step for the rows being stepped (a subset of the samples when some are finished).

    ``t``/``t_next`` are per-row times in x's dtype (``t_next`` is t_end exactly on a final step);
    ``t64``/``t_next64`` the same in float64; ``c``/``c_next``/``h`` the controller's coordinate
    (float64: t reversed, half log-SNR λ, or the grid index) with h = c_next − c ≥ 0. ``index`` is
    how many steps each row has accepted (the grid index on a fixed grid), ``attempt`` how many it
    has attempted; ``final`` marks rows whose step ends at t_end; ``moves`` is the number of moves of
    a fixed grid (None when adaptive). ``rows`` are the sample indices of the rows (CPU int64), None
    when every sample is stepped in order.
    """

    t: Tensor
    t_next: Tensor
    t64: Tensor
    t_next64: Tensor
    c: Tensor
    c_next: Tensor
    h: Tensor
    index: Tensor
    attempt: Tensor
    final: Tensor
    moves: int | None
    rows: Tensor | None
    score: Callable[[Tensor, Tensor], Tensor]
    score0: Callable[[], Tensor]
    brownian: Callable[[list[Tensor]], list[Tensor]]
    normal_fn: Callable[[Tensor, int], Tensor]
    state: State = field(default_factory=dict)
    #: the counted data prediction x̂0(x, t) of the score (None: the score has none); see :func:`denoised`
    data_prediction: Callable[[Tensor, Tensor], Tensor] | None = None
    #: on a fixed grid, where every sample steps together, what the host knows without reading the
    #: device (None when the rows may differ: an adaptive controller): ``k`` the grid index of the move,
    #: ``history`` how many of the method's own moves lie behind every row since the start or the last
    #: corrector reset (the driver's shared first move is not one), ``is_final`` whether the move ends at
    #: t_end with no move after it (``final`` for every row), ``grid`` the grid's times (float64, host)
    k: int | None = None
    history: int | None = None
    is_final: bool | None = None
    grid: Tensor | None = None

    def normal(self, like: Tensor, stream: int = Stream.STEP) -> Tensor:
        """Standard normal noise shaped like ``like``, keyed per sample by this step's index."""
        return self.normal_fn(like, stream)

    def get(self, name: str) -> Tensor:
        """The rows' part of a state tensor."""
        v = self.state[name]
        return v if self.rows is None else v[self.rows.to(v.device)]


@dataclass
class StepResult:
    """A proposal. ``x``: the state at t_next if accepted. For a step with an embedded error estimate,
    ``error`` is the local error (same shape as x) and ``x_ref`` the other member of the pair (the
    tolerance scale of the mixed rule reads it); ``valid`` masks rows whose proposal is unusable
    (non-finite evaluations). ``state``: new values of the stepper's state tensors for the rows, kept
    where the step is accepted. ``x0_hat``: the data prediction the step computed, if any."""

    x: Tensor
    error: Tensor | None = None
    x_ref: Tensor | None = None
    valid: Tensor | None = None
    state: State = field(default_factory=dict)
    x0_hat: Tensor | None = None


def embedded(low: Tensor, high: Tensor, extrapolate: bool = True, **kw: Any) -> StepResult:
    """The result of an embedded pair: keep ``high`` (local extrapolation) or ``low``; error high − low."""
    keep, ref = (high, low) if extrapolate else (low, high)
    return StepResult(x=keep, error=high - low, x_ref=ref, **kw)


def denoised(sde: SDE, s: Step, x: Tensor, t: Tensor, singular: bool = False) -> Tensor:
    """The data prediction x̂0 at (x, t), one evaluation: Tweedie's (x + σ²·s)/m from the score, or, on
    a move from m = 0 (``singular``: a rectified flow's u = 1, where the score is −x whatever the data),
    the score's own data prediction (for every row of the move)."""
    if singular and s.data_prediction is not None:
        return s.data_prediction(x, t)
    return sde.denoise(x, t, s.score(x, t))


def starts_at_zero_mean(sde: SDE | None, t_start: Any) -> bool:
    """Whether m(t_start) = 0 (a rectified flow's pure-noise end), decided once on the host."""
    if sde is None or isinstance(t_start, bool) or not isinstance(t_start, (int, float)):
        return False
    return zero_mean_at(sde, t_start)


class Stepper:
    """One method. Subclasses set the declarations and implement :meth:`step`.

    Declarations (class attributes, or properties of the options):

    - ``order``: convergence order (weak order for stochastic methods);
    - ``error_order``: order of the embedded error estimate's local error (the controller's
      exponent is 1/error_order unless overridden), None when the method has none;
    - ``nfe_per_step``: score evaluations per attempted step (before any reuse);
    - ``first_nfe``: evaluations made once before the first step (``init``);
    - ``initial_step_nfe``: evaluations of its automatic first-step selection (h_init=None);
    - ``coordinate``: "t" or "logsnr", the coordinate an adaptive controller steps in;
    - ``stochastic``: whether its samples depend on the seed beyond x_T for these options;
    - ``singular_start``: whether its own first move from m = 0 (rectified flow's u = 1) is exact in
      the data prediction; every other method's first move from there is the driver's shared one.
    """

    order: float = 1.0
    error_order: float | None = None
    nfe_per_step: int = 1
    first_nfe: int = 0
    initial_step_nfe: int = 0
    coordinate: str = "t"
    stochastic: bool = False
    #: whether the method's own first move from m = 0 (a rectified flow's u = 1) is exact in the score's
    #: data prediction x̂0 (see :func:`denoised`); the driver takes the first move of every other method
    #: there (:func:`~fastsde.solvers.core.driver.first_move`)
    singular_start: bool = False

    @classmethod
    def declared_order(cls, options: Mapping[str, Any]) -> float:
        """The order for these options (default: the class's ``order``)."""
        return cls.order

    @classmethod
    def declared_nfe(cls, options: Mapping[str, Any]) -> int:
        """Evaluations per attempted step for these options (default: ``nfe_per_step``)."""
        return cls.nfe_per_step

    @classmethod
    def declared_stochastic(cls, options: Mapping[str, Any]) -> bool:
        """Whether the samples depend on the seed beyond x_T for these options."""
        return cls.stochastic

    def __init__(self, ctx: SolverContext, options: Mapping[str, Any]) -> None:
        self.ctx = ctx
        self.sde = ctx.sde
        self.options = dict(options)
        #: the solve starts where m = 0: its first move (index 0, known on the host) is singular
        self.from_zero_mean = starts_at_zero_mean(self.sde, getattr(ctx, "t_start", None))

    def singular_move(self, s: Step) -> bool:
        """Whether this move starts where m = 0 (the first move of a solve from a rectified flow's u = 1)."""
        if not self.from_zero_mean:
            return False
        return s.k == 0 if s.k is not None else bool((s.index == 0).any())

    @property
    def shared_first_move(self) -> bool:
        """Whether the driver takes this solve's first move (from m = 0) for the method: the solve starts
        where m = 0 and the method has no exact first move of its own (``singular_start``)."""
        return getattr(self, "from_zero_mean", False) and not self.singular_start

    def singular_eta(self) -> float:
        """The η of the shared first move from m = 0 (see :func:`~fastsde.solvers.core.driver.first_move`):
        0 for a deterministic method (its samples stay a function of x_T), 1 for a stochastic one (the
        h → ∞ limit of its own first-order move: the DDPM posterior draw m_s·x̂0 + σ_s·z)."""
        return 1.0 if self.declared_stochastic(self.options) else 0.0

    @classmethod
    def declared_move_nfe(cls, options: Mapping[str, Any]) -> int:
        """Evaluations of the move proper among ``declared_nfe`` (default: all of them); the shared first
        move from m = 0 takes the place of these with one data prediction (a corrector's are kept)."""
        return cls.declared_nfe(options)

    def init(self, x: Tensor) -> tuple[State, Tensor | None]:
        """The stepper's state for the samples of x, and a per-sample mask of samples whose start is
        unusable (None: all fine). May evaluate the score (``first_nfe`` per sample)."""
        return {}, None

    def step(self, x: Tensor, s: Step) -> StepResult:
        raise NotImplementedError

    def reset(self, state: State, rows: Tensor) -> None:
        """A corrector moved these samples: forget what the state knows of their old position."""

    def initial_step(self, x: Tensor, state: State, rows: Tensor, span: Tensor, rtol: float, atol: float) -> Tensor:
        """The first step size when the controller is asked to choose it (h_init=None)."""
        raise ValueError(f"{type(self).__name__} cannot choose its first step: give h_init")

"""Helpers several solver methods share: the DDIM posterior move, multistep order rules, the
Lagrange weights of Adams-type methods, the adaptive SDE options and plan, and coordinate helpers."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...brownian import PATHS
from ...sde import SDE, broadcast_to_rows
from .context import SolverContext
from .controllers import Adaptive, Coordinate
from .correctors import Langevin
from .options import (
    Option,
    boolean,
    nonnegative_float,
    one_of,
    optional,
    positive_float,
    positive_int,
    unit_interval,
)
from .stepper import Step, Stepper


def edm_direction(sde: SDE, s: Step, x_tilde: Tensor, t: Tensor) -> Tensor:
    """d = dx̃/dσ̃ = (x̃ − x̂0)/σ̃ at time t (one NFE)."""
    m = broadcast_to_rows(sde.mean_coeff(t), x_tilde)
    x = m * x_tilde
    x0 = sde.denoise(x, t, s.score(x, t))
    return (x_tilde - x0) / broadcast_to_rows(sde.edm_sigma(t), x_tilde)


def log_snr_coordinate(ctx: SolverContext) -> Coordinate:
    """The controller's coordinate c = λ (half log-SNR) from t_start to t_end."""
    return Coordinate.log_snr(ctx.sde, ctx.t_start, ctx.t_end)


def shared_rows(fn: Callable[[Tensor], Tensor], key: Tensor, same: bool | None = None) -> Tensor:
    """fn(key) row by row, computed once when every row of key is the same (a fixed grid: every
    sample shares its coefficients). ``same``: known on the host (a fixed grid's ``s.k is not None``);
    None looks at the rows (one read of the device)."""
    if same is None:
        same = key.shape[0] > 1 and bool((key == key[:1]).all())
    if same and key.shape[0] > 1:
        out = fn(key[:1])
        return out.expand(key.shape[0], *out.shape[1:])
    return fn(key)


def _growth_check(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 1:
        raise ValueError(f"{name} must be a number > 1 (math.inf for no limit), got {v!r}")


def _use_prev_check(name: str, v: Any) -> None:
    if v is not True and v is not False and v != "x":
        raise ValueError(f"{name} must be True, False or 'x', got {v!r}")


def adaptive_options(
    h_init: float,
    eps_rel: float,
    exponent: float | None,
    brownian: str,
    use_prev: bool | str = True,
    max_growth: float = math.inf,
    reuse: bool = False,
) -> dict[str, Option]:
    """The controller options shared by the adaptive SDE solvers."""
    return {
        "eps_rel": Option(eps_rel, positive_float, "relative tolerance ε_rel"),
        "eps_abs": Option(
            lambda sde: sde.data_range / 256.0, positive_float, "absolute tolerance (default data range / 256)"
        ),
        "h_init": Option(h_init, positive_float, "initial step"),
        "safety": Option(0.9, unit_interval, "safety factor θ"),
        "exponent": Option(
            exponent,
            optional(positive_float),
            "controller exponent r in h ← θ·h·E^(−r) (None: 1 / the stepper's declared error order)",
        ),
        "norm": Option("scaled_l2", one_of("scaled_l2", "l2", "linf"), "error norm per sample"),
        "extrapolate": Option(True, boolean, "keep the higher-order proposal (False: keep the lower)"),
        "use_prev": Option(
            use_prev,
            _use_prev_check,
            "tolerance uses the previous accepted proposal (True), "
            "the current state ('x', the JAX code's behaviour) or neither (False)",
        ),
        "compact": Option(True, boolean, "drop finished samples from the score calls"),
        "max_nfe": Option(10_000, positive_int(2), "per-sample budget of solver NFE (denoise excluded)"),
        "on_budget": Option("raise", one_of("raise", "partial"), "what happens when max_nfe is reached"),
        "corrector_steps": Option(0, positive_int(0), "Langevin corrector steps after each accepted step"),
        "snr": Option(0.16, positive_float, "signal-to-noise ratio of the Langevin corrector"),
        "max_growth": Option(max_growth, _growth_check, "largest factor by which h may grow per attempt (GGF: none)"),
        "pi_beta": Option(
            0.0,
            nonnegative_float,
            "PI control: after an accepted step h ← θ·h·E^(−r)·E_prev^β with E_prev the previous accepted "
            "step's error (0: GGF's controller; fewer rejections with β ≈ 0.3–0.4)",
        ),
        "reuse_rejected": Option(
            reuse,
            boolean,
            "after a rejection, reuse the score at the unchanged (x, t) "
            "instead of evaluating it again (saves 1 NFE per rejection)",
        ),
        "brownian": Option(
            brownian,
            one_of(*PATHS),
            "noise of a retried step: fresh draw (GGF), or the same Brownian path read off a per-sample "
            "tree (a function of the seed only) or revealed lazily with memory (one draw per query)",
        ),
    }


def adaptive_plan(
    ctx: SolverContext,
    stepper: Stepper,
    opts: dict[str, Any],
    coordinate: Coordinate,
    h_init: float,
    h_max: float = math.inf,
) -> dict[str, Any]:
    """The driver's arguments for an adaptive SDE solver: GGF's controller law on ``coordinate``,
    the Brownian path, the corrector and the budget named by the options."""
    exponent = opts["exponent"]
    if exponent is None:
        exponent = 1.0 / float(stepper.error_order)
    controller = Adaptive(
        rtol=opts["eps_rel"],
        atol=opts["eps_abs"],
        exponent=exponent,
        mixed="max",
        use_prev=opts["use_prev"],
        norm=opts["norm"],
        safety=opts["safety"],
        max_growth=opts["max_growth"],
        nonfinite_factor=0.1,
        pi_beta=opts["pi_beta"],
        h_init=h_init,
        h_max=h_max,
        stop_tol=1e-6,
    )
    corrector = None
    if opts.get("corrector_steps", 0):
        corrector = Langevin(opts["corrector_steps"], opts["snr"], per_sample_norm=True, at_end=True, key="attempt")
    return dict(
        stepper=stepper,
        controller=controller,
        coordinate=coordinate,
        brownian=opts["brownian"],
        corrector=corrector,
        compact=opts["compact"],
        max_nfe=opts["max_nfe"],
        on_budget=opts["on_budget"],
        reuse_rejected=opts.get("reuse_rejected", False),
        budget_hint="raise max_nfe, loosen eps_rel / eps_abs",
    )


@cache
def _leggauss(points: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    u, w = np.polynomial.legendre.leggauss(points)
    return tuple(float(v) for v in u), tuple(float(v) for v in w)


def gauss_legendre(points: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """Gauss–Legendre nodes and weights on [−1, 1] (float64, on like's device)."""
    u, w = _leggauss(points)
    return (
        torch.tensor(u, dtype=torch.float64, device=like.device),
        torch.tensor(w, dtype=torch.float64, device=like.device),
    )


def lagrange_integrals(
    nodes: Tensor, lo: Tensor, hi: Tensor, points: int, to_node: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """∫_lo^hi ℓ_j(to_node(u)) du for the Lagrange basis ℓ_j of ``nodes`` (n, k), per row, by
    ``points``-point Gauss–Legendre in u (exact when to_node is the identity and 2·points > k − 1).

    ``nodes`` must be distinct per row (float64); returns (n, k) float64."""
    n, k = nodes.shape
    u, w = gauss_legendre(points, nodes)
    mid, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
    us = mid[:, None] + half[:, None] * u[None, :]  # (n, G)
    s = us if to_node is None else to_node(us.reshape(-1)).reshape(n, points)
    out = []
    for j in range(k):
        basis = torch.ones_like(s)
        for m in range(k):
            if m != j:
                basis = basis * (s - nodes[:, m : m + 1]) / (nodes[:, j : j + 1] - nodes[:, m : m + 1])
        out.append(half * (basis * w[None, :]).sum(dim=1))
    return torch.stack(out, dim=1)


#: Fewer moves than this make the last move first order when lower_order_final is on.
LOWER_ORDER_FINAL_BELOW = 15


def first_order_moves(s: Step, has_history: Tensor, lower_order_final: bool) -> Tensor | bool:
    """Rows whose move is first order: no history yet (the first move, or after a corrector moved the
    sample), or the last move of a grid of fewer than LOWER_ORDER_FINAL_BELOW moves when
    ``lower_order_final`` is on (diffusers' rule; not applied by adaptive controllers). On a fixed
    grid (``s.history`` known on the host) one bool for every row, with no device work."""
    lof = lower_order_final and s.moves is not None and s.moves < LOWER_ORDER_FINAL_BELOW
    if s.history is not None:
        return s.history == 0 or (lof and bool(s.is_final))
    first = ~has_history
    return first | s.final if lof else first


def grid_coefficients(
    stepper: Stepper, s: Step, make: Callable[[Tensor], Tensor], move: int | None = None, float64: bool = False
) -> Tensor:
    """Row ``move`` (default ``s.k``) of a per-grid table of a method's coefficients, made once per run on
    a fixed grid: ``make(t)`` gets the grid's points in the solve's dtype (float64 with ``float64``, as a
    method that computes its coefficients from ``s.t64``), on its device, and returns one row per move
    (the same elementwise formulas the per-row path evaluates each step, so only the last bit of a
    vectorised exp/log may differ)."""
    low = s.t.dtype in (torch.float16, torch.bfloat16)  # half precision: made in float32, kept in the run's dtype
    dtype = torch.float64 if float64 else (torch.float32 if low else s.t.dtype)
    cache = stepper.__dict__.setdefault("_grid_tables", {})
    key = (id(s.grid), dtype, make.__name__)
    if key not in cache:
        table = make(s.grid.to(device=s.t.device, dtype=dtype))
        table = table.to(s.t.dtype) if low and not float64 else table
        cache[key] = (s.grid, table)  # the grid is kept so that its id is not reused meanwhile
    return cache[key][1][int(s.k) if move is None else move]


def where_rows(mask: Tensor | bool, yes: Tensor, no: Callable[[], Tensor]) -> Tensor:
    """``yes`` in the rows where ``mask`` holds, ``no()`` elsewhere. A host bool (a fixed grid, where every
    row takes the same branch: :func:`first_order_moves`) computes only the branch taken."""
    if mask is True:
        return yes
    other = no()
    if mask is False:
        return other
    return torch.where(broadcast_to_rows(mask, yes), yes, other)


def posterior_step(sde: SDE, x: Tensor, x0: Tensor, t: Tensor, t_next: Tensor, eta: float, z: Tensor | None) -> Tensor:
    """DDIM's move t → s = t_next in data-prediction form for x_t = m·x0 + σ·z:

    x_s = m_s·x̂0 + √(σ_s² − c²)·ε̂ + c·z, ε̂ = (x_t − m_t·x̂0)/σ_t, c = η·σ_s·√(1 − e^{−2h}),

    with h = λ_s − λ_t the step in half log-SNR (e^{−2h} = σ̃_s²/σ̃_t²). η = 1 is the exact DDPM
    posterior q(x_s | x_t, x0 = x̂0); η = 0 is deterministic.
    """
    m_t = broadcast_to_rows(sde.mean_coeff(t), x)
    m_s = broadcast_to_rows(sde.mean_coeff(t_next), x)
    sig_t = broadcast_to_rows(sde.marginal_std(t), x)
    sig_s = broadcast_to_rows(sde.marginal_std(t_next), x)
    eps = (x - m_t * x0) / sig_t
    if eta == 0.0 or z is None:
        return m_s * x0 + sig_s * eps
    h = broadcast_to_rows(sde.log_snr(t_next) - sde.log_snr(t), x)
    frac = -(-2.0 * h).expm1()  # 1 − σ̃_s²/σ̃_t² ∈ [0, 1)
    c = eta * sig_s * frac.sqrt()
    keep = sig_s * (1.0 - eta * eta * frac).clamp_min(0.0).sqrt()
    return m_s * x0 + keep * eps + c * z

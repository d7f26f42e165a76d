"""SA-Solver (Xue et al., NeurIPS 2023, "Stochastic Adams Solver for Fast Sampling of Diffusion
Models"): a stochastic Adams predictor–corrector in data prediction, for any process x_t = m·x0 + σ·z
with half log-SNR λ = log(m/σ).

Equation: the variance-controlled reverse SDE dx = [f − (1+τ²)/2·g²·s] dt + τ·g dw̄ (τ(t) ≥ 0; τ = 0
the PF-ODE, τ = 1 the reverse SDE; every τ has the data marginals). Its exact step s → t, with
h = λ_t − λ_s and a = 1 + τ², is

    x_t = (σ_t/σ_s)·e^{−τ²h}·x_s + m_t·∫_0^h a·e^{a(u−h)}·x̂0(λ_s + u) du + σ_t√(1 − e^{−2τ²h})·ξ.

- Predictor of order p: x̂0 is the Lagrange polynomial in λ through the last p data predictions
  (λ_k, λ_{k−1}, ...), integrated exactly: weights w_j = m_t·Σ_i (V⁻¹)_{ij}·ψ_i(ah), with V the
  Vandermonde matrix of the nodes scaled by h and ψ_i(H) = H∫_0^1 e^{−H(1−v)}v^i dv (a recurrence
  for H ≥ 1, its series below: no cancellation in float32 or float64). At τ = 0, p = 3 this is
  DPM-Solver++(3M) with the exact third-order term.
- Corrector of order c (PEC): once the next move has evaluated x̂0 at the predicted point, the move
  is redone from its start with the polynomial through that new value and the c − 1 before it, with
  the same ξ; the new value is not re-evaluated (it is the next move's history), so 1 NFE per move.
- ``rescale`` (SA's few-steps mode, diffusers' only mode): at order 2 the slope's weight is replaced
  by the O(h³)-close m_t·a·h²/2 (predictor) and m_t·a·h/2 (corrector), as UniPC's B(h) = h.

τ (``tau``): a number, applied where σ/m lies in ``tau_sigma`` (default SA's window: VP time
t ∈ [0.2, 0.8] of β ∈ [0.1, 20], i.e. σ/m ∈ [0.72, 25.1]; None: everywhere) and 0 elsewhere, or a
callable τ(σ/m) → tensor. SA evaluates τ at the move's target time (``tau_at="target"``), diffusers
at its source time (``"source"``).

Fixed grid: warm-up orders min(p, k + 1) for the predictor of move k and min(c, k + 1) for the
corrector applied at move k; with ``lower_order_final`` (default; below 15 moves, as fastsde's
multistep solvers) the last move's predictor is first order and the corrector orders fall as in SA
(min(c, moves − k + 2)). Final step: the last move into t_end is a predictor only (correcting it would
need an evaluation at t_end beyond the denoise); the front door's denoise at t_end is the final
evaluation. 1 NFE per move: N grid points cost N NFE with the denoise (SA's few-steps count). The
noise of move k is Stream.STEP with counter k.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..sde import SDE, broadcast_to_rows
from .core.common import LOWER_ORDER_FINAL_BELOW, shared_rows, where_rows
from .core.options import Option, boolean, grid_options, one_of
from .core.spec import SolverSpec, fixed_grid
from .core.stepper import State, Step, Stepper, StepResult

__all__ = ["SA_SOLVER", "SASolver", "exp_lagrange_weights", "shared_rows", "SA_TAU_WINDOW"]

#: σ/m of the VP process (β_min 0.1, β_max 20) at t = 0.2 and 0.8: SA's default τ window.
SA_TAU_WINDOW = (0.72, 25.1)
_HISTORY = 3  # past values kept: orders up to 4
_SERIES_TERMS = 30


#: Series coefficients of ψ_i below H = 1: ψ_i(H) = Σ_j (−1)^j·i!/(i + j + 1)!·H^{j+1}.
_SERIES = torch.tensor(
    [[(-1) ** j * math.factorial(i) / math.factorial(i + j + 1) for j in range(_SERIES_TERMS)] for i in range(4)],
    dtype=torch.float64,
)


def _psi(big_h: Tensor, k: int) -> Tensor:
    """ψ_0 … ψ_{k−1} at H (shape (n, k), float64): ψ_i(H) = H∫_0^1 e^{−H(1−v)} v^i dv, by the
    recurrence ψ_i = 1 − i·ψ_{i−1}/H for H ≥ 1 and by its power series below (no cancellation)."""
    rec = [-torch.expm1(-big_h)]
    safe = big_h.clamp_min(1.0)
    for i in range(1, k):
        rec.append(1.0 - i * rec[-1] / safe)
    small = big_h.clamp_max(1.0)
    powers = small[:, None] ** torch.arange(1, _SERIES_TERMS + 1, dtype=big_h.dtype, device=big_h.device)
    series = powers @ _SERIES[:k].to(big_h.device).T
    return torch.where((big_h < 1.0)[:, None], series, torch.stack(rec, dim=1))


def exp_lagrange_weights(v: Tensor, big_h: Tensor, rescale: bool = False) -> Tensor:
    """Weights w (n, k) with Σ_j w_j·P(v_j) = H∫_0^1 e^{−H(1−v)}·P(v) dv for every polynomial P of
    degree < k through the scaled nodes v (n, k) (float64). ``rescale`` at k = 2: ψ_1 → H/2."""
    k = v.shape[1]
    psi = _psi(big_h, k)
    if rescale and k == 2:
        psi = torch.stack([psi[:, 0], 0.5 * big_h], dim=1)
    powers = torch.arange(k, dtype=v.dtype, device=v.device)
    vander = v[:, :, None] ** powers[None, None, :]  # V[n, j, i] = v_j^i
    return torch.linalg.solve(vander.transpose(1, 2), psi[:, :, None]).squeeze(2)


class SASolver(Stepper):
    """SA-Solver: weak order 1 for τ > 0; on the PF-ODE (τ = 0) the order of its predictor and
    corrector (see ``declared_order``). One evaluation per move."""

    order = 1.0
    coordinate = "logsnr"

    @classmethod
    def declared_order(cls, options: Mapping[str, Any]) -> float:
        if cls.declared_stochastic(options):
            return 1.0
        p, c = int(options.get("predictor_order", 3)), int(options.get("corrector_order", 4))
        return float(min(p + 1, c) if c > 0 else p)

    @classmethod
    def declared_stochastic(cls, options: Mapping[str, Any]) -> bool:
        tau = options.get("tau", 1.0)
        return callable(tau) or float(tau) > 0.0

    def init(self, x: Tensor) -> tuple[State, Tensor | None]:
        n, dev, f64 = x.shape[0], x.device, torch.float64
        state = {f"d{j}": torch.zeros_like(x) for j in range(1, _HISTORY + 1)}
        state.update({f"l{j}": torch.zeros(n, dtype=f64, device=dev) for j in range(1, _HISTORY + 1)})
        state["count"] = torch.zeros(n, dtype=f64, device=dev)  # past values held (0 .. _HISTORY)
        state["base"] = torch.zeros_like(x)  # the last move's decay·x + noise, for its corrector
        state["a"] = torch.ones(n, dtype=f64, device=dev)  # the last move's 1 + τ²
        return state, None

    def reset(self, state: State, rows: Tensor) -> None:
        state["count"][rows.to(state["count"].device)] = 0.0

    def tau(self, sigma: Tensor) -> Tensor:
        """τ at the EDM noise levels σ/m (float64, per row)."""
        o = self.options
        tau = o["tau"]
        val = torch.as_tensor(tau(sigma) if callable(tau) else float(tau), dtype=torch.float64, device=sigma.device)
        val = val.expand_as(sigma)
        if o["tau_sigma"] is not None:
            lo, hi = o["tau_sigma"]
            val = torch.where((sigma >= lo) & (sigma <= hi), val, torch.zeros_like(val))
        return val

    def _weights(self, lam: list[Tensor], origin: Tensor, h: Tensor, a: Tensor, order: Tensor | int) -> Tensor:
        """(n, _HISTORY + 1) weights of the values at the nodes lam (scaled (λ − origin)/h, H = a·h):
        row i uses its first order[i] nodes; the others get 0. An int order (a fixed grid, where the host
        knows it) is every row's, with no read of the device."""
        out = torch.zeros(h.shape[0], _HISTORY + 1, dtype=h.dtype, device=h.device)
        if isinstance(order, int):
            if order > 0:
                v = torch.stack([(lam[j] - origin) / h for j in range(order)], dim=1)
                out[:, :order] = exp_lagrange_weights(v, a * h, rescale=self.options["rescale"])
            return out
        for k in range(1, _HISTORY + 2):
            use = order == k
            if not bool(use.any()):
                continue
            v = torch.stack([(lam[j][use] - origin[use]) / h[use] for j in range(k)], dim=1)
            out[use, :k] = exp_lagrange_weights(v, a[use] * h[use], rescale=self.options["rescale"])
        return out

    def _host_orders(self, s: Step) -> tuple[int | None, int | None]:
        """(predictor, corrector) orders of every row on a fixed grid, from the host's history count (the
        rules of :meth:`_predictor` / :meth:`_corrector`); (None, None) when the rows may differ."""
        if s.history is None:
            return None, None
        o, count, k, moves = self.options, min(int(s.history), _HISTORY), int(s.k), s.moves
        lof = o["lower_order_final"] and moves is not None and moves < LOWER_ORDER_FINAL_BELOW
        pred = min(int(o["predictor_order"]), count + 1)
        corr = min(int(o["corrector_order"]), count + 1)
        if lof:
            pred = max(min(pred, moves - k), 1)
            corr = min(corr, moves - k + 2)
        return pred, corr if count > 0 else 0

    def _predictor(self, key: Tensor, moves: int | None, host_order: int | None = None) -> Tensor:
        """From (t, t_next, λ_{k−1..k−3}, count, index): columns decay, noise std, 1 + τ², λ_s and the
        predictor's weights (m_t included) of x̂0 at λ_s, λ_{k−1}, …"""
        sde, o = self.sde, self.options
        t, tn, l1, l2, l3, count, index = key.unbind(1)
        lam_s, lam_t = sde.log_snr(t), sde.log_snr(tn)
        h = lam_t - lam_s
        tau = self.tau(sde.edm_sigma(tn if o["tau_at"] == "target" else t))
        a = 1.0 + tau**2
        order = torch.minimum(torch.full_like(count, float(o["predictor_order"])), count + 1)
        if o["lower_order_final"] and moves is not None and moves < LOWER_ORDER_FINAL_BELOW:
            order = torch.minimum(order, moves - index).clamp_min(1.0)  # moves left, this one included
        m_t, sig_t = sde.mean_coeff(tn), sde.marginal_std(tn)
        decay = sig_t / sde.marginal_std(t) * torch.exp(-(tau**2) * h)
        std = sig_t * torch.sqrt(-torch.expm1(-2.0 * tau**2 * h))
        w = m_t[:, None] * self._weights([lam_s, l1, l2, l3], lam_s, h, a, order if host_order is None else host_order)
        return torch.cat([torch.stack([decay, std, a, lam_s], dim=1), w], dim=1)

    def _corrector(self, key: Tensor, moves: int | None, host_order: int | None = None) -> Tensor:
        """From (t, λ_{k−1..k−3}, count, a of the last move, index): the corrector's weights (m_s
        included) of x̂0 at λ_s (the new value), λ_{k−1}, … for the last move λ_{k−1} → λ_s."""
        sde, o = self.sde, self.options
        t, l1, l2, l3, count, a, index = key.unbind(1)
        lam_s = sde.log_snr(t)
        has = count > 0
        order = torch.minimum(torch.full_like(count, float(o["corrector_order"])), count + 1)
        if o["lower_order_final"] and moves is not None and moves < LOWER_ORDER_FINAL_BELOW:
            order = torch.minimum(order, moves - index + 2)
        order = torch.where(has, order, torch.zeros_like(order))
        h = torch.where(has, lam_s - l1, torch.ones_like(lam_s))
        return sde.mean_coeff(t)[:, None] * self._weights(
            [lam_s, l1, l2, l3], l1, h, a, order if host_order is None else host_order
        )

    def step(self, x: Tensor, s: Step) -> StepResult:
        o, dt = self.options, x.dtype
        d0 = self.sde.denoise(x, s.t, s.score(x, s.t))
        count = s.get("count")
        values = [d0, *(s.get(f"d{j}") for j in range(1, _HISTORY + 1))]
        lam_past = [s.get(f"l{j}") for j in range(1, _HISTORY + 1)]
        index = s.index.to(s.t64)

        def combine(w: Tensor) -> Tensor:
            return sum(broadcast_to_rows(w[:, j].to(dt), x) * values[j] for j in range(_HISTORY + 1))

        pred_order, corr_order = self._host_orders(s)
        same = s.k is not None or None  # a fixed grid: every row shares its coefficients
        # corrector of the last move (its end is x, whose x̂0 is d0), with that move's noise
        if int(o["corrector_order"]) > 0 and corr_order != 0:
            key = torch.stack([s.t64, *lam_past, count, s.get("a"), index], dim=1)
            w = shared_rows(lambda k: self._corrector(k, s.moves, corr_order), key, same)
            x = where_rows(count > 0 if corr_order is None else True, s.get("base") + combine(w), lambda: x)

        key = torch.stack([s.t64, s.t_next64, *lam_past, count, index], dim=1)
        coef = shared_rows(lambda k: self._predictor(k, s.moves, pred_order), key, same)
        base = broadcast_to_rows(coef[:, 0].to(dt), x) * x
        if self.declared_stochastic(o):
            base = base + broadcast_to_rows(coef[:, 1].to(dt), x) * s.normal(x)
        out = base + combine(coef[:, 4:])
        state = {"d1": d0, "l1": coef[:, 3], "count": (count + 1).clamp_max(float(_HISTORY)), "base": base}
        state["a"] = coef[:, 2]
        for j in range(2, _HISTORY + 1):
            state[f"d{j}"], state[f"l{j}"] = values[j - 1], lam_past[j - 2]
        return StepResult(x=out, state=state, x0_hat=d0)


def _order(lo: int) -> Callable[[str, Any], None]:
    def check(name: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= _HISTORY + 1:
            raise ValueError(f"{name} must be an integer in [{lo}, {_HISTORY + 1}], got {v!r}")

    return check


def _tau_check(name: str, v: Any) -> None:
    if callable(v):
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0 or a callable tau(sigma), got {v!r}")


def _window_check(name: str, v: Any) -> None:
    if v is None:
        return
    ok = isinstance(v, (tuple, list)) and len(v) == 2
    ok = ok and all(isinstance(b, (int, float)) and not isinstance(b, bool) and not math.isnan(b) for b in v)
    if not ok or not 0 <= v[0] < v[1]:
        raise ValueError(f"{name} must be None or a pair (lo, hi) of noise levels σ/m with 0 <= lo < hi, got {v!r}")


def _check(opts: dict, sde: SDE, t_end: float) -> None:
    """A callable τ must give finite values >= 0 over the run's noise levels (checked before compute)."""
    tau = opts["tau"]
    if not callable(tau):
        return
    ends = sde.edm_sigma(torch.tensor([sde.T, t_end], dtype=torch.float64))
    probe = torch.exp(torch.linspace(float(ends[1].log()), float(ends[0].log()), 64, dtype=torch.float64))
    try:
        val = torch.as_tensor(tau(probe), dtype=torch.float64).expand_as(probe)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's function is a bad option
        raise ValueError(
            f"tau must map a tensor of noise levels σ/m to τ values, but tau(sigma) raised {exc!r}"
        ) from None
    if not bool(torch.isfinite(val).all()) or bool((val < 0).any()):
        raise ValueError(f"tau(sigma) must be finite and >= 0 on σ/m in [{float(ends[1]):g}, {float(ends[0]):g}]")


SA_SOLVER = SolverSpec(
    name="sa_solver",
    build=fixed_grid(SASolver),
    stepper=SASolver,
    options={
        **grid_options(20, "exp"),
        "predictor_order": Option(3, _order(1), "order p of the stochastic Adams predictor (SA's default 3)"),
        "corrector_order": Option(4, _order(0), "order c of the corrector (SA's default 4; 0: no corrector)"),
        "tau": Option(1.0, _tau_check, "noise scale τ: a number (inside tau_sigma) or a callable τ(σ/m)"),
        "tau_sigma": Option(SA_TAU_WINDOW, _window_check, "σ/m window where τ applies (None: everywhere)"),
        "tau_at": Option("target", one_of("target", "source"), "τ at the move's target (SA) or source (diffusers)"),
        "rescale": Option(True, boolean, "SA's few-steps order-2 coefficients (diffusers' only form)"),
        "lower_order_final": Option(True, boolean, "below 15 moves: lower predictor/corrector orders at the end"),
    },
    summary="SA-Solver: stochastic Adams predictor-corrector (PEC) on the tau-SDE, N NFE with denoise",
    check=_check,
)

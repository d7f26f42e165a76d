"""UniPC (Zhao et al. 2023): the unified predictor–corrector of the probability-flow ODE in
data-prediction form, for any process x_t = m·x0 + σ·z with half log-SNR λ = log(m/σ).

A move s → t, h = λ_t − λ_s > 0, from x_s with data predictions D_s (now) and D_{s_k} at earlier
points (r_k = (λ_{s_k} − λ_s)/h < 0):

    x_t = (σ_t/σ_s)·x_s + m_t·(1 − e^{−h})·D_s + m_t·B(h)·Σ_k ρ_k·(D_{s_k} − D_s)/r_k,

B(h) = h (``variant="bh1"``) or e^h − 1 taken at −h, i.e. 1 − e^{−h} (``"bh2"``). With
g_1 = (e^{−h} − 1)/(−h) − 1 and g_{i+1} = g_i/(−h) − 1/(i+1)!, b_i = g_i·i!/B(h) (B signed at −h),
the predictor UniP-p (p − 1 earlier points) takes ρ = ½ at p = 2 and otherwise solves
Σ_k ρ_k r_k^{i−1} = b_i, i < p; p = 1 is DDIM. The corrector UniC-p re-takes the same move from
the same x_s once D_t at the predicted point is known, with the points of the predictor plus t
(r = 1): ρ solves the p × p system (ρ = ½ at p = 1). Its evaluation is the one the next predictor
needs, so the corrector costs no NFE; the corrected x_t starts the next move and the history keeps
D at the predicted points (as in the paper and diffusers).

Fixed grid: warm-up orders 1, 2, …; UniC after every move except the last (the last move's point is
only denoised, by the front door's Tweedie step at t_end, which evaluates D at the predicted point:
diffusers' final step to σ = 0 returns the same). ``lower_order_final`` (default True): with fewer
than 15 moves, move i uses at most order moves − i + 1 (diffusers applies this rule at every step
count; so below 15 moves the two agree, and above it fastsde keeps the full order). N grid points
cost N NFE with the denoise. Orders: UniP-p is order p, and with the corrector order p + 1 (the
first move is first order: its O(h³) error after UniC, O(h²) without, bounds the order at 3, or 2
without the corrector, but from σ_max the flow damps it: measured 3.9-4.3 for p = 3 with UniC on an
exact Gaussian; without UniC, p = 3 measures 2.0 on a short σ range and is declared 2).

Defaults by measurement (64-D exact mixture in EDM form, 4096 samples, per-mode Fréchet distance,
floor 0.011): p = 2 with ``bh2`` on a log-SNR grid reaches 0.018 / 0.0135 / 0.0123 at 10 / 12 / 16
NFE; p = 3 0.135 / 0.030 / 0.013; on the Karras grid p = 3 is 0.69 / 0.87 / 0.028 (diffusers'
UniPC-3 with Karras σ gives the same numbers) and ``bh1`` is worse still below 16 NFE.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..grids import GRIDS, check_grid_choice, default_grid
from ..sde import SDE, broadcast_to_rows
from .core.common import LOWER_ORDER_FINAL_BELOW, grid_coefficients
from .core.options import Option, boolean, grid_options, one_of
from .core.spec import SolverSpec, fixed_grid
from .core.stepper import State, Step, Stepper, StepResult, denoised, starts_at_zero_mean

__all__ = ["UNIPC", "UniPC", "unipc_b"]


def _g_series(hh: Tensor, i: int, terms: int = 18) -> Tensor:
    """g_i = Σ_{j ≥ 1} hh^j/(i + j)! = (e^{hh} − Σ_{l ≤ i} hh^l/l!)/hh^i for |hh| < 1, summed by Horner
    (no cancellation; 18 terms reach float64 precision)."""
    out = torch.full_like(hh, 1.0 / math.factorial(i + terms))
    for j in range(terms - 1, 0, -1):
        out = out * hh + 1.0 / math.factorial(i + j)
    return out * hh


def unipc_b(h: Tensor, p: int, variant: str) -> tuple[Tensor, Tensor, Tensor]:
    """(e^{−h} − 1, B at −h, b (n, p)) for steps h > 0 (n,) in λ, float64: b_i = g_i·i!/B with g_i from
    its series where |h| < 1 and from the recursion g_{i+1} = g_i/(−h) − 1/(i+1)! elsewhere."""
    hh = -h
    phi1 = torch.expm1(hh)
    bh = hh if variant == "bh1" else phi1
    small = hh.abs() < 1.0
    safe = torch.where(small, torch.full_like(hh, -1.0), hh)
    g = phi1 / safe - 1.0
    cols, fact = [], 1.0
    for i in range(1, p + 1):
        cols.append(torch.where(small, _g_series(hh, i), g) * fact / bh)
        fact *= i + 1
        g = g / safe - 1.0 / fact
    return phi1, bh, torch.stack(cols, dim=1)


def _det(m: Tensor) -> Tensor:
    """Determinants of a batch of 1×1, 2×2 or 3×3 matrices (closed form: LAPACK's per-matrix overhead
    dominates at these sizes)."""
    q = m.shape[-1]
    if q == 1:
        return m[:, 0, 0]
    if q == 2:
        return m[:, 0, 0] * m[:, 1, 1] - m[:, 0, 1] * m[:, 1, 0]
    return (
        m[:, 0, 0] * (m[:, 1, 1] * m[:, 2, 2] - m[:, 1, 2] * m[:, 2, 1])
        - m[:, 0, 1] * (m[:, 1, 0] * m[:, 2, 2] - m[:, 1, 2] * m[:, 2, 0])
        + m[:, 0, 2] * (m[:, 1, 0] * m[:, 2, 1] - m[:, 1, 1] * m[:, 2, 0])
    )


def _solve_small(m: Tensor, rhs: Tensor) -> Tensor:
    """Batched m·ρ = rhs for q ≤ 3 by Cramer's rule; (n, q, q), (n, q) -> (n, q)."""
    det = _det(m)
    cols = []
    for k in range(m.shape[-1]):
        mk = m.clone()
        mk[:, :, k] = rhs
        cols.append(_det(mk) / det)
    return torch.stack(cols, dim=1)


class UniPC(Stepper):
    """UniPC (UniP-p with UniC): order p + 1 with the corrector, p without; 1 NFE per move."""

    order = 3.0
    coordinate = "logsnr"
    #: from m = 0 (λ = −∞) its first move is x_s = (σ_s/σ_t)·x + m_s·x̂0, exact in x̂0 (e^{−h} = 0); the
    #: corrector of that move is the h → ∞ limit of UniC-1, x_s = (σ_s/σ_t)·x + m_s·(x̂0(t) + x̂0(s))/2
    singular_start = True

    @classmethod
    def declared_order(cls, options: Mapping[str, Any]) -> float:
        p = int(options.get("order", 2))
        # without the corrector the first (Euler) move's O(h²) error bounds the order at 2
        return float(p + 1 if options.get("corrector", True) else min(p, 2))

    def init(self, x: Tensor) -> tuple[State, Tensor | None]:
        n, dev = x.shape[0], x.device
        p = int(self.options["order"])
        state: State = {
            "known": torch.zeros(n, dtype=torch.int64, device=dev),  # earlier points in the history
            "p_last": torch.zeros(n, dtype=torch.int64, device=dev),  # order of the move that got here; 0: none
            "x_last": torch.zeros_like(x),  # where that move started (corrected)
        }
        for k in range(1, p + 1):
            state[f"D{k}"] = torch.zeros_like(x)
            state[f"t{k}"] = torch.zeros(n, dtype=torch.float64, device=dev)
        return state, None

    def reset(self, state: State, rows: Tensor) -> None:
        rd = rows.to(state["known"].device)
        state["known"][rd] = 0
        state["p_last"][rd] = 0

    def _move(
        self,
        x_s: Tensor,
        t_s: Tensor,
        t_t: Tensor,
        d_s: Tensor,
        hist: list[tuple[Tensor, Tensor, Tensor]],
        order: Tensor | int,
        d_t: Tensor | None,
        coef: Tensor | None = None,
    ) -> Tensor:
        """The UniP-p move s → t (``d_t`` None) or the UniC-p move with D_t known, p = ``order`` per row
        (1 … len(hist) + 1); ``hist`` holds the earlier points (D_k, t_k, valid_k), invalid ones get
        placeholders (their rows never use them). An int order (a fixed grid: every row's, known on the
        host) computes that order's move only, from the points it uses; ``coef`` is then the move's row of
        :meth:`b_table` (φ1, B(h), b), made once per run."""
        if isinstance(order, int):
            hist = hist[: max(order - 1, 0)]
        sde, dt = self.sde, x_s.dtype

        def rows(v: Tensor) -> Tensor:
            return broadcast_to_rows(v.to(dt), x_s)

        p_max = len(hist) + 1
        lam_s = sde.log_snr(t_s)
        h = sde.log_snr(t_t) - lam_s
        if coef is None:
            phi1, bh, b = unipc_b(h, p_max, self.options["variant"])
        else:
            phi1, bh, b = coef[0], coef[1], coef[2 : 2 + p_max].expand(h.shape[0], -1)
        m_t = sde.mean_coeff(t_t)
        base = rows(sde.marginal_std(t_t) / sde.marginal_std(t_s)) * x_s + rows(-m_t * phi1) * d_s
        r = []
        for k, (_, t_k, ok) in enumerate(hist, start=1):
            safe_t = torch.where(ok, t_k, t_s)
            r.append(torch.where(ok, (sde.log_snr(safe_t) - lam_s) / h, torch.full_like(h, -float(k))))
        diffs = [(d_k - d_s) / rows(r_k) for (d_k, _, _), r_k in zip(hist, r)]
        scale = rows(m_t * bh)
        half = torch.full_like(h, 0.5)[:, None]
        out = base
        for p in range(1, p_max + 1) if not isinstance(order, int) else [order]:
            if d_t is None:  # UniP-p: the p − 1 earlier points
                q_r, q_d = r[: p - 1], diffs[: p - 1]
            else:  # UniC-p: those and the new point (r = 1)
                q_r, q_d = [*r[: p - 1], torch.ones_like(h)], [*diffs[: p - 1], d_t - d_s]
            if not q_d:
                move = base
            else:
                if len(q_d) == 1 and (d_t is not None or p == 2):
                    rho = half
                else:
                    rk = torch.stack(q_r, dim=1)  # (n, q)
                    mat = torch.stack([rk**i for i in range(len(q_r))], dim=1)  # (n, powers, points)
                    rho = _solve_small(mat, b[:, : len(q_r)])
                move = base - scale * sum(rows(rho[:, k]) * q_d[k] for k in range(len(q_d)))
            if isinstance(order, int):
                return move
            out = torch.where(broadcast_to_rows(order == p, x_s), move, out)
        return out

    def b_table(self, t: Tensor) -> Tensor:
        """Per move of a grid of points t (float64): (φ1, B(h), b_1 … b_{order+1}) of :func:`unipc_b`."""
        lam = self.sde.log_snr(t)
        phi1, bh, b = unipc_b(lam[1:] - lam[:-1], int(self.options["order"]) + 1, self.options["variant"])
        return torch.cat([phi1[:, None], bh[:, None], b], dim=1)

    def _host_orders(self, s: Step) -> tuple[int, int, int]:
        """(p_now, p_last, p_corr) of every row on a fixed grid, from the host's history count (the rules of
        :meth:`step`'s per-row path: a point enters the history only with a finite λ)."""
        k, history = int(s.k), int(s.history)

        def usable(move: int, known: int, first: int) -> int:
            """Finite points among history points first … order − 2 of a move at grid index ``move``: every
            grid point has a finite λ but the start of a solve from m = 0 (λ = −∞)."""
            order = int(self.options["order"])
            finite = [j for j in range(first, first + order - 1) if known > j]
            return sum(1 for j in finite if move - 1 - j > 0 or not self.from_zero_mean)

        def p_of(move: int, hist: int) -> int:
            order = int(self.options["order"])
            known = min(hist, order)
            p = min(min(known, usable(move, known, 0)) + 1, order)
            if self.options["lower_order_final"] and s.moves is not None and s.moves < LOWER_ORDER_FINAL_BELOW:
                p = min(p, s.moves - move + 1)
            return p

        p_last = p_of(k - 1, history - 1) if history > 0 else 0
        p_corr = min(p_last, usable(k, min(history, int(self.options["order"])), 1) + 1)
        return p_of(k, history), p_last, p_corr

    def step(self, x: Tensor, s: Step) -> StepResult:
        sde, dt = self.sde, x.dtype
        order = int(self.options["order"])
        singular = self.singular_move(s)
        d_t = denoised(sde, s, x, s.t, True) if singular else sde.denoise(x, s.t, s.score0())
        known, p_last = s.get("known"), s.get("p_last")
        ds = [s.get(f"D{k}") for k in range(1, order + 1)]
        ts = [s.get(f"t{k}") for k in range(1, order + 1)]
        # a point at λ = −∞ (the start of a solve from m = 0) enters no polynomial: its r = −∞ and its
        # term vanishes in the limit; it stays the corrector's start (d_s) of the move that left it
        finite = [known > k for k in range(order)]
        finite = [ok & torch.isfinite(sde.log_snr(torch.where(ok, t_k, s.t64))) for ok, t_k in zip(finite, ts)]

        def hist(first: int, count: int) -> tuple[list[tuple[Tensor, Tensor, Tensor]], Tensor]:
            points = [(ds[k], ts[k], finite[k]) for k in range(first, first + count)]
            usable = sum((ok.to(torch.int64) for _, _, ok in points), torch.zeros_like(known))
            return points, usable

        host = self._host_orders(s) if s.history is not None else None  # (p_now, p_last, p_corr) on a grid
        x_here = x
        if self.options["corrector"] and (host is None or host[1] > 0):
            x_last = s.get("x_last")
            t_prev = torch.where(p_last > 0, ts[0], s.t_next64) if host is None else ts[0]
            points, usable = hist(1, order - 1)
            p_corr = torch.minimum(p_last, usable + 1) if host is None else host[2]
            coef = None if host is None else grid_coefficients(self, s, self.b_table, int(s.k) - 1, float64=True)
            corrected = self._move(x_last, t_prev, s.t64, ds[0], points, p_corr, d_t, coef)
            x_here = torch.where(broadcast_to_rows(p_last > 0, x), corrected, x_here) if host is None else corrected
        points, usable = hist(0, order - 1)
        if host is None:
            p_now = torch.clamp(torch.minimum(known, usable) + 1, max=order)
            if self.options["lower_order_final"] and s.moves is not None and s.moves < LOWER_ORDER_FINAL_BELOW:
                p_now = torch.minimum(p_now, (s.moves - s.index + 1).to(p_now.device))
            p_state = p_now
        else:
            p_now, p_state = host[0], torch.full_like(p_last, host[0])
        coef = None if host is None else grid_coefficients(self, s, self.b_table, float64=True)
        x_next = self._move(x_here, s.t64, s.t_next64, d_t, points, p_now, None, coef)
        state: State = {"known": torch.clamp(known + 1, max=order), "p_last": p_state, "x_last": x_here}
        for k in range(1, order + 1):
            state[f"D{k}"] = d_t if k == 1 else ds[k - 2]
            state[f"t{k}"] = s.t64 if k == 1 else ts[k - 2]
        return StepResult(x=x_next.to(dt), state=state, x0_hat=d_t)


def _default_grid(sde: SDE) -> str:
    """logsnr on every process, but where m(T) = 0 (a rectified flow: λ(T) = −∞) the process's default."""
    return default_grid(sde, "exp") if starts_at_zero_mean(sde, float(sde.T)) else "logsnr"


UNIPC = SolverSpec(
    name="unipc",
    build=fixed_grid(UniPC),
    stepper=UniPC,
    options={
        **grid_options(20, "exp"),
        # uniform in log-SNR on every process, EDM included (measured: on EDM's Karras grid UniPC is
        # unstable below ~16 NFE, the large late λ-steps)
        "grid": Option(
            _default_grid,
            check_grid_choice,
            f"time grid: one of {', '.join(GRIDS)} (default logsnr, on every process), or explicit times",
        ),
        "order": Option(2, one_of(1, 2, 3), "predictor order p (the corrector makes the method order p + 1)"),
        "variant": Option("bh2", one_of("bh1", "bh2"), "B(h): 'bh1' h, 'bh2' e^h − 1"),
        "corrector": Option(True, boolean, "UniC after every move but the last (no extra NFE)"),
        "lower_order_final": Option(True, boolean, "below 15 moves: move i at most order moves − i + 1"),
    },
    summary="UniPC: UniP-p predictor with the UniC corrector in data prediction, N NFE with denoise",
)

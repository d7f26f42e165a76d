"""Adams–Bashforth steps of the probability-flow ODE in EDM coordinates, shared by ``lms``, ``ipndm``
and ``deis``.

Any process x_t = m·x0 + σ·z becomes, in x̃ = x/m with noise level σ̃ = σ/m, the EDM process whose
PF-ODE is dx̃/dσ̃ = d, d = (x̃ − x̂0)/σ̃ = ε̂ (x̂0 the Tweedie denoiser). An explicit multistep move
from grid point i to i + 1 is

    x̃_{i+1} = x̃_i + Σ_{j<k} c_j·d_{i−j},

with k = min(points known, order) and weights c_j that each method computes per row (per-sample
times are allowed; nothing assumes one grid for the batch). The history (the last order − 1 values
of d and the coordinate of their points) lives in the stepper state and is forgotten where a
corrector moves a sample (the method restarts at first order there).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..sde import broadcast_to_rows
from .core.common import gauss_legendre, lagrange_integrals
from .core.stepper import State, Step, Stepper, StepResult

__all__ = ["EDMAdams", "gauss_legendre", "lagrange_integrals"]


class EDMAdams(Stepper):
    """Base of the explicit multistep methods on dx̃/dσ̃ = d. Subclasses set :meth:`max_order`,
    :meth:`node` (the per-row coordinate of a point that their weights use) and :meth:`weights`."""

    order = 1.0

    def max_order(self) -> int:
        raise NotImplementedError

    def node(self, t64: Tensor) -> Tensor:
        """The coordinate of the points at times t64 that :meth:`weights` reads (float64)."""
        return self.sde.edm_sigma(t64)

    def weights(self, k: int, nodes: Tensor, s: Step, sig: Tensor, sig_next: Tensor) -> Tensor:
        """(n, k) float64 weights c_j of d_{i−j} (j = 0 now) for a k-point move σ̃ = sig → sig_next;
        ``nodes[:, j]`` is the coordinate of point i − j."""
        raise NotImplementedError

    def orders(self, s: Step, known: Tensor) -> Tensor:
        """Per-row number of points the move uses (1 + the past points known, at most max_order)."""
        return torch.clamp(known + 1, max=self.max_order())

    def init(self, x: Tensor) -> tuple[State, Tensor | None]:
        n, dev = x.shape[0], x.device
        state: State = {"known": torch.zeros(n, dtype=torch.int64, device=dev)}
        for j in range(1, self.max_order()):
            state[f"d{j}"] = torch.zeros_like(x)
            state[f"n{j}"] = torch.zeros(n, dtype=torch.float64, device=dev)
        return state, None

    def reset(self, state: State, rows: Tensor) -> None:
        state["known"][rows.to(state["known"].device)] = 0

    def step(self, x: Tensor, s: Step) -> StepResult:
        sde, dt = self.sde, x.dtype
        k_max = self.max_order()
        m, m_next = sde.mean_coeff(s.t64), sde.mean_coeff(s.t_next64)
        sig, sig_next = sde.edm_sigma(s.t64), sde.edm_sigma(s.t_next64)
        x0 = sde.denoise(x, s.t, s.score0())
        xt = x if sde.unit_mean else x / broadcast_to_rows(m.to(dt), x)
        d = (xt - x0) / broadcast_to_rows(sig.to(dt), x)
        if s.history is not None:  # a fixed grid: one order for every row, weights made once per run
            return self._grid_move(x, s, xt, d, x0, m_next)
        known = s.get("known")
        here = self.node(s.t64)
        ds = [d] + [s.get(f"d{j}") for j in range(1, k_max)]
        past = [s.get(f"n{j}") for j in range(1, k_max)]
        # unknown points get distinct placeholder coordinates (their weights are computed, never used)
        nodes = [here] + [
            torch.where(known >= j, past[j - 1], here + j * (sig - sig_next).abs().clamp_min(1.0))
            for j in range(1, k_max)
        ]
        order = self.orders(s, known)
        out = xt
        for k in range(1, k_max + 1):
            c = self.weights(k, torch.stack(nodes[:k], dim=1), s, sig, sig_next)
            move = sum(broadcast_to_rows(c[:, j].to(dt), x) * ds[j] for j in range(k))
            out = torch.where(broadcast_to_rows(order == k, x), xt + move, out)
        state: State = {"known": torch.clamp(known + 1, max=k_max - 1)}
        for j in range(1, k_max):
            state[f"d{j}"] = ds[j - 1]
            state[f"n{j}"] = here if j == 1 else past[j - 2]
        return StepResult(x=broadcast_to_rows(m_next.to(dt), x) * out, state=state, x0_hat=x0)

    def _grid_move(self, x: Tensor, s: Step, xt: Tensor, d: Tensor, x0: Tensor, m_next: Tensor) -> StepResult:
        """The move of every row on a fixed grid: order min(history + 1, max_order) known on the host, its
        weights read from a table of the whole grid's (:meth:`_grid_weights`); the state as :meth:`step`."""
        dt, k_max = x.dtype, self.max_order()
        order = min(int(s.history) + 1, k_max)
        ds = [d] + [s.get(f"d{j}") for j in range(1, order)]
        c = self._grid_weights(s, order)[int(s.k)].to(dt)
        move = c[0] * ds[0]
        for j in range(1, order):
            move.add_(c[j] * ds[j])  # in place on the fresh sum: the same additions, fewer allocations
        out = move.add_(xt)  # xt + move (addition commutes exactly)
        state: State = {"known": torch.clamp(s.get("known") + 1, max=k_max - 1)}
        for j in range(1, k_max):
            state[f"d{j}"] = d if j == 1 else s.get(f"d{j - 1}")
            state[f"n{j}"] = self.node(s.t64) if j == 1 else s.get(f"n{j - 1}")
        if not self.sde.unit_mean:
            out = broadcast_to_rows(m_next.to(dt), x) * out
        return StepResult(x=out, state=state, x0_hat=x0)

    def _grid_weights(self, s: Step, order: int) -> Tensor:
        """(moves, order) float64 weights of every move i ≥ order − 1 of the grid ``s.grid`` from its
        points i, i − 1, ..., i − order + 1 (rows before are unused zeros); made once per grid and order."""
        cache = self.__dict__.setdefault("_weight_tables", {})
        key = (id(s.grid), order)
        if key not in cache:
            grid = s.grid.to(s.t64.device)
            moves = grid.shape[0] - 1
            nodes_all, sig_all = self.node(grid), self.sde.edm_sigma(grid)
            first = order - 1
            if first >= moves:
                table = torch.zeros(moves, order, dtype=torch.float64, device=grid.device)
            else:
                idx = torch.arange(first, moves, device=grid.device)
                nodes = torch.stack([nodes_all[idx - j] for j in range(order)], dim=1)
                w = self.weights(order, nodes, s, sig_all[idx], sig_all[idx + 1])
                table = torch.cat([torch.zeros(first, order, dtype=torch.float64, device=grid.device), w])
            cache.clear()  # one grid at a time
            cache[key] = (s.grid, table)  # the grid is kept so that its id is not reused meanwhile
        return cache[key][1]

"""Brownian paths of the adaptive solvers: the noise a step sees over [c, c + h] in the solver's
coordinate c (t for Gotta Go Fast, half log-SNR λ for the exponential integrators).

A path is a Gaussian process W with independent increments and Var(W(b) − W(a)) = v(b) − v(a) for an
increasing variance function v. Three kinds, all drawn from the keyed :class:`~fastsde.noise.NoiseSource`
so that sample i depends only on its seed:

- :class:`FreshPath`: new increments for every attempt, keyed by (sample, attempt) — Gotta Go Fast's
  rule. A rejected step is retried with other noise, which favours small draws among accepted steps.
- :class:`BrownianTree`: a per-sample Brownian tree on [c0, c1]; W(p) is a function of the seed only.
- :class:`BrownianMemory`: revealed lazily with memory of every point drawn beyond the current one
  (rejection sampling with memory); one draw per query.

Every path answers ``increments(points, rows, attempt, c)``: W(p) − W(c) for the increasing per-row
coordinates ``points`` (float64), and is told ``advance(rows, c_new)`` when rows accept a step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .noise import NoiseSource, Stream
from .sde import broadcast_to_rows

__all__ = ["BrownianPath", "FreshPath", "BrownianTree", "BrownianMemory", "make_path", "PATHS"]

#: Stream of the tree and memory paths' draws (fresh paths use Stream.STEP, keyed by attempt).
_TREE_STREAM = Stream.USER + 1
PATHS = ("fresh", "tree", "memory")


class BrownianPath:
    """What the driver asks of a path (see the module docstring)."""

    def increments(self, points: list[Tensor], rows: Tensor, attempt: Tensor, c: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def advance(self, rows: Tensor, ok: Tensor, c_new: Tensor) -> None:
        """Rows of the last query with ``ok`` moved to c_new (their last queried point)."""


class FreshPath(BrownianPath):
    """Independent increments for every attempt (GGF): draw j of attempt a is keyed (a·4 + j)."""

    def __init__(self, noise: NoiseSource, like: Tensor, variance: Callable[[Tensor], Tensor]) -> None:
        self.noise, self.v, self.shape, self.device = noise, variance, like.shape[1:], like.device

    def increments(self, points: list[Tensor], rows: Tensor, attempt: Tensor, c: Tensor) -> list[Tensor]:
        f64 = torch.float64
        out = []
        w, c_prev = torch.zeros((c.shape[0], *self.shape), dtype=f64, device=self.device), c
        for j, p in enumerate(points):
            z = self.noise.normal(self.shape, Stream.STEP, attempt * 4 + j, rows, dtype=f64, device=self.device)
            w = w + broadcast_to_rows((self.v(p) - self.v(c_prev)).clamp_min(0).sqrt(), w) * z
            out.append(w)
            c_prev = p
        return out


class BrownianTree:
    """A per-sample Brownian path on [c0, c1], fixed by the sample's seed, queried at any point.

    W has independent Gaussian increments with Var(W(b) − W(a)) = v(b) − v(a) for an increasing
    variance function v (v(c) = c: Brownian motion; v(λ) = e^{2λ}: the time-changed noise of the
    exponential integrators). W(c0) = 0, W(c1) is drawn at the root, and W at the midpoint of
    every dyadic interval is drawn from the Brownian bridge with keyed noise whose counter is the
    node's heap index, so W(p) is a pure function of (seed, p): a rejected step that is retried
    with a smaller h sees the same path (no selection bias from rejecting large noise draws; Rackauckas
    & Nie's "rejection sampling with memory" in effect). ``levels`` bisections leave an interval of
    (c1 − c0)·2^−levels, inside which W is interpolated by the bridge mean.
    """

    def __init__(
        self,
        noise: NoiseSource,
        like: Tensor,
        c0: float,
        c1: float,
        variance: Callable[[Tensor], Tensor],
        levels: int = 32,
    ) -> None:
        self.noise, self.c0, self.c1, self.v, self.levels = noise, c0, c1, variance, levels
        self.dtype, self.device, self.shape = like.dtype, like.device, like.shape[1:]

    def _normal(self, counter: Tensor, rows: Tensor) -> Tensor:
        z = self.noise.normal(self.shape, _TREE_STREAM, counter, rows, dtype=torch.float64, device=self.device)
        return z

    def __call__(self, p: Tensor, rows: Tensor) -> Tensor:
        """W(p) for per-row coordinates p (float64), rows = sample indices; float64 result."""
        m = p.shape[0]
        f64 = torch.float64
        lo = torch.full((m,), self.c0, dtype=f64, device=self.device)
        hi = torch.full((m,), self.c1, dtype=f64, device=self.device)
        v_lo, v_hi = self.v(lo), self.v(hi)
        w_lo = torch.zeros((m, *self.shape), dtype=f64, device=self.device)
        root = torch.zeros(m, dtype=torch.int64)
        w_hi = broadcast_to_rows((v_hi - v_lo).sqrt(), w_lo) * self._normal(root, rows)
        node = torch.ones(m, dtype=torch.int64)
        tiny = torch.finfo(f64).tiny
        for _ in range(self.levels):
            mid = 0.5 * (lo + hi)
            v_mid = self.v(mid)
            span = (v_hi - v_lo).clamp_min(tiny)
            frac = ((v_mid - v_lo) / span).clamp(0.0, 1.0)
            std = ((v_mid - v_lo).clamp_min(0) * (v_hi - v_mid).clamp_min(0) / span).sqrt()
            w_mid = (
                w_lo
                + broadcast_to_rows(frac, w_lo) * (w_hi - w_lo)
                + broadcast_to_rows(std, w_lo) * self._normal(node, rows)
            )
            right = p >= mid
            rd = broadcast_to_rows(right, w_lo)
            lo, v_lo, w_lo = torch.where(right, mid, lo), torch.where(right, v_mid, v_lo), torch.where(rd, w_mid, w_lo)
            hi, v_hi, w_hi = torch.where(right, hi, mid), torch.where(right, v_hi, v_mid), torch.where(rd, w_hi, w_mid)
            node = 2 * node + right.cpu().to(torch.int64)
        frac = ((self.v(p) - v_lo) / (v_hi - v_lo).clamp_min(tiny)).clamp(0.0, 1.0)
        return w_lo + broadcast_to_rows(frac, w_lo) * (w_hi - w_lo)


class BrownianMemory:
    """A per-sample Brownian path revealed lazily: rejection sampling with memory (Rackauckas & Nie 2017).

    Each sample keeps its current point (c, W(c)) and every point of its path already revealed
    beyond c (by attempts that were rejected, or by the earlier queries of the same attempt). A new
    query p is drawn from the exact conditional law given those points, which by the Markov property
    is the Brownian bridge between its nearest revealed neighbours (or a free increment past the last
    one), with variance function v as for :class:`BrownianTree`. So a retried step sees the same
    path as the rejected one (no selection bias), at the cost of one keyed normal draw per query
    instead of one per tree level. Unlike the tree, the path is a function of the seed *and* of the
    sequence of queries, so different tolerances see different paths.
    """

    def __init__(self, noise: NoiseSource, like: Tensor, c0: float, variance: Callable[[Tensor], Tensor]) -> None:
        n, self.shape = like.shape[0], like.shape[1:]
        self.noise, self.v, self.device = noise, variance, like.device
        f64 = torch.float64
        self.c = torch.full((n,), float(c0), dtype=f64, device=like.device)
        self.w = torch.zeros((n, *self.shape), dtype=f64, device=like.device)
        self.ahead_c = torch.full((n, 2), math.inf, dtype=f64, device=like.device)  # +inf: empty slot
        self.ahead_w = torch.zeros((n, 2, *self.shape), dtype=f64, device=like.device)
        self.queries = torch.zeros(n, dtype=torch.int64)

    def __call__(self, p: Tensor, rows: Tensor) -> Tensor:
        """W(p) for per-row coordinates p ≥ c (float64), rows = sample indices; the point is remembered."""
        rd = rows.to(self.device)
        m, f64, tiny = rows.shape[0], torch.float64, torch.finfo(torch.float64).tiny
        fc, fw = self.ahead_c[rd], self.ahead_w[rd]
        ar = torch.arange(m, device=self.device)
        below = fc <= p[:, None]
        left = torch.where(below, fc, torch.full_like(fc, -math.inf))
        li = left.argmax(dim=1)
        has_left = torch.isfinite(left[ar, li])
        a = torch.where(has_left, left[ar, li], self.c[rd])
        wa = torch.where(broadcast_to_rows(has_left, self.w[rd]), fw[ar, li], self.w[rd])
        right = torch.where(fc >= p[:, None], fc, torch.full_like(fc, math.inf))  # empty slots are +inf
        ri = right.argmin(dim=1)
        has_right = torch.isfinite(right[ar, ri])
        b = torch.where(has_right, right[ar, ri], p)
        wb = fw[ar, ri]
        va, vp, vb = self.v(a), self.v(p), self.v(b)
        span = (vb - va).clamp_min(tiny)
        frac = torch.where(has_right, ((vp - va) / span).clamp(0.0, 1.0), torch.zeros_like(p))
        var = torch.where(has_right, (vp - va).clamp_min(0) * (vb - vp).clamp_min(0) / span, (vp - va).clamp_min(0))
        z = self.noise.normal(self.shape, _TREE_STREAM, self.queries[rows], rows, dtype=f64, device=self.device)
        self.queries[rows] += 1
        w = wa + broadcast_to_rows(frac, wa) * (wb - wa) + broadcast_to_rows(var.sqrt(), wa) * z
        self._remember(rd, p, w)
        return w

    def _remember(self, rd: Tensor, p: Tensor, w: Tensor) -> None:
        new = p > self.c[rd]  # queries at the current point (idle rows) add nothing
        if not bool(new.any()):
            return
        fc = self.ahead_c[rd]
        free = torch.isinf(fc)
        if not bool(free[new].any(dim=1).all()):  # some row has no empty slot: widen for everyone
            n, k = self.ahead_c.shape
            self.ahead_c = torch.cat([self.ahead_c, torch.full_like(self.ahead_c, math.inf)], dim=1)
            self.ahead_w = torch.cat([self.ahead_w, torch.zeros_like(self.ahead_w)], dim=1)
            fc = self.ahead_c[rd]
            free = torch.isinf(fc)
        slot = free.to(torch.int64).argmax(dim=1)  # first empty slot
        sel = rd[new]
        self.ahead_c[sel, slot[new]] = p[new]
        self.ahead_w[sel, slot[new]] = w[new]

    def advance(self, rows: Tensor, c_new: Tensor, w_new: Tensor) -> None:
        """Rows moved to c_new with W(c_new) = w_new: forget the revealed points at or before it."""
        rd = rows.to(self.device)
        self.c[rd], self.w[rd] = c_new, w_new
        fc = self.ahead_c[rd]
        self.ahead_c[rd] = torch.where(fc <= c_new[:, None], torch.full_like(fc, math.inf), fc)


class _TreePath(BrownianPath):
    """The driver's view of a :class:`BrownianTree`: increments from each row's current W(c)."""

    def __init__(self, noise: NoiseSource, like: Tensor, c0: float, c1: float, variance) -> None:
        self.tree = BrownianTree(noise, like, c0, c1, variance)
        self.w = torch.zeros((like.shape[0], *like.shape[1:]), dtype=torch.float64, device=like.device)
        self.last: Tensor | None = None

    def increments(self, points: list[Tensor], rows: Tensor, attempt: Tensor, c: Tensor) -> list[Tensor]:
        w0 = self.w[rows.to(self.w.device)]
        out = []
        for p in points:
            self.last = self.tree(p, rows)
            out.append(self.last - w0)
        return out

    def advance(self, rows: Tensor, ok: Tensor, c_new: Tensor) -> None:
        rd = rows.to(self.w.device)
        self.w[rd] = torch.where(broadcast_to_rows(ok, self.last), self.last, self.w[rd])


class _MemoryPath(BrownianPath):
    """The driver's view of a :class:`BrownianMemory`."""

    def __init__(self, noise: NoiseSource, like: Tensor, c0: float, variance) -> None:
        self.memory = BrownianMemory(noise, like, c0, variance)
        self.last: Tensor | None = None

    def increments(self, points: list[Tensor], rows: Tensor, attempt: Tensor, c: Tensor) -> list[Tensor]:
        w0 = self.memory.w[rows.to(self.memory.device)]
        out = []
        for p in points:
            self.last = self.memory(p, rows)
            out.append(self.last - w0)
        return out

    def advance(self, rows: Tensor, ok: Tensor, c_new: Tensor) -> None:
        if bool(ok.any()):
            self.memory.advance(rows[ok.cpu()], c_new[ok], self.last[ok])


def make_path(
    kind: str, noise: NoiseSource, like: Tensor, c0: float, c1: float, variance: Callable[[Tensor], Tensor]
) -> BrownianPath:
    """A Brownian path of the named kind on [c0, c1] for the samples of ``like``."""
    if kind == "fresh":
        return FreshPath(noise, like, variance)
    if kind == "tree":
        return _TreePath(noise, like, c0, c1, variance)
    if kind == "memory":
        return _MemoryPath(noise, like, c0, variance)
    raise ValueError(f"brownian must be one of {list(PATHS)}, got {kind!r}")

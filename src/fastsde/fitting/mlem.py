"""Fitting a learned ML-EM schedule (``fit_mlem``, ``fastsde fit-mlem``): p_k(t) for ``solver="mlem"``
by stochastic gradient; the schedule itself is :class:`~fastsde.artifacts.mlem.MLEMSchedule`.

The objective is the paper's trade-off (Jacot 2026, §4 of the method): the pathwise mean squared error
per dimension of ML-EM's samples to the coupled reference (EM with the finest level on the same grid,
same x_T, same Brownian path) plus λ × the expected compute per sample relative to that reference's,

    J(θ) = E‖X̂₀(θ) − X₀^ref‖²/d + λ·E[cost(θ)]/cost_ref.

The gradient of the MSE has two parts, because p enters both the law of the draws B_k and the
weights 1/p_k of the drawn corrections:

- the score-function (likelihood-ratio) part over the Bernoulli draws, E[(F − b)·Σ (B − p)/(p(1 − p))·∂p/∂θ],
  with the batch's leave-one-out mean as the baseline b;
- the pathwise part through the weights, 2⟨X̂₀ − X₀^ref, ∂X̂₀/∂θ⟩, with ∂X̂₀/∂θ carried forward as a
  tangent through every move. The tangent's Jacobian term uses the coarsest level's Jacobian
  (a forward difference of f_1 along the tangent: one extra evaluation of f_1 per parameter and
  move, counted in the fit's cost) in place of the randomised score's.

The expected cost is differentiated exactly. The fit starts from the ``p="auto"`` schedule at
``budget`` (the theory rule), with λ its shadow price (the marginal MSE per unit of cost of the
theory rule's allocation), so by default the learned schedule aims at the same trade-off and keeps
the best θ of the iterations on a fixed set of evaluation draws. Unbiased: every drawn correction
keeps the weight 1/p_k.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..artifacts.artifact import model_fingerprint
from ..artifacts.mlem import MLEMSchedule, powers, probabilities, schedule_grid, unit_time
from ..levels import Levels
from ..noise import NoiseSource, Stream, check_seed
from ..sde import SDE, broadcast_to_rows
from ..solvers import SOLVERS
from ..solvers.core.common import posterior_step
from ..solvers.mlem_schedule import auto_schedule

__all__ = ["fit_mlem"]

#: the seed offset of the fit's evaluation draws (the training draws use seed + 1 + iteration)
EVAL_OFFSET = 7_919
#: the forward-difference step of the tangent, relative to the state's scale
FD_STEP = 1e-4


def _run_key(levels: Any, sde: SDE, options: dict[str, Any], t_end: float, shape, dtype, device):
    """The key of an ML-EM run (the run's and the levels' parts, each level's fingerprint) and each
    level's probe outputs."""
    key = {**MLEMSchedule.run_key(sde, "mlem", options, t_end), **MLEMSchedule.levels_key(levels, shape)}
    prints = [model_fingerprint(f, sde, tuple(shape), t_end, dtype, device) for f in levels.scores]
    key["levels"] = [p[0] for p in prints]
    return key, [p[1] for p in prints]


# ---------------------------------------------------------------------------------------------
# The fit
# ---------------------------------------------------------------------------------------------


class _Path:
    """The ML-EM recursion of ``solver="mlem"`` (same moves, same noise streams) on n samples,
    with the tangents of the end state with respect to θ."""

    def __init__(self, levels, sde: SDE, grid: Tensor, base: str, eta: float, x_T: Tensor, noise: NoiseSource):
        self.levels, self.sde, self.grid, self.base, self.eta = levels, sde, grid, base, eta
        self.x_T, self.noise = x_T, noise
        self.evals = torch.zeros(len(levels.scores), dtype=torch.float64)  # rows evaluated per level
        self.tangent_evals = torch.zeros(len(levels.scores), dtype=torch.float64)

    def _f(self, k: int, x: Tensor, t: Tensor) -> Tensor:
        self.evals[k] += x.shape[0]
        with torch.no_grad():
            return self.levels.scores[k](x, t)

    def _times(self, j: int, n: int, like: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.full((n,), float(self.grid[j]), dtype=like.dtype, device=like.device)
        tn = torch.full((n,), float(self.grid[j + 1]), dtype=like.dtype, device=like.device)
        return t, tn

    def move(self, x: Tensor, t: Tensor, tn: Tensor, score: Tensor, z: Tensor | None) -> Tensor:
        if self.base == "em":
            h = broadcast_to_rows(t - tn, x)
            out = x - h * self.sde.reverse_drift(x, t, score)
            return out if z is None else out + broadcast_to_rows(self.sde.diffusion(t), x) * h.sqrt() * z
        x0 = self.sde.denoise(x, t, score)
        return posterior_step(self.sde, x, x0, t, tn, self.eta, z if self.eta > 0 else None)

    def reference(self) -> Tensor:
        """EM (or DDIM) with the finest level on the grid: every p = 1."""
        x = self.x_T.clone()
        n, last = x.shape[0], len(self.levels.scores) - 1
        for j in range(self.grid.shape[0] - 1):
            t, tn = self._times(j, n, x)
            z = self.noise.normal(x.shape[1:], Stream.STEP, j, dtype=x.dtype, device=x.device)
            x = self.move(x, t, tn, self._f(last, x, t), z)
        return self.denoise(x)

    def denoise(self, x: Tensor) -> Tensor:
        t = torch.full((x.shape[0],), float(self.grid[-1]), dtype=x.dtype, device=x.device)
        return self.sde.denoise(x, t, self._f(len(self.levels.scores) - 1, x, t))

    def run(self, p: Tensor, dp: Tensor | None, draws: NoiseSource, direction: Tensor | None = None):
        """One ML-EM solve with the schedule p (moves, K−1). With dp (P, moves, K−1) = ∂p/∂θ, also the
        likelihood-ratio sums (n, P); with ``direction`` (moves, K−1) = Σ_m v_m·∂p/∂θ_m, also the
        tangent of the state along it (forward mode through the whole solve: the randomised score's
        Jacobian by a forward difference of every level on the rows where it was evaluated)."""
        x = self.x_T.clone()
        n, K = x.shape[0], len(self.levels.scores)
        P = 0 if dp is None else dp.shape[0]
        lr = torch.zeros(n, P, dtype=torch.float64)
        tan = torch.zeros_like(x) if direction is not None else None
        for j in range(self.grid.shape[0] - 1):
            t, tn = self._times(j, n, x)
            pj = p[j].to(torch.float64)
            z = draws.normal((K - 1,), Stream.BERNOULLI, j, dtype=torch.float64, device=x.device)
            draw = (0.5 * torch.erfc(-z / math.sqrt(2.0))) < pj
            eps = None
            if tan is not None:
                scale = float(tan.abs().max())
                eps = FD_STEP * (1.0 + float(x.abs().max())) / scale if scale > 0 else None
            outs, jvs = [self._f(0, x, t)], []
            if eps is not None:
                jvs.append((self._f(0, x + eps * tan, t) - outs[0]) / eps)
                self.tangent_evals[0] += n
            for k in range(1, K):
                need = draw[:, k - 1] if k == K - 1 else draw[:, k - 1] | draw[:, k]
                idx = need.nonzero().squeeze(1)
                full = torch.zeros_like(x)
                jfull = torch.zeros_like(x)
                if idx.numel():
                    full[idx] = self._f(k, x[idx], t[idx])
                    if eps is not None:
                        jfull[idx] = (self._f(k, x[idx] + eps * tan[idx], t[idx]) - full[idx]) / eps
                        self.tangent_evals[k] += idx.numel()
                outs.append(full)
                jvs.append(jfull)
            mixed = outs[0]
            dmixed = jvs[0] if eps is not None else torch.zeros_like(x)
            for k in range(K - 1):
                w = torch.where(draw[:, k], 1.0 / pj[k], torch.zeros_like(z[:, k])).to(x.dtype)
                if bool(draw[:, k].any()):
                    diff = outs[k + 1] - outs[k]
                    mixed = mixed + broadcast_to_rows(w, x) * diff
                    if tan is not None:  # d(B/p) = −(B/p²)·dp, and the levels' Jacobians along the tangent
                        dw = -(w / float(pj[k])).to(x.dtype) * float(direction[j, k])
                        dmixed = dmixed + broadcast_to_rows(dw, x) * diff
                        if eps is not None:
                            dmixed = dmixed + broadcast_to_rows(w, x) * (jvs[k + 1] - jvs[k])
                if P:
                    b = draw[:, k].to(torch.float64)
                    sc = (b - pj[k]) / (pj[k] * (1.0 - pj[k])).clamp_min(1e-12)
                    lr += sc[:, None] * dp[:, j, k][None, :]
            znext = self.noise.normal(x.shape[1:], Stream.STEP, j, dtype=x.dtype, device=x.device)
            if tan is not None:
                zero = torch.zeros_like(x)
                gain = self.move(zero, t, tn, torch.ones_like(x), None)
                tan = self.move(tan, t, tn, zero, None) + gain * dmixed
            x = self.move(x, t, tn, mixed, znext)
        return x, lr, tan

    def final(self, x: Tensor, tan: Tensor) -> tuple[Tensor, Tensor]:
        """The final denoise (finest level) and the tangent through it (the finest level's
        Jacobian by a forward difference)."""
        t = torch.full((x.shape[0],), float(self.grid[-1]), dtype=x.dtype, device=x.device)
        m = broadcast_to_rows(self.sde.mean_coeff(t), x)
        s2 = broadcast_to_rows(self.sde.marginal_std(t) ** 2, x)
        last = len(self.levels.scores) - 1
        f = self._f(last, x, t)
        scale = float(tan.abs().max())
        jv = torch.zeros_like(x)
        if scale > 0:
            eps = FD_STEP * (1.0 + float(x.abs().max())) / scale
            jv = (self._f(last, x + eps * tan, t) - f) / eps
            self.tangent_evals[last] += x.shape[0]
        return (x + s2 * f) / m, (tan + s2 * jv) / m


def _check_fit(n: Any, iters: Any, lr: Any, lam: Any, degree: Any, p_min: Any) -> None:
    for name, v in (("n", n), ("iters", iters), ("degree", degree)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "degree" else 1):
            raise ValueError(
                f"{name} must be a {'non-negative' if name == 'degree' else 'positive'} integer, got {v!r}"
            )
    if n < 2:
        raise ValueError(f"n must be at least 2 (the baseline is a leave-one-out mean), got {n}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if lam is not None and not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be None or a non-negative number, got {lam!r}")
    if not (isinstance(p_min, (int, float)) and 0 < p_min < 1):
        raise ValueError(f"p_min must lie in (0, 1), got {p_min!r}")


def _init_theta(auto: Tensor, basis: Tensor, p_min: float) -> Tensor:
    """Least squares of the auto schedule's logits on the basis: the fit's starting point."""
    q = ((auto - p_min) / (1.0 - p_min)).clamp(1e-6, 1 - 1e-6)
    logit = torch.log(q) - torch.log1p(-q)
    sol = torch.linalg.lstsq(basis, logit).solution  # (D, K−1)
    return sol.T.contiguous()


def _sample_dims(
    levels: Any, shape: Sequence[int] | None, t: float, dtype: torch.dtype, device: Any
) -> tuple[int, ...]:
    """fit_mlem's ``shape``: one sample's dims. Checked before compute against the dims the levels carry
    (a loaded model's ``shape``) or, where none do, by one score evaluation on 2 rows of that shape, so
    ``fastsde.sample``'s (n, *dims) is a ValueError naming both conventions, not an error inside the model."""
    known = None
    for f in levels.scores:
        known = getattr(f, "shape", None) or getattr(getattr(f, "__self__", None), "shape", None)
        if known is not None:
            known = tuple(int(d) for d in known)
            break
    if shape is None:
        if known is None:
            raise ValueError("shape is needed (the dims of one sample), e.g. shape=(1, 8, 8)")
        return known
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    ok = isinstance(shape, (tuple, list)) and len(shape) > 0
    if not ok or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError(f"shape must be one sample's dims (positive ints), e.g. (1, 8, 8), got {shape!r}")
    dims = tuple(int(d) for d in shape)
    why = (
        f"shape is one sample's dims (got {dims}); fastsde.sample's shape is (n, *dims) "
        "(fit_mlem takes the number of fitting samples as n=)"
    )
    if known is not None:
        if dims != known:
            raise ValueError(f"{why}; these levels' samples have dims {known}")
        return dims
    x = torch.zeros(2, *dims, dtype=dtype, device=device)
    try:
        with torch.no_grad():
            out = levels.scores[0](x, torch.full((2,), t, dtype=dtype, device=device))
    except Exception as err:  # the model rejects rows of these dims: most often (n, *dims) given
        raise ValueError(f"{why}; the first level failed on 2 rows of dims {dims}: {err}") from err
    if not isinstance(out, Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{why}; the first level returned {got} for 2 rows of dims {dims}")
    return dims


@dataclass
class _Objective:
    """J(θ) on the fit's fixed evaluation draws, and the stochastic gradient step on it. ``costs``: each
    level's cost; ``cost_ref``: the coupled reference's cost per sample."""

    path: _Path
    ref: Tensor
    basis: Tensor
    p_min: float
    costs: Tensor
    cost_ref: float
    lam: float
    eval_draws: NoiseSource

    @property
    def moves(self) -> int:
        return int(self.basis.shape[0])

    def expected(self, p: Tensor) -> Tensor:
        """The expected cost per sample of the schedule p (moves, K−1), the final denoise included."""
        c = self.costs
        pad = torch.zeros(self.moves, 1, dtype=torch.float64)
        need = 1.0 - (1.0 - p) * (1.0 - torch.cat([p[:, 1:], pad], dim=1))
        return c[0] * self.moves + (need * c[1:]).sum() + c[-1]

    def __call__(self, th: Tensor) -> tuple[float, float, float]:
        """(J, MSE, expected cost) of θ on the evaluation draws."""
        with torch.no_grad():
            p = probabilities(th, self.basis, self.p_min)
            x, _, _ = self.path.run(p, None, self.eval_draws)
            x0 = self.path.denoise(x)
            err = float((x0 - self.ref).to(torch.float64).pow(2).flatten(1).mean(1).mean())
            cost = float(self.expected(p))
        return err + self.lam * cost / self.cost_ref, err, cost

    def step(self, theta: Tensor, opt: torch.optim.Optimizer, seed: int, it: int) -> None:
        """One Adam step of iteration ``it`` on fresh draws: the MSE's gradient (likelihood ratio, every
        parameter; pathwise, along a random direction) plus the expected cost's, exact."""
        n, p_min, basis = self.path.x_T.shape[0], self.p_min, self.basis
        p = probabilities(theta, basis, p_min)
        P = theta.numel()
        jac = torch.zeros(P, self.moves, theta.shape[0], dtype=torch.float64)
        # ∂p/∂θ analytically: p = p_min + (1 − p_min)σ(a), ∂p/∂θ_kd = (1 − p_min)σ(1 − σ)·u^d
        sig = torch.sigmoid(basis @ theta.detach().T)
        dsig = (1.0 - p_min) * sig * (1.0 - sig)
        for k in range(theta.shape[0]):
            for dd in range(theta.shape[1]):
                jac[k * theta.shape[1] + dd, :, k] = dsig[:, k] * basis[:, dd]
        draws = NoiseSource.from_seed(seed + 1 + it, n)
        v = torch.randn(P, generator=torch.Generator().manual_seed(seed * 1_000_003 + it), dtype=torch.float64)
        direction = torch.einsum("m,mjk->jk", v, jac)
        x, lrs, tan = self.path.run(p.detach(), jac, draws, direction)
        x0, tan0 = self.path.final(x, tan)
        resid = (x0 - self.ref).to(torch.float64).flatten(1)
        F = resid.pow(2).mean(1)  # (n,)
        baseline = (F.sum() - F) / (n - 1)
        g_lr = ((F - baseline)[:, None] * lrs).mean(0)  # (P,): the draws' part, every parameter
        slope = float((2.0 * resid * tan0.to(torch.float64).flatten(1)).mean(1).mean())
        g_mse = (g_lr + slope * v).reshape(theta.shape)  # + the weights' part along v (forward gradient)
        cost_term = self.lam * self.expected(p) / self.cost_ref
        opt.zero_grad()
        cost_term.backward()
        theta.grad += g_mse
        opt.step()


def _elapsed(clock: tuple[float, float]) -> dict[str, float]:
    """Wall and CPU time since ``clock`` (per history entry: the fit's cost per iteration, load or not)."""
    return {
        "seconds": round(time.perf_counter() - clock[0], 2),
        "cpu_seconds": round(time.process_time() - clock[1], 2),
    }


def _descend(obj: _Objective, theta: Tensor, iters: int, lr: float, seed: int, progress: bool, clock) -> tuple:
    """Adam on θ for ``iters`` iterations: (J at the start, (best J, best θ), the history)."""
    opt = torch.optim.Adam([theta], lr=lr)
    first = obj(theta.detach())
    best = (first[0], theta.detach().clone())
    history = [{"iter": 0, "objective": first[0], "mse": first[1], "cost": first[2], **_elapsed(clock)}]
    for it in range(1, iters + 1):
        obj.step(theta, opt, seed, it)
        now = obj(theta.detach())
        history.append({"iter": it, "objective": now[0], "mse": now[1], "cost": now[2], **_elapsed(clock)})
        if progress:
            print(f"fit-mlem iter {it}: objective {now[0]:.4g} (mse {now[1]:.3g}, cost {now[2]:.4g})", flush=True)
        if now[0] < best[0]:
            best = (now[0], theta.detach().clone())
    return first, best, history


def fit_mlem(
    levels: Any,
    sde: SDE,
    shape: Sequence[int] | None = None,
    *,
    steps: int = 1000,
    base: str = "em",
    n: int = 64,
    seed: int = 0,
    iters: int = 30,
    lr: float = 0.2,
    lam: float | None = None,
    budget: float = 1e-3,
    degree: int = 2,
    t_end: float | None = None,
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    **options: Any,
) -> MLEMSchedule:
    """Fit p_k(t) for ``solver="mlem"`` on these levels, process and run (see the module docstring).

    Args:
        levels: a :class:`fastsde.Levels` of K ≥ 2 levels.
        shape: dims of one sample, e.g. (1, 8, 8) (read off the levels' first score when it has ``.shape``),
            like ``fit_grid`` and ``fit_iia``; not ``fastsde.sample``'s (n, *dims): a ValueError before compute.
        steps, base, t_end, **options: the mlem run the schedule is for (grid, rho, eta).
        n: fitting samples (prior draws from ``seed``; evaluate on other seeds).
        iters: Adam iterations (each one ML-EM solve of the n samples with fresh draws).
        lam: the weight of relative compute in the objective; None: the theory rule's shadow
            price at ``budget``.
        degree: of the logit polynomial in u (degree + 1 numbers per correction).
    Returns the schedule with the best objective on fixed evaluation draws over the iterations
    (the starting point included)."""
    if not isinstance(levels, Levels) or len(levels) < 2:
        raise ValueError(f"fit_mlem needs fastsde.Levels of at least 2 levels, got {levels!r}")
    _check_fit(n, iters, lr, lam, degree, 1e-3)
    check_seed(seed, "seed")
    t_end = sde.default_t_end if t_end is None else float(t_end)
    sde.check_time("t_end", t_end)
    levels.check(sde, "mlem")
    shape = _sample_dims(levels, shape, float(sde.T), dtype, device)
    opts = SOLVERS["mlem"].resolve(sde, {**options, "steps": steps, "base": base, "p": "auto", "budget": budget}, t_end)
    p_min = float(opts["p_min"])
    grid = schedule_grid(sde, opts, t_end)
    moves = grid.shape[0] - 1
    clock = (time.perf_counter(), time.process_time())

    key, probes = _run_key(levels, sde, opts, t_end, shape, dtype, device)
    src = NoiseSource.from_seed(seed, n)
    x_T = sde.prior_sample(src.normal(shape, Stream.PRIOR, 0, dtype=dtype, device=device))
    path = _Path(levels, sde, grid, opts["base"], float(opts["eta"]), x_T, src)
    ref = path.reference()

    auto, calib = auto_schedule(
        levels, sde, x_T, grid, base=opts["base"], eta=float(opts["eta"]), budget=budget, p_min=p_min,
        buckets=int(opts["buckets"]), samples=int(opts["calibration_samples"]),
    )  # fmt: skip
    c = torch.tensor(levels.costs, dtype=torch.float64)
    cost_ref = float(c[-1]) * (moves + 1)
    if lam is None:
        lam = float(calib.get("shadow_price", 0.0)) * cost_ref
    basis = powers(unit_time(sde, grid[:-1], t_end), degree)
    theta = _init_theta(auto, basis, p_min).requires_grad_(True)
    obj = _Objective(path, ref, basis, p_min, c, cost_ref, lam, NoiseSource.from_seed(seed + EVAL_OFFSET, n))
    first, best, history = _descend(obj, theta, iters, lr, seed, progress, clock)
    fit = {
        "n": n,
        "seed": seed,
        "iters": iters,
        "lr": lr,
        "degree": degree,
        "lambda": lam,
        "budget": budget,
        "cost_reference": cost_ref,
        "objective_start": first[0],
        "objective_best": best[0],
        "history": history,
        "fit_compute": float((path.evals * c).sum()),
        "tangent_evaluations": [float(v) for v in path.tangent_evals],
        "seconds": round(time.perf_counter() - clock[0], 2),
    }
    return MLEMSchedule(theta=best[1], p_min=p_min, key=key, fit=fit, probes=probes)

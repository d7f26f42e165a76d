"""Log-likelihood and bits/dim through the probability-flow ODE.

The PF-ODE dx/dt = b(x, t) = f − ½g²s transports p_t; along it d log p_t(x_t)/dt = −∇·b. So
integrating the augmented state [x, ℓ] forward from t_end to T with dℓ/dt = ∇·b(x, t) and ℓ(t_end) = 0
gives log p_{t_end}(x) = log p_T(x(T)) + ℓ(T).

The divergence is exact (one vector–Jacobian product per dimension, for small data) or the
Hutchinson–Skilling estimate vᵀ(∂b/∂x)v with probes v drawn once per sample from the noise source
(Stream.PROBE) and held fixed for the whole solve, averaged over ``probes``. Each evaluation of b
counts 1 NFE through CountingScore, whatever the number of VJPs.

``log_likelihood`` takes its options as keywords and builds one :class:`LikelihoodSettings`; the
data-set loop (``fastsde.likelihood.dataset``) and the sharded runs (``fastsde.likelihood.sharded``)
pass that object to :func:`pf_ode_likelihood` instead of relaying the keywords.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..guidance import with_null_rows
from ..noise import NoiseSource, Stream, as_noise_source
from ..score import CountingScore, ScoreFn, check_cond, check_score_and_process, data_prediction_of
from ..sde import SDE, RectifiedFlow, broadcast_to_rows
from ..solvers.ode import IntegrationError, dopri5, scipy_rk45

__all__ = [
    "LikelihoodResult",
    "LikelihoodSettings",
    "log_likelihood",
    "pf_ode_likelihood",
    "bits_per_dim",
    "dequantize",
    "BPD_OFFSET",
    "bpd_offset",
    "default_likelihood_t_end",
    "default_trace",
]

#: Bits/dim offset for 8-bit data mapped onto each model-space interval: 8 − log2(width).
BPD_OFFSET = {"[-1,1]": 7.0, "[0,1]": 8.0}

#: Counters of Stream.PROBE: Hutchinson probes use 0.., dequantisation noise starts here.
_DEQUANT_COUNTER = 1 << 20

TRACES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
METHODS = ("rk45", "scipy")


@dataclass(frozen=True)
class LikelihoodSettings:
    """Every option of a PF-ODE likelihood, in one object (built once by the public functions).

    The solve: ``trace`` ("exact" or "hutchinson"), ``probes`` and ``probe`` (Hutchinson probes per
    sample and their law), ``rtol`` / ``atol``, ``t_end`` (None: ``default_likelihood_t_end``),
    ``method`` ("rk45" or "scipy"), ``max_steps``, ``allow_partial``, ``measured_exponent`` and
    ``pass_index`` (fresh probes for repeated passes), as ``log_likelihood`` documents them. Over a
    data set: ``passes`` (each with fresh dequantisation noise and probes), ``batch_size`` (rows per
    solve) and ``dtype`` (of the rows in model space). Nothing is checked when it is built:
    :meth:`checked` does that, with ``log_likelihood``'s messages.
    """

    trace: str = "exact"
    probes: int = 1
    probe: str = "rademacher"
    rtol: float = 1e-5
    atol: float = 1e-5
    t_end: float | None = None
    method: str = "rk45"
    max_steps: int = 10_000
    allow_partial: bool = False
    measured_exponent: bool = True
    pass_index: int = 0
    passes: int = 1
    batch_size: int = 256
    dtype: torch.dtype = torch.float32

    def checked(self, sde: SDE) -> LikelihoodSettings:
        """The solve's settings checked (ValueError naming the first bad one), with rtol and atol as
        floats and t_end resolved for ``sde``."""
        if self.trace not in TRACES:
            raise ValueError(f"trace must be one of {list(TRACES)}, got {self.trace!r}")
        if self.probe not in PROBES:
            raise ValueError(f"probe must be one of {list(PROBES)}, got {self.probe!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        _check_int("probes", self.probes)
        _check_int("max_steps", self.max_steps)
        pass_index = self.pass_index
        if isinstance(pass_index, bool) or not isinstance(pass_index, int) or not 0 <= pass_index < _DEQUANT_COUNTER:
            raise ValueError(f"pass_index must be an int in [0, {_DEQUANT_COUNTER}), got {pass_index!r}")
        if not isinstance(self.allow_partial, bool):
            raise ValueError(f"allow_partial must be True or False, got {self.allow_partial!r}")
        rtol = _check_number("rtol", self.rtol)
        atol = _check_number("atol", self.atol)
        t_end = default_likelihood_t_end(sde) if self.t_end is None else self.t_end
        sde.check_time("t_end", t_end)
        if not t_end < sde.T:
            raise ValueError(f"t_end must be < T = {sde.T:g}, got {t_end!r}")
        return replace(self, rtol=rtol, atol=atol, t_end=t_end)

    def options(self, sde: SDE, n: int) -> dict[str, Any]:
        """What a LikelihoodResult records of the settings it was computed with."""
        return {
            "trace": self.trace,
            "probes": self.probes,
            "probe": self.probe,
            "rtol": self.rtol,
            "atol": self.atol,
            "t_end": float(self.t_end),
            "method": self.method,
            "pass_index": self.pass_index,
            "sde": sde.config(),
            "n": n,
        }


@dataclass
class LikelihoodResult:
    """Log-density of each sample (nats, in the units of x) and what it cost.

    ``logp = prior_logp + delta_logp``; ``nfe`` is the mean over samples of drift evaluations each
    received, ``calls`` the number of batched score calls. ``finished`` is False for samples that
    did not reach T (only with ``allow_partial=True``; their logp is NaN).
    """

    logp: Tensor
    prior_logp: Tensor
    delta_logp: Tensor
    nfe: float
    nfe_per_sample: Tensor
    calls: int
    z: Tensor
    finished: Tensor
    wall_time: float
    options: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def bits_per_dim(self, offset: float = 7.0) -> Tensor:
        """Per-sample bits/dim of these log-densities (offset 7 for [-1, 1] data, 8 for [0, 1])."""
        return bits_per_dim(self.logp, tuple(self.z.shape[1:]), offset)


def default_likelihood_t_end(sde: SDE) -> float:
    """ε of the likelihood: 1e-5 for the diffusions (spec §7), σ_min for EDM (its t_min)."""
    return sde.t_min if sde.t_min > 0 else 1e-5


def default_trace(dims: int) -> str:
    """The trace of a data set's likelihood when none is asked for: exact up to 16 dimensions."""
    return "exact" if dims <= 16 else "hutchinson"


def bits_per_dim(logp: Tensor | float, dims: int | Sequence[int], offset: float = 7.0) -> Tensor | float:
    """bpd = −log p / (D ln 2) + offset, with D = prod(dims).

    offset = 8 − log2(W) for 8-bit data mapped onto an interval of width W: 7 for [−1, 1], 8 for [0, 1].
    """
    if isinstance(dims, int):
        d = dims
    else:
        d = math.prod(dims)
    if isinstance(dims, bool) or d <= 0:
        raise ValueError(f"dims must be a positive int or a shape of positive ints, got {dims!r}")
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise ValueError(f"offset must be a finite number, got {offset!r}")
    return -logp / (d * math.log(2.0)) + offset


def dequantize(
    x_uint8: Tensor | Any,
    seed: int | Sequence[int] | NoiseSource = 0,
    scale: str = "[-1,1]",
    *,
    levels: int = 256,
    pass_index: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Uniform dequantisation of quantised data: (x + u)/levels with u ~ U[0,1) keyed per sample,
    then mapped to the model's range ("[-1,1]" or "[0,1]"). ``levels`` is 256 for 8-bit data;
    ``pass_index`` draws fresh noise for repeated evaluation passes (the reference averages 5).
    Use ``bpd_offset(levels, scale)`` as the bits/dim offset of the result."""
    if scale not in BPD_OFFSET:
        raise ValueError(f"scale must be one of {list(BPD_OFFSET)}, got {scale!r}")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an int >= 2, got {levels!r}")
    x = torch.as_tensor(x_uint8)
    if x.dim() < 2:
        raise ValueError(f"x must have shape (n, *dims), got {tuple(x.shape)}")
    top = levels - 1
    if x.is_floating_point():
        if not bool(torch.isfinite(x).all()) or bool((x != torch.round(x)).any()):
            raise ValueError(f"x must hold integer levels 0..{top} to be dequantised")
    if bool((x < 0).any()) or bool((x > top).any()):
        raise ValueError(f"x must hold levels in 0..{top}, got values in [{float(x.min())}, {float(x.max())}]")
    if isinstance(pass_index, bool) or not isinstance(pass_index, int) or pass_index < 0:
        raise ValueError(f"pass_index must be an int >= 0, got {pass_index!r}")
    noise = as_noise_source(seed, x.shape[0])
    u = noise.uniform(tuple(x.shape[1:]), Stream.PROBE, _DEQUANT_COUNTER + pass_index, dtype=torch.float64)
    v = (x.to(torch.float64) + u) / levels
    if scale == "[-1,1]":
        v = 2.0 * v - 1.0
    return v.to(dtype)


def bpd_offset(levels: int = 256, scale: str = "[-1,1]") -> float:
    """Bits/dim offset for data of ``levels`` levels dequantised onto ``scale``: log2(levels) − log2(width).

    7 for 8-bit data on [−1, 1], 8 for 8-bit data on [0, 1].
    """
    if scale not in BPD_OFFSET:
        raise ValueError(f"scale must be one of {list(BPD_OFFSET)}, got {scale!r}")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an int >= 2, got {levels!r}")
    width = 2.0 if scale == "[-1,1]" else 1.0
    return math.log2(levels) - math.log2(width)


def _exact_divergence(b: Tensor, xin: Tensor) -> Tensor:
    """tr(∂b/∂x) per row from D vector–Jacobian products (b: (m, D), xin: (m, *dims)).

    (A vmapped backward, ``is_grads_batched``, measured no faster on CPU for the mixtures.)
    """
    m, d = b.shape
    div = torch.zeros(m, dtype=b.dtype, device=b.device)
    for i in range(d):
        (g,) = torch.autograd.grad(b[:, i].sum(), xin, retain_graph=i < d - 1)
        div = div + g.reshape(m, d)[:, i]
    return div


def _flow_velocity(sde: RectifiedFlow, x: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    """The probability-flow velocity of a rectified flow in terms of the data prediction x̂0.

    x_u = m·x0 + σ·ε with m + σ = 1: the PF-ODE moves along dx/du = ṁ·x̂0 + σ̇·ε̂ with ε̂ = (x − m·x̂0)/σ
    and ṁ = −σ̇, i.e. dx/du = (σ̇/σ)·(x − x̂0). It equals f·x − ½g²·s where both are finite, and stays
    finite up to T (σ(T) = 1, σ̇ = κ·s/D²), where f and g² are infinite; its divergence
    (σ̇/σ)·(D − ∇·x̂0) follows by autograd through x̂0, so the solve reaches T and the prior N(0, I) exactly
    (no truncation before T)."""
    rate = (sde.sigma_dot(t) / sde.marginal_std(t)).to(x.dtype)
    return broadcast_to_rows(rate, x) * (x - x0)


def _check_number(name: str, v: Any, positive: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"{name} must be a {'positive ' if positive else ''}finite number, got {v!r}")
    return float(v)


def _check_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")


def _check_x(x: Any) -> None:
    """x: a finite floating-point tensor (n, *dims) with n >= 1 and at least one value per row."""
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] == 0 or x[0].numel() == 0:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape (n, *dims) with n >= 1, got {got}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor (dequantise integer data first), got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)).sum())
        raise ValueError(f"x must be finite, got NaN or Inf in {bad} of {x.shape[0]} rows")


def _is_flow(score: ScoreFn, sde: SDE) -> bool:
    """Whether the process reaches m = 0 at T (a rectified flow, whose PF-ODE the velocity in x̂0
    integrates); any other process with m(T) = 0 is refused, its drift being ∞ − ∞ there."""
    flow = float(sde.mean_coeff(torch.tensor([float(sde.T)], dtype=torch.float64))[0]) == 0.0
    if flow and (not isinstance(sde, RectifiedFlow) or data_prediction_of(score) is None):
        raise ValueError(
            f"log_likelihood integrates the probability-flow ODE up to T = {sde.T:g}, where m = 0 for {sde!r}: its "
            "drift f − ½g²·s is ∞ − ∞ there, and the velocity (σ̇/σ)·(x − x̂0) of a RectifiedFlow needs the data "
            f"prediction x̂0, which {type(score).__name__} does not give (no data_prediction(x, t); the score is −x "
            "at m = 0 whatever the data): use fastsde.VelocityScore for a velocity network"
        )
    return flow


class _AugmentedDrift:
    """F(y, t, rows) of the augmented state y = [x, ℓ]: the PF-ODE drift b and its divergence ∇·b,
    exact or with the Hutchinson probes ``v_all`` (one fixed set per sample for the whole solve)."""

    def __init__(
        self,
        counted: CountingScore,
        sde: SDE,
        settings: LikelihoodSettings,
        dims: tuple[int, ...],
        flow: bool,
        v_all: Tensor | None,
    ) -> None:
        self.counted, self.sde, self.settings, self.dims, self.flow, self.v_all = (
            counted,
            sde,
            settings,
            dims,
            flow,
            v_all,
        )
        self.d = math.prod(dims)

    def __call__(self, y: Tensor, t: Tensor, rows: Tensor | None) -> Tensor:
        m, d, s = y.shape[0], self.d, self.settings
        tt = t.to(y.dtype)
        check_finite = s.method == "scipy"
        with torch.enable_grad():
            xin = y[:, :d].detach().reshape(m, *self.dims).requires_grad_(True)
            if self.flow:  # a rectified flow: the PF-ODE velocity in x̂0, finite up to T (see _flow_velocity)
                out = self.counted.data_prediction(xin, tt, rows, check_finite=check_finite)
            else:
                out = self.counted(xin, tt, rows, check_finite=check_finite)
            if not out.requires_grad:
                raise ValueError(
                    "the score is not differentiable in x (its output has no autograd graph): "
                    "the likelihood needs the divergence of the score"
                )
            b = (_flow_velocity(self.sde, xin, tt, out) if self.flow else self.sde.ode_drift(xin, tt, out)).reshape(
                m, d
            )
            if s.trace == "exact":
                div = _exact_divergence(b, xin)
            else:
                div = self._hutchinson(b, xin, rows)
        return torch.cat([b.detach(), div.detach()[:, None]], dim=1)

    def _hutchinson(self, b: Tensor, xin: Tensor, rows: Tensor | None) -> Tensor:
        m, d, probes = b.shape[0], self.d, self.settings.probes
        div = torch.zeros(m, dtype=xin.dtype, device=xin.device)
        v = self.v_all if rows is None else self.v_all[rows.to(self.v_all.device)]
        for p in range(probes):
            vp = v[:, p]
            (g,) = torch.autograd.grad((b * vp).sum(), xin, retain_graph=p < probes - 1)
            div = div + (g.reshape(m, d) * vp).sum(dim=1)
        return div / probes


def _solve(
    drift: _AugmentedDrift, y0: Tensor, sde: SDE, settings: LikelihoodSettings, callback: Callable[[Any], Any] | None
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Integrate the augmented state from t_end to T: (y at T, finished per sample, stats)."""
    n = y0.shape[0]
    stats: dict[str, Any] = {"method": settings.method}
    if settings.method == "scipy":
        y, nfev, steps = scipy_rk45(
            drift, y0, float(settings.t_end), float(sde.T), rtol=settings.rtol, atol=settings.atol
        )
        stats.update(nfev=nfev, accepted=steps)
        return y, torch.ones(n, dtype=torch.bool), stats
    sol = dopri5(
        drift,
        y0,
        float(settings.t_end),
        float(sde.T),
        rtol=settings.rtol,
        atol=settings.atol,
        max_steps=settings.max_steps,
        on_step=callback,
        measured_exponent=settings.measured_exponent,
    )
    if not settings.allow_partial:
        msg = sol.failure_message()
        if msg:
            raise IntegrationError(f"log_likelihood: {msg}")
    stats.update(
        accepted=sol.accepted.cpu(), rejected=sol.rejected.cpu(), status=sol.status.cpu(), t_reached=sol.t.cpu()
    )
    return sol.y, sol.finished.cpu(), stats


def pf_ode_likelihood(
    score: ScoreFn,
    sde: SDE,
    x: Tensor,
    seed: int | Sequence[int] | NoiseSource,
    settings: LikelihoodSettings,
    *,
    callback: Callable[[Any], Any] | None = None,
    cond: Tensor | dict[str, Tensor] | None = None,
) -> LikelihoodResult:
    """``log_likelihood`` with its options in one :class:`LikelihoodSettings` (checked here, with
    ``log_likelihood``'s messages; ``passes``, ``batch_size`` and ``dtype`` are not used)."""
    check_score_and_process(score, sde)
    _check_x(x)
    settings = settings.checked(sde)
    flow = _is_flow(score, sde)

    n = x.shape[0]
    dims = tuple(x.shape[1:])
    d = math.prod(dims)
    dtype, device = x.dtype, x.device
    noise = as_noise_source(seed, n)
    counted = CountingScore(score, n, cond=check_cond(with_null_rows(score, cond, n), n, x.device))
    v_all = None
    if settings.trace == "hutchinson":
        draw = noise.rademacher if settings.probe == "rademacher" else noise.normal
        # One fixed set of probes per sample for the whole solve.
        v_all = draw((settings.probes, d), Stream.PROBE, settings.pass_index, dtype=dtype, device=device)
    drift = _AugmentedDrift(counted, sde, settings, dims, flow, v_all)

    y0 = torch.cat([x.detach().reshape(n, d), torch.zeros(n, 1, dtype=dtype, device=device)], dim=1)
    start = time.perf_counter()
    y, finished, stats = _solve(drift, y0, sde, settings, callback)
    wall = time.perf_counter() - start

    z = y[:, :d].reshape(n, *dims)
    delta = y[:, d]
    prior = sde.prior_logp(z)
    logp = prior + delta
    if not bool(finished.all()):
        nan = torch.tensor(float("nan"), dtype=dtype, device=device)
        logp = torch.where(finished.to(device), logp, nan)
    return LikelihoodResult(
        logp=logp,
        prior_logp=prior,
        delta_logp=delta,
        nfe=counted.nfe,
        nfe_per_sample=counted.nfe_per_sample.clone(),
        calls=counted.calls,
        z=z,
        finished=finished,
        wall_time=wall,
        options=settings.options(sde, n),
        stats=dict(stats, rows_evaluated=counted.rows_evaluated),
    )


def log_likelihood(
    score: ScoreFn,
    sde: SDE,
    x: Tensor,
    trace: str = "exact",
    seed: int | Sequence[int] | NoiseSource = 0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    *,
    t_end: float | None = None,
    probes: int = 1,
    probe: str = "rademacher",
    method: str = "rk45",
    max_steps: int = 10_000,
    allow_partial: bool = False,
    callback: Callable[[Any], Any] | None = None,
    pass_index: int = 0,
    measured_exponent: bool = True,
    cond: Tensor | dict[str, Tensor] | None = None,
) -> LikelihoodResult:
    """Log-density (nats) of each row of x under the model (score, sde), via the PF-ODE.

    Args:
        score: callable score(x, t), differentiable in x (it runs under torch.enable_grad).
        sde: the process the score belongs to.
        x: (n, *dims) data in model space (dequantise 8-bit data first, see ``dequantize``).
        trace: "exact" (D VJPs per evaluation) or "hutchinson" (``probes`` VJPs per evaluation).
        seed: one int, one per sample, or a NoiseSource; keys the Hutchinson probes.
        rtol, atol: RK45 tolerances.
        t_end: start time of the forward solve (default 1e-5; σ_min for EDM).
        probes: Hutchinson probes per sample, averaged.
        probe: "rademacher" or "gaussian".
        method: "rk45" (per-sample torch integrator) or "scipy" (solve_ivp on the flattened batch).
        max_steps: step attempts allowed per sample (rk45).
        allow_partial: return NaN for samples that did not reach T instead of raising.
        callback: passed each integrator StepReport (rk45); returning False stops (then partial).
        pass_index: draws fresh Hutchinson probes for repeated evaluation passes (same seed).
        measured_exponent: rk45's start-up rule for repeated rejections of the first step (see
            ``fastsde.solvers.ode.dopri5``); False gives scipy's step control exactly.
        cond: per-sample conditioning, as for ``fastsde.sample`` (log p(x | cond) of each row).
    """
    settings = LikelihoodSettings(
        trace=trace,
        probes=probes,
        probe=probe,
        rtol=rtol,
        atol=atol,
        t_end=t_end,
        method=method,
        max_steps=max_steps,
        allow_partial=allow_partial,
        measured_exponent=measured_exponent,
        pass_index=pass_index,
    )
    return pf_ode_likelihood(score, sde, x, seed, settings, callback=callback, cond=cond)

"""Score functions: the contract, adapters from common model types, an exact Gaussian mixture, and
the one wrapper that counts network evaluations.

A score function is any callable ``score(x, t) -> tensor shaped like x`` where ``t`` is a 1-D
tensor holding one time per row of ``x``. The rows may be a subset of the batch (finished samples
are dropped); with per-sample conditioning (``cond=`` of ``fastsde.sample``) the score is called as
``score(x, t, **cond_rows)`` with the conditioning rows of exactly the samples in ``x`` (a bare
tensor is passed as the keyword ``cond``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .sde import EDM, SDE, VPSDE, RectifiedFlow, SubVPSDE, broadcast_to_rows, per_row

__all__ = [
    "ScoreFn",
    "Cond",
    "CountingScore",
    "check_cond",
    "check_score_and_process",
    "score_process",
    "scores_of",
    "is_hierarchy",
    "check_score_for_run",
    "counter_for",
    "network_evals_per_call",
    "NonFiniteScoreError",
    "GaussianMixture",
    "NoisePredictionScore",
    "DenoiserScore",
    "DiffusersUNetScore",
    "VelocityScore",
    "default_time_input",
]

ScoreFn = Callable[[Tensor, Tensor], Tensor]
#: per-sample conditioning: a tensor (passed to the score as ``cond=``) or a dict of tensors (splatted)
Cond = Tensor | Mapping[str, Tensor]


def check_cond(cond: Any, n: int, device: torch.device | str | None = None) -> dict[str, Tensor] | None:
    """Per-sample conditioning as the keywords the score receives: a tensor becomes ``{"cond": tensor}``,
    a dict of tensors stays as it is; every tensor must hold one row per sample (shape[0] == n).
    Moved to ``device`` (dtype kept: labels stay integers). A ValueError names what is wrong."""
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        cond = {"cond": cond}
    if not isinstance(cond, Mapping) or not cond:
        raise ValueError(
            f"cond must be a tensor or a non-empty dict of tensors with one row per sample, got {type(cond).__name__}"
        )
    out: dict[str, Tensor] = {}
    for key, value in cond.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"cond keys must be keyword names (the score receives them as keywords), got {key!r}")
        if not isinstance(value, Tensor):
            raise ValueError(f"cond[{key!r}] must be a tensor with one row per sample, got {type(value).__name__}")
        if value.dim() == 0 or value.shape[0] != n:
            raise ValueError(
                f"cond[{key!r}] must have one row per sample (shape[0] == n = {n}), got shape {tuple(value.shape)}"
            )
        out[key] = value if device is None else value.to(device)
    return out


def network_evals_per_call(score: Any) -> float:
    """Network evaluations one score evaluation of one row costs: a guidance wrapper declares it as
    ``network_evals`` (2 for classifier-free guidance: a conditional and an unconditional row); 1 otherwise."""
    value = getattr(score, "network_evals", 1)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 1.0


def data_prediction_of(score: Any) -> Callable[..., Tensor] | None:
    """The data prediction x̂0(x, t, **cond) a score offers (VelocityScore, GaussianMixture, a loaded flow
    model): its own ``data_prediction``, or for a bound method such as ``LoadedModel.score`` its owner's;
    None when there is none."""
    for obj in (score, getattr(score, "__self__", None)):
        fn = getattr(obj, "data_prediction", None)
        if callable(fn):
            return fn
    return None


class NonFiniteScoreError(FloatingPointError):
    """The score returned NaN or Inf; the message names the time(s) at which it happened."""


class CountingScore:
    """Wraps a score function and counts evaluations per sample: the only place NFE is counted.

    ``rows`` names which samples the rows of ``x`` belong to when a solver passes a subset of the
    batch (finished samples dropped); by default row i is sample i. ``cost`` is the compute of one
    evaluation of one row (1 for a plain score; the level's cost for a network in a hierarchy):
    ``cost_per_sample`` accumulates evaluations × cost, so a solver over several networks reports
    its compute without a counter of its own. ``pass_rows`` hands ``rows`` on to the wrapped
    function as a third argument (for vector fields that need to know their samples).

    NaN/Inf check: one reduction per evaluation, the per-row sum of the output (:func:`row_sums`; NaN or
    Inf anywhere in a row makes its sum non-finite), instead of a full ``isfinite`` scan.
    ``defer_finite``: instead of checking each output at once (a host synchronisation per
    evaluation), keep the per-row sums on the device and look at them every ``FLUSH_EVERY``
    evaluations and in :meth:`flush` (the front door calls it after the solve); the error is the same,
    raised later. The front door defers on accelerators, where a synchronisation stalls the queue.

    ``cond``: per-sample conditioning (see :func:`check_cond`), handed to the score as keywords with the
    rows of exactly the samples in ``x``: ``ids`` when given (which samples the rows of ``x`` are),
    else ``rows`` when it has one entry per row of ``x``, else the whole batch (``x`` holds all n rows).
    This is the one place conditioning follows the rows, so every solver and compaction get it.

    A score with ``needs_grad = True`` (it uses autograd itself, e.g. an energy model's −∇E) is called
    under ``torch.enable_grad()`` (the front door samples under no_grad) and its output is detached.
    """

    #: Deferred checks kept before they are looked at (one synchronisation per this many evaluations).
    FLUSH_EVERY = 64

    def __init__(
        self,
        score: ScoreFn,
        n: int,
        *,
        cost: float = 1.0,
        pass_rows: bool = False,
        defer_finite: bool = False,
        cond: Mapping[str, Tensor] | None = None,
    ) -> None:
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not math.isfinite(cost) or cost <= 0:
            raise ValueError(f"cost must be a positive finite number, got {cost!r}")
        self.score = score
        self.n = n
        self.cost = float(cost)
        self.pass_rows = pass_rows
        self.nfe_per_sample = torch.zeros(n, dtype=torch.float64)
        self.cost_per_sample = torch.zeros(n, dtype=torch.float64)
        self.calls = 0
        self.rows_evaluated = 0
        self.defer_finite = defer_finite
        self._pending: list[tuple[Tensor, Tensor]] = []
        self.cond = None if cond is None else dict(cond)
        self.needs_grad = bool(getattr(score, "needs_grad", False))
        #: network evaluations per row per call (2 under classifier-free guidance)
        self.network_evals_per_call = network_evals_per_call(score)

    def cond_rows(self, x: Tensor, rows: Tensor | None, ids: Tensor | None) -> dict[str, Tensor]:
        """The conditioning rows of the samples in x (see the class docstring)."""
        if self.cond is None:
            return {}
        sel = ids if ids is not None else rows if rows is not None and rows.shape[0] == x.shape[0] else None
        if sel is None:
            if x.shape[0] != self.n:
                raise ValueError(
                    f"the score was called with {x.shape[0]} rows of a batch of {self.n} without saying which "
                    "samples they are: pass ids= (the samples of x's rows) so the conditioning rows can follow"
                )
            return self.cond
        if sel.shape[0] != x.shape[0]:
            raise ValueError(f"ids names {sel.shape[0]} samples for {x.shape[0]} rows of x")
        return {k: v[sel.to(v.device, torch.long)] for k, v in self.cond.items()}

    def __call__(
        self,
        x: Tensor,
        t: Tensor,
        rows: Tensor | None = None,
        *,
        check_finite: bool = True,
        ids: Tensor | None = None,
    ) -> Tensor:
        return self._evaluate(self.score, x, t, rows, check_finite, ids)

    @property
    def has_data_prediction(self) -> bool:
        """Whether the wrapped score also gives the data prediction x̂0 (``data_prediction(x, t, **cond)``)."""
        return data_prediction_of(self.score) is not None and not self.pass_rows

    def data_prediction(
        self,
        x: Tensor,
        t: Tensor,
        rows: Tensor | None = None,
        *,
        check_finite: bool = True,
        ids: Tensor | None = None,
    ) -> Tensor:
        """The wrapped score's data prediction x̂0 at (x, t), counted, checked and conditioned exactly as a
        score evaluation (one evaluation per row). Needed where m(t) = 0 (a rectified flow's u = 1), at
        which x̂0 cannot be read from the score (it is −x there whatever the data)."""
        if not self.has_data_prediction:
            raise ValueError(
                f"{type(self.score).__name__} has no data_prediction(x, t): a solve from m(t) = 0 needs one "
                "(VelocityScore and GaussianMixture have it)"
            )
        return self._evaluate(data_prediction_of(self.score), x, t, rows, check_finite, ids)

    def _evaluate(
        self, fn: Callable[..., Tensor], x: Tensor, t: Tensor, rows: Tensor | None, check_finite: bool, ids
    ) -> Tensor:
        """One counted evaluation of fn (the score or its data prediction) at the rows of x."""
        if t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(
                f"t must be a 1-D tensor with one time per row of x ({x.shape[0]}), got shape {tuple(t.shape)}"
            )
        kw = self.cond_rows(x, rows, ids)
        args = (x, t, rows) if self.pass_rows else (x, t)
        compiling = torch.compiler.is_compiling()  # traced by torch.compile: no host reads in the graph
        # bumped by any in-place write (no copy, no synchronisation); a traced graph has no versions
        versions = None if compiling else (_version(x), _version(t))
        if self.needs_grad:
            with torch.enable_grad():
                out = fn(*args, **kw)
            out = out.detach() if isinstance(out, Tensor) else out
        else:
            out = fn(*args, **kw)
        _check_output(out, x)
        if versions is not None and (_version(x), _version(t)) != versions:
            which = "x" if _version(x) != versions[0] else "t"
            raise ValueError(
                f"score(x, t) modified its input {which} in place; the solver's state is {which}, so the "
                f"samples would be wrong: work on a copy ({which} = {which}.clone()) or use out-of-place operations"
            )
        self.calls += 1
        self.rows_evaluated += x.shape[0]
        if rows is None:
            self.nfe_per_sample += 1.0
            self.cost_per_sample += self.cost
        else:
            idx = rows.to("cpu", torch.long)
            ones = torch.ones(rows.shape[0], dtype=torch.float64)
            self.nfe_per_sample.index_add_(0, idx, ones)
            self.cost_per_sample.index_add_(0, idx, ones * self.cost)
        if check_finite:
            sums = row_sums(out)
            if compiling:  # looked at after the compiled step (``flush``)
                self._pending.append((sums, t.detach()))
            elif self.defer_finite:
                self._pending.append((sums, t.detach()))
                if len(self._pending) >= self.FLUSH_EVERY:
                    self.flush()
            elif not math.isfinite(float(sums.sum())):  # one read; the rows only when it is not finite
                ok = torch.isfinite(sums)
                if not bool(ok.all()):
                    _raise_nonfinite(ok, t)
        return out

    #: the per-level counts of a hierarchy's counter (:class:`~fastsde.levels.LevelScores`); one score has none
    nfe_per_level: Tensor | None = None
    nfe_per_level_per_sample: Tensor | None = None

    def accounting(self, denoised: bool) -> dict[str, Any] | None:
        """The multilevel record of a hierarchy's counter; None for one score (the same protocol)."""
        return None

    def flush(self) -> None:
        """Look at the deferred NaN/Inf checks (one synchronisation); raise for the first bad call."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        if bool(torch.isfinite(torch.cat([sums for sums, _ in pending])).all()):
            return
        first = next(i for i, (sums, _) in enumerate(pending) if not bool(torch.isfinite(sums).all()))
        sums, t = pending[first]
        _raise_nonfinite(torch.isfinite(sums), t)

    @property
    def nfe(self) -> float:
        """Mean evaluations per sample."""
        return float(self.nfe_per_sample.mean())

    @property
    def compute(self) -> float:
        """Mean compute per sample: evaluations × cost (equals ``nfe`` for cost 1)."""
        return float(self.cost_per_sample.mean())

    @property
    def network_evals(self) -> float:
        """Mean network evaluations per sample: NFE × the score's network evaluations per call."""
        return self.nfe * self.network_evals_per_call


def row_sums(out: Tensor) -> Tensor:
    """Per-row sums of a score output (accumulated in float32 for half types): finite exactly when the
    row is, short of an overflow of the sum itself (|values| near the dtype's largest over the row size),
    at the cost of one reduction, a tenth of ``isfinite(out).all(dim=1)``."""
    flat = out.reshape(out.shape[0], -1)
    return flat.sum(dim=1, dtype=torch.float32) if flat.dtype in (torch.float16, torch.bfloat16) else flat.sum(dim=1)


def _version(t: Tensor) -> int | None:
    """A tensor's in-place write counter; None for an inference tensor (``torch.inference_mode``), which
    keeps none, so a write into it cannot be detected."""
    return None if t.is_inference() else t._version


def _check_output(out: Any, x: Tensor) -> None:
    """A score's output must be a tensor like x: same shape, dtype and device (a float64 or integer
    output in a float32 run would be silently cast by the solver's arithmetic, or not at all)."""
    if not isinstance(out, Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"score(x, t) must return a tensor shaped like x {tuple(x.shape)}, got {got}")
    if out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"score(x, t) must return a tensor of x's dtype and device ({str(x.dtype).removeprefix('torch.')} on "
            f"{x.device}), got {str(out.dtype).removeprefix('torch.')} on {out.device}: cast it "
            "(.to(x)) or run in the network's dtype (dtype=...)"
        )


def _raise_nonfinite(ok: Tensor, t: Tensor) -> None:
    """The NonFiniteScoreError of one call: which times, how many rows."""
    bad = ~ok
    times = sorted({float(v) for v in t[bad].tolist()})[:5]
    raise NonFiniteScoreError(f"score returned NaN or Inf at t = {times} ({int(bad.sum())} of {ok.shape[0]} rows)")


# ---------------------------------------------------------------------------------------------
# Exact Gaussian mixture
# ---------------------------------------------------------------------------------------------


class GaussianMixture:
    """A diagonal Gaussian mixture as data distribution; its diffused marginals are closed-form.

    Under any process here x_t = m(t)·x0 + σ(t)·z, so component k at time t is
    N(m μ_k, m² s_k² + σ²). ``score(x, t)`` and ``log_prob(x, t)`` are exact at every t.

    Args:
        weights: (K,) mixture weights (normalised here).
        means: (K, *dims) component means.
        stds: (K, *dims) or (K,) component standard deviations.
        sde: the forward process; needed for the score at t > 0.
    """

    def __init__(
        self, weights: Sequence[float] | Tensor, means: Tensor, stds: Tensor | Sequence[float], sde: SDE | None = None
    ):
        means = torch.as_tensor(means, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if means.dim() < 2:
            raise ValueError(f"means must have shape (K, *dims), got {tuple(means.shape)}")
        k = means.shape[0]
        if weights.shape != (k,) or bool((weights <= 0).any()):
            raise ValueError(f"weights must be {k} positive numbers, got {weights.tolist()}")
        if stds.dim() == 1:
            stds = stds.reshape(k, *([1] * (means.dim() - 1))).expand_as(means)
        if stds.shape != means.shape or bool((stds <= 0).any()):
            raise ValueError(
                f"stds must be positive and shaped (K,) or like means {tuple(means.shape)}, got {tuple(stds.shape)}"
            )
        self.weights = weights / weights.sum()
        self.means = means
        self.stds = stds.clone()
        self.sde = sde
        self.dims = tuple(means.shape[1:])

    @property
    def shape(self) -> tuple[int, ...]:
        return self.dims

    def _marginal(self, t: Tensor, dtype, device) -> tuple[Tensor, Tensor]:
        """Per-row component means (n, K, D) and variances (n, K, D) at times t."""
        mu = self.means.reshape(self.means.shape[0], -1).to(device, dtype)
        s2 = self.stds.reshape(self.stds.shape[0], -1).to(device, dtype) ** 2
        if self.sde is None:
            if bool((t != 0).any()):
                raise ValueError("GaussianMixture needs an sde to evaluate at t > 0")
            return mu[None].expand(t.shape[0], -1, -1), s2[None].expand(t.shape[0], -1, -1)
        m = self.sde.mean_coeff(t).to(dtype)[:, None, None]
        sig = self.sde.marginal_std(t).to(dtype)[:, None, None]
        return m * mu[None], m * m * s2[None] + sig * sig

    def _log_joint(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if tuple(x.shape[1:]) != self.dims:
            # A sample shape that does not match the mixture would otherwise broadcast or fail deep inside.
            expected = ", ".join(["n", *map(str, self.dims)])
            raise ValueError(f"x must have shape ({expected}) for this mixture, got {tuple(x.shape)}")
        xf = x.reshape(x.shape[0], 1, -1)
        mean, var = self._marginal(t, x.dtype, x.device)
        diff = xf - mean
        log_comp = -0.5 * ((diff * diff) / var + torch.log(2 * math.pi * var)).sum(-1)
        log_joint = log_comp + torch.log(self.weights.to(x.device, x.dtype))[None]
        return log_joint, diff, var

    def log_prob(self, x: Tensor, t: Tensor | float = 0.0) -> Tensor:
        """Exact log-density of the marginal at time t, one value per row (nats)."""
        t = _as_time(t, x)
        log_joint, _, _ = self._log_joint(x, t)
        return torch.logsumexp(log_joint, dim=1)

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """Exact ∇ₓ log p_t(x)."""
        t = _as_time(t, x)
        log_joint, diff, var = self._log_joint(x, t)
        resp = torch.softmax(log_joint, dim=1)[..., None]
        return (-(resp * diff / var).sum(1)).reshape(x.shape)

    __call__ = score

    def data_prediction(self, x: Tensor, t: Tensor) -> Tensor:
        """Exact posterior mean E[x0 | x_t = x] = Σ_k r_k·(μ_k + m·s_k²·(x − m·μ_k)/(m²s_k² + σ²)); finite
        where m = 0 (there it is the data mean Σ w_k μ_k, which the score −x cannot tell)."""
        t = _as_time(t, x)
        log_joint, diff, var = self._log_joint(x, t)
        resp = torch.softmax(log_joint, dim=1)[..., None]
        mu = self.means.reshape(self.means.shape[0], -1).to(x.device, x.dtype)
        s2 = self.stds.reshape(self.stds.shape[0], -1).to(x.device, x.dtype) ** 2
        m = (
            self.sde.mean_coeff(t).to(x.dtype)[:, None, None]
            if self.sde is not None
            else torch.ones_like(t)[:, None, None]
        )
        post = mu[None] + m * s2[None] * diff / var
        return (resp * post).sum(1).reshape(x.shape)

    def responsibilities(self, x: Tensor, t: Tensor | float = 0.0) -> Tensor:
        """Posterior component probabilities (n, K); used to assign samples to modes."""
        t = _as_time(t, x)
        log_joint, _, _ = self._log_joint(x, t)
        return torch.softmax(log_joint, dim=1)

    def marginal_params(self, t: float) -> tuple[Tensor, Tensor, Tensor]:
        """(weights, means, stds) of the marginal at time t; shapes (K,), (K, *dims), (K, *dims)."""
        tt = torch.tensor([t], dtype=torch.float64)
        mean, var = self._marginal(tt, torch.float64, "cpu")
        return self.weights, mean[0].reshape(self.means.shape), var[0].sqrt().reshape(self.means.shape)

    def sample(self, n: int, t: float = 0.0, generator: torch.Generator | None = None, dtype=torch.float64) -> Tensor:
        """Exact draws from the marginal at time t (for tests and reference statistics)."""
        w, mean, std = self.marginal_params(t)
        comp = torch.multinomial(w, n, replacement=True, generator=generator)
        z = torch.randn((n, *self.dims), generator=generator, dtype=torch.float64)
        return (mean[comp] + std[comp] * z).to(dtype)


def _as_time(t: Tensor | float, x: Tensor) -> Tensor:
    if isinstance(t, Tensor) and t.dim() == 1:
        return t.to(x.dtype)  # keeps the device the caller chose
    return per_row(t, x.shape[0], x.dtype, x.device)


# ---------------------------------------------------------------------------------------------
# Adapters from network parameterisations
# ---------------------------------------------------------------------------------------------


def default_time_input(sde: SDE) -> Callable[[Tensor], Tensor]:
    """The conditioning label the Score-SDE checkpoints expect: 999·t for VP/sub-VP, σ(t) otherwise;
    a discrete-time process's own fractional training timestep (DiscreteVPSDE.timestep)."""
    timestep = getattr(sde, "timestep", None)
    if callable(timestep):
        return timestep
    if isinstance(sde, (VPSDE, SubVPSDE)):
        return lambda t: 999.0 * t
    return sde.marginal_std


class NoisePredictionScore:
    """Score from a noise-prediction network ε̂(x, label): s = −ε̂/σ(t)."""

    def __init__(
        self, model: Callable[[Tensor, Tensor], Tensor], sde: SDE, time_input: Callable[[Tensor], Tensor] | None = None
    ):
        self.model = model
        self.sde = sde
        self.time_input = time_input or default_time_input(sde)

    def __call__(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        eps = self.model(x, self.time_input(t), **cond)  # conditioning rows go to the network as keywords
        return -eps / broadcast_to_rows(self.sde.marginal_std(t), x)


class DenoiserScore:
    """Score from a denoiser D(x̃, σ̃) in the k-diffusion / EDM convention.

    The denoiser works in EDM coordinates x̃ = x/m, σ̃ = σ/m and returns x̂0; then
    s = (m·x̂0 − x)/σ². Without ``sde`` the process is EDM(); ``fastsde.sample`` refuses to
    integrate such a score under any other process (pass the process you sample under).
    """

    def __init__(self, denoiser: Callable[[Tensor, Tensor], Tensor], sde: SDE | None = None):
        self.denoiser = denoiser
        self.process_defaulted = sde is None
        self.sde = sde if sde is not None else EDM()

    def __call__(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        m = self.sde.mean_coeff(t)
        sigma = self.sde.marginal_std(t)
        x0 = self.denoiser(x / broadcast_to_rows(m, x), sigma / m, **cond)
        return (broadcast_to_rows(m, x) * x0 - x) / broadcast_to_rows(sigma**2, x)


class DiffusersUNetScore:
    """Score from a diffusers ``UNet2DModel`` trained on the process ``sde``.

    Args:
        unet: the network; called as ``unet(x, label).sample``.
        sde: the process it was trained with.
        prediction_type: "epsilon" (noise), "sample" (x0), "v_prediction" (VP only) or "flow_prediction"
            (a :class:`~fastsde.sde.RectifiedFlow` only: the velocity v = ε − x0, as diffusers' flow-matching
            schedulers; x̂0 = x − σ·v).
        time_input: maps t to the network's conditioning label (default: 999·t for VP/sub-VP, 1000·σ(t) for
            flow_prediction, diffusers' FlowMatchEulerDiscreteScheduler timesteps, σ(t) otherwise).

    ``data_prediction`` (x̂0 of "sample" and "flow_prediction", None otherwise) lets a solve start from a
    rectified flow's pure noise.

    Conditioning rows (``cond={"class_labels": labels}`` of ``fastsde.sample``) are passed on to the UNet
    as its keywords: ``class_labels`` (a class-conditional UNet, ``num_class_embeds``) and, for a
    ``UNet2DConditionModel``, ``encoder_hidden_states``; any other key is passed through unchanged.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        sde: SDE,
        prediction_type: str = "epsilon",
        time_input: Callable[[Tensor], Tensor] | None = None,
    ):
        if prediction_type not in ("epsilon", "sample", "v_prediction", "flow_prediction"):
            raise ValueError(
                "prediction_type must be 'epsilon', 'sample', 'v_prediction' or 'flow_prediction', "
                f"got {prediction_type!r}"
            )
        if prediction_type == "v_prediction" and not isinstance(sde, VPSDE):
            # v = m·ε − σ·x0 is read with m² + σ² = 1, which only VP satisfies
            raise ValueError(f"prediction_type='v_prediction' needs a VPSDE (m² + σ² = 1), got {sde!r}")
        if prediction_type == "flow_prediction" and not isinstance(sde, RectifiedFlow):
            raise ValueError(f"prediction_type='flow_prediction' needs a RectifiedFlow (v = ε − x0), got {sde!r}")
        self.unet = unet
        self.sde = sde
        self.prediction_type = prediction_type
        if time_input is None and prediction_type == "flow_prediction":
            time_input = lambda t: 1000.0 * sde.marginal_std(t)  # noqa: E731  (diffusers' timesteps σ·1000)
        self.time_input = time_input or default_time_input(sde)

    def network_output(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        dtype = next(self.unet.parameters()).dtype
        kw = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in cond.items()}
        out = self.unet(x.to(dtype), self.time_input(t).to(dtype), **kw).sample
        return out.to(x.dtype)

    def __call__(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        out = self.network_output(x, t, **cond)
        m = broadcast_to_rows(self.sde.mean_coeff(t), x)
        sigma = broadcast_to_rows(self.sde.marginal_std(t), x)
        if self.prediction_type == "epsilon":
            return -out / sigma
        if self.prediction_type == "sample":
            return (m * out - x) / sigma**2
        if self.prediction_type == "flow_prediction":
            return -(x + (1.0 - sigma) * out) / sigma  # ε̂ = x + (1 − σ)·v (m + σ = 1), s = −ε̂/σ
        eps = m * out + sigma * x  # v = m ε − σ x0 with m² + σ² = 1
        return -eps / sigma

    @property
    def data_prediction(self) -> Callable[..., Tensor] | None:
        """x̂0(x, t, **cond): the network's output for "sample", x − σ·v for "flow_prediction" (finite
        where m = 0); None for the other prediction types (their x̂0 is Tweedie's, infinite at m = 0)."""
        if self.prediction_type not in ("sample", "flow_prediction"):
            return None

        def predict(x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
            out = self.network_output(x, t, **cond)
            if self.prediction_type == "sample":
                return out
            return x - broadcast_to_rows(self.sde.marginal_std(t), x) * out

        return predict


class VelocityScore:
    """Score from a flow-matching velocity network v(x, t_net) ≈ ε − x0 (SD3, FLUX, ...) on a
    :class:`~fastsde.sde.RectifiedFlow`: x̂0 = x − σ·v, ε̂ = x + (1 − σ)·v, score = −ε̂/σ.

    ``time_input``: what the network is conditioned on: None or "sigma" (the flow-matching t = σ,
    the default), "timestep" (1000·σ, what diffusers' SD3 transformer takes as ``timestep``), or a
    callable of the process time u. Conditioning keywords are passed to the network.
    ``data_prediction`` gives x̂0 directly, which a solve from u = 1 (m = 0) needs.
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        sde: SDE,
        time_input: str | Callable[[Tensor], Tensor] | None = None,
    ):
        if not isinstance(sde, RectifiedFlow):
            raise ValueError(f"VelocityScore needs a RectifiedFlow process (v = ε − x0 on m + σ = 1), got {sde!r}")
        if time_input is None or time_input == "sigma":
            self.time_input: Callable[[Tensor], Tensor] = sde.marginal_std
        elif time_input == "timestep":
            self.time_input = lambda t: 1000.0 * sde.marginal_std(t)
        elif callable(time_input):
            self.time_input = time_input
        else:
            raise ValueError(f"time_input must be None, 'sigma', 'timestep' or a callable of t, got {time_input!r}")
        self.model = model
        self.sde = sde

    def velocity(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        """The network's v at (x, t), in x's dtype."""
        return self.model(x, self.time_input(t), **cond).to(x.dtype)

    def __call__(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        v = self.velocity(x, t, **cond)
        sigma = broadcast_to_rows(self.sde.marginal_std(t).to(x.dtype), x)
        return -(x + (1.0 - sigma) * v) / sigma

    def data_prediction(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        """x̂0 = x − σ·v (finite at u = 1)."""
        v = self.velocity(x, t, **cond)
        return x - broadcast_to_rows(self.sde.marginal_std(t).to(x.dtype), x) * v


# -- the front doors' checks of a score against its process ------------------------------------


def score_process(score: Any) -> SDE | None:
    """The process a score adapter was built for (its ``sde``; for a bound method such as
    ``LoadedModel.score``, its owner's), or None for a plain function."""
    for obj in (score, getattr(score, "__self__", None)):
        sde = getattr(obj, "sde", None)
        if isinstance(sde, SDE):
            return sde
    return None


def check_score_and_process(score: Any, sde: Any) -> None:
    """The front doors' first checks: a fastsde process, a callable score, and, for a score that
    carries its process (the adapters, the exact mixture, a loaded model), the same process: a
    score built for one process and integrated under another is silently wrong (e.g. a denoiser
    read as EDM sampled under VP gives N(0, I) data a std of 4)."""
    if not isinstance(sde, SDE):
        raise ValueError(f"sde must be a fastsde process (VPSDE, SubVPSDE, VESDE, EDM), got {sde!r}")
    if not callable(score):
        raise ValueError(f"score must be callable as score(x, t), got {score!r}")
    own = score_process(score)
    if own is not None and own is not sde and not _same_marginals(own, sde):
        hint = " (DenoiserScore without sde= assumes EDM)" if getattr(score, "process_defaulted", False) else ""
        raise ValueError(
            f"the score was built for {own!r}{hint} but is sampled under {sde!r}: "
            "build the score with the process you sample under"
        )


def _same_marginals(a: SDE, b: SDE) -> bool:
    """Whether a score built for process a is the score under process b: the same kind and settings,
    or two EDM processes (m = 1 and σ(t) = t whatever σ_min and σ_max)."""
    if type(a) is not type(b):
        return False
    return isinstance(a, EDM) or a.config() == b.config()


def scores_of(score: Any) -> list[Any]:
    """The score callables behind ``score``: the levels of a hierarchy (``fastsde.Levels``, marked by
    ``is_hierarchy``), else ``[score]``; how layers below the hierarchy look inside one."""
    return list(score.scores) if getattr(score, "is_hierarchy", False) else [score]


def is_hierarchy(score: Any) -> bool:
    """Whether ``score`` is a hierarchy of scores (``fastsde.Levels``, marked by ``is_hierarchy``)."""
    return bool(getattr(score, "is_hierarchy", False))


def check_score_for_run(score: Any, sde: Any, solver: str) -> None:
    """The score of a sampling run against its process: a hierarchy checks each level and that the
    solver takes levels (its own ``check``); one score by :func:`check_score_and_process`."""
    if is_hierarchy(score):
        score.check(sde, solver)
    else:
        check_score_and_process(score, sde)


def counter_for(score: Any, n: int, cond: Any = None, defer_finite: bool = False) -> Any:
    """The counting wrapper of a run: a hierarchy's own (``score.counting``: one CountingScore per level,
    the same protocol: nfe, nfe_per_sample, calls, compute, flush, accounting) or a CountingScore."""
    if is_hierarchy(score):
        return score.counting(n, cond)
    return CountingScore(score, n, defer_finite=defer_finite, cond=cond)

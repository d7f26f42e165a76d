"""Adapters that hand fastsde's score function and process to the samplers people use today.

Every adapter has one interface: ``peer.run(score, sde, x_T, budget, t_end, seed) -> PeerRun`` with
the samples at t = 0, the NFE (counted by wrapping the score in fastsde's ``CountingScore``), the
number of batched calls, the wall time and the time spent inside the score. ``budget`` is an NFE
target for fixed-step peers (mapped to their step count) and a tolerance for adaptive ones.
Every peer starts from the same x_T as fastsde (mapped to the peer's coordinates) and ends with the
same kind of output: a clean sample (Tweedie's denoise at the end, counted, where the peer stops at
t_end; the peers that step to σ = 0 do that denoise themselves).

Mappings (stated so the comparison can be checked):

- k-diffusion works in EDM coordinates x̃ = x/m(t), σ̃ = σ(t)/m(t). Its denoiser is built from the
  score: D(x̃, σ̃) = (x + σ² s(x, t))/m with t = t(σ̃) and x = m x̃ (Tweedie). Fixed-step samplers get
  the Karras ρ = 7 schedule from σ̃(T) to σ̃(t_end) (built in float64, the same formula as
  ``get_sigmas_karras``) with 0 appended, so their last step is the denoise. ``dpm_adaptive`` runs
  from σ̃(T) to σ̃(t_end); fastsde applies the final (counted) denoise.
- diffusers schedulers (VP only: they are built for the discrete DDPM process): 1000 training steps
  with trained betas chosen so that ᾱ_i = m(t_i)² at t_i = (i + 1)/1000, i.e. timestep 999 is T = 1
  and timestep 0 is t = 1e-3; ``timestep_spacing="trailing"`` (the only spacing with which DDIM's
  fixed stride matches its timesteps and the first evaluation is at T). The network output is the
  noise prediction ε = −σ(t)·s(x, t); for EulerDiscrete t is recovered from the scheduler's own σ.
  Each scheduler ends with its own jump to x0 (DDIM: ᾱ_prev = 1; others: final σ = 0).
  SA-Solver (``diffusers_sasolver``, its defaults: p = c = 2, τ = 1 on timesteps 200..800) ends
  at timestep 0 (t = 1/1000), not at σ = 0: fastsde applies the counted denoise there (budget − 1 steps).
- diffusers with Karras σ (``*_karras``, every process): the scheduler runs on fastsde's float64
  Karras ρ = 7 grid of σ̃ with a final σ = 0 (as ``use_karras_sigmas`` with ``final_sigmas_type="zero"``),
  in EDM coordinates: its sample is x̃/√(1 + σ̃²) and the model output the data prediction D(x̃, σ̃).
- torchsde integrates the reverse SDE in s = T − t: dx = −b(x, T − s) ds + g(T − s) dW with
  b = f − g² s (diagonal Itô noise), adaptive steps with rtol = atol = budget.
- scipy RK45 and torchdiffeq dopri5 integrate the PF-ODE dx/dt = f − ½ g² s from T to t_end on the
  flattened batch (one step size for the whole batch), rtol = atol = budget.
- diffusers flow-matching peers (``*_flow``, RectifiedFlow only): each scheduler is driven by hand with
  the velocity v(x, σ) = (x − x̂0)/σ, x̂0 the score's counted ``data_prediction`` at u = u(σ) (finite
  at σ = 1, where the score itself says nothing about the data), evaluated at the scheduler's own σ
  (``sched.sigmas``, float32, as its update formulas assume). The shift is the process's static shift
  (``shift`` / ``flow_shift``; μ with ``use_dynamic_shifting`` where the scheduler has it). x_T is the
  pure noise at u = 1 that fastsde starts from, used as the scheduler's first sample whatever its first σ:
  FlowMatchEuler and FlowMatchHeun start at σ = 1, UniPC at 1 − 1e-6, DPM-Solver++ at σ = shift(0.999)
  (diffusers' ``use_flow_sigmas`` grid, linspace(1, 1/1000, N + 1) in 1 − σ, its first point dropped).
  All of them step to σ = 0 themselves (the last step is x̂0 for the multistep ones), so no denoise
  follows. NFE: N steps cost N evaluations (FlowMatchHeun 2N − 1: Heun steps, the last one Euler).
  The budget is mapped to N like the fixed-step peers above.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..grids import time_grid
from ..score import CountingScore, ScoreFn, data_prediction_of
from ..sde import SDE, VPSDE, RectifiedFlow, broadcast_to_rows
from ..solvers.ode import scipy_rk45

__all__ = ["Peer", "PeerRun", "TimedScore", "PEERS", "FLOW_PEERS", "available_peers", "EDMDenoiser", "FlowVelocity"]


class TimedScore:
    """Wraps a score and accumulates the wall time spent inside it (to split solver overhead from
    network time). A score with a data prediction x̂0 (``VelocityScore``, ``GaussianMixture``, a loaded
    flow model) keeps it, timed the same way, so that solves from a rectified flow's u = 1 can use it."""

    def __init__(self, score: ScoreFn) -> None:
        self.score = score
        self.seconds = 0.0
        inner = data_prediction_of(score)
        if inner is not None:

            def data_prediction(x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
                start = time.perf_counter()
                out = inner(x, t, **cond)
                self.seconds += time.perf_counter() - start
                return out

            self.data_prediction = data_prediction

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        start = time.perf_counter()
        out = self.score(x, t)
        self.seconds += time.perf_counter() - start
        return out


@dataclass
class PeerRun:
    samples: Tensor
    nfe: float  # per sample (mean), counted by CountingScore
    calls: int  # batched calls to the score
    wall_time: float
    score_time: float
    setting: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Peer:
    """One peer sampler: ``solve(counted, sde, x_T, budget, t_end, seed) -> (x0, setting)``."""

    name: str
    package: str  # module whose import makes this peer available
    stochastic: bool
    budget_kind: str  # "nfe" (fixed steps) or "tol" (adaptive)
    solve: Callable[..., tuple[Tensor, dict[str, Any]]]
    vp_only: bool = False
    summary: str = ""
    flow_only: bool = False  # a flow-matching scheduler: RectifiedFlow processes only

    def available(self) -> tuple[bool, str]:
        """(True, "") if the peer's package imports, else (False, one-line note)."""
        try:
            importlib.import_module(self.package)
        except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
            return (
                False,
                f"{self.name}: skipped, {self.package} not importable ({type(exc).__name__}); pip install fastsde[peers]",
            )
        return True, ""

    def supports(self, sde: SDE) -> bool:
        if self.flow_only:
            return isinstance(sde, RectifiedFlow)
        return not self.vp_only or type(sde) is VPSDE

    def run(self, score: ScoreFn, sde: SDE, x_T: Tensor, budget: float, t_end: float, seed: int = 0) -> PeerRun:
        """Run the peer from x_T with the given budget; NFE counted by fastsde's CountingScore."""
        timed = TimedScore(score)
        counted = CountingScore(timed, x_T.shape[0])
        start = time.perf_counter()
        with torch.no_grad():
            x0, setting = self.solve(counted, sde, x_T.clone(), budget, t_end, seed)
        wall = time.perf_counter() - start
        return PeerRun(x0, counted.nfe, counted.calls, wall, timed.seconds, setting)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _times(value: float | Tensor, x: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(x.dtype).reshape(-1).expand(x.shape[0]).clone()
    return torch.full((x.shape[0],), float(value), dtype=x.dtype, device=x.device)


def _denoise(counted: CountingScore, sde: SDE, x: Tensor, t_end: float) -> Tensor:
    t = _times(t_end, x)
    return sde.denoise(x, t, counted(x, t))


class EDMDenoiser:
    """A k-diffusion denoiser D(x̃, σ̃) built from fastsde's score and process (EDM coordinates)."""

    def __init__(self, score: ScoreFn, sde: SDE) -> None:
        self.score = score
        self.sde = sde

    def __call__(self, x_tilde: Tensor, sigma: Tensor, **_: Any) -> Tensor:
        sig = sigma.to(x_tilde.dtype).reshape(-1).expand(x_tilde.shape[0])
        t = self.sde.t_from_edm_sigma(sig)
        m = broadcast_to_rows(self.sde.mean_coeff(t), x_tilde)
        x = m * x_tilde
        return self.sde.denoise(x, t, self.score(x, t))


def karras_sigmas(sde: SDE, n: int, t_end: float, rho: float = 7.0, dtype=torch.float64) -> Tensor:
    """n Karras ρ-schedule noise levels σ̃ from σ̃(T) to σ̃(t_end), with 0 appended."""
    grid = time_grid(sde, "edm", n, sde.T, t_end, rho)
    sig = sde.edm_sigma(grid).to(dtype)
    return torch.cat([sig, sig.new_zeros(1)])


def _edm_start(sde: SDE, x_T: Tensor) -> Tensor:
    return x_T / float(sde.mean_coeff(torch.tensor([sde.T], dtype=torch.float64)))


# ---------------------------------------------------------------------------------------------
# k-diffusion
# ---------------------------------------------------------------------------------------------


def _kdiff_fixed(fn_name: str, nfe_per_step: Callable[[int], int], **kwargs: Any):
    def solve(counted, sde, x_T, budget, t_end, seed):
        from k_diffusion import sampling

        n = _steps_for(budget, nfe_per_step)
        sigmas = karras_sigmas(sde, n, t_end)
        extra = dict(kwargs)
        if fn_name in ("sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"):
            extra["noise_sampler"] = sampling.BrownianTreeNoiseSampler(
                x_T, float(sigmas[-2]), float(sigmas[0]), seed=int(seed)
            )
        x = getattr(sampling, fn_name)(EDMDenoiser(counted, sde), _edm_start(sde, x_T), sigmas, disable=True, **extra)
        return x, {"steps": n}

    return solve


def _kdiff_adaptive(eta: float):
    def solve(counted, sde, x_T, budget, t_end, seed):
        from k_diffusion import sampling

        ends = sde.edm_sigma(torch.tensor([t_end, sde.T], dtype=torch.float64))
        torch.manual_seed(int(seed))  # its ancestral noise (eta > 0) comes from the global generator
        x, info = sampling.sample_dpm_adaptive(
            EDMDenoiser(counted, sde),
            _edm_start(sde, x_T),
            float(ends[0]),
            float(ends[1]),
            rtol=float(budget),
            atol=float(budget),
            eta=eta,
            disable=True,
            return_info=True,
        )
        t = _times(t_end, x)
        x = broadcast_to_rows(sde.mean_coeff(t), x) * x
        return _denoise(counted, sde, x, t_end), {"rtol": budget, "atol": budget, "n_reject": int(info["n_reject"])}

    return solve


def _steps_for(budget: float, nfe: Callable[[int], int]) -> int:
    """Largest step count n ≥ 1 with nfe(n) ≤ budget (at least 1)."""
    n = 1
    while nfe(n + 1) <= budget:
        n += 1
    return n


# ---------------------------------------------------------------------------------------------
# diffusers schedulers (VP)
# ---------------------------------------------------------------------------------------------


def vp_trained_betas(sde: SDE, n_train: int = 1000) -> Tensor:
    """Betas with ᾱ_i = m(t_i)² at t_i = (i + 1)/n_train (float64)."""
    t = torch.arange(1, n_train + 1, dtype=torch.float64) / n_train
    abar = sde.mean_coeff(t) ** 2
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    return 1.0 - abar / prev


def _diffusers(cls_name: str, **kwargs: Any):
    def solve(counted, sde, x_T, budget, t_end, seed):
        import diffusers

        n_train = 1000
        sched = getattr(diffusers, cls_name)(
            num_train_timesteps=n_train,
            trained_betas=vp_trained_betas(sde, n_train).numpy(),
            timestep_spacing="trailing",
            prediction_type="epsilon",
            **kwargs,
        )
        n = max(int(budget), 1)
        sched.set_timesteps(n)
        sigmas = getattr(sched, "sigmas", None)
        use_sigma = cls_name == "EulerDiscreteScheduler"
        x = x_T * float(sched.init_noise_sigma) if use_sigma else x_T
        gen = torch.Generator().manual_seed(int(seed))
        for i, tau in enumerate(sched.timesteps):
            inp = sched.scale_model_input(x, tau)
            if use_sigma:
                t = sde.t_from_edm_sigma(_times(float(sigmas[i]), inp))
            else:
                t = _times((float(tau) + 1.0) / n_train, inp)
            eps = -broadcast_to_rows(sde.marginal_std(t), inp) * counted(inp, t)
            step_kw = {"generator": gen} if cls_name == "EulerDiscreteScheduler" else {}
            x = sched.step(eps, tau, x, **step_kw).prev_sample
        return x, {"steps": n, "spacing": "trailing"}

    return solve


def _diffusers_karras(cls_name: str, **kwargs: Any):
    """A diffusers multistep scheduler on the Karras ρ = 7 σ̃ grid from σ̃(T) to σ̃(t_end) with a final
    σ = 0 (``use_karras_sigmas`` with the grid replaced by fastsde's float64 one, so that it runs on
    every process, EDM included). The scheduler's sample is x̃/√(1 + σ̃²) (its VP scaling) and the
    model output is the data prediction (``prediction_type="sample"``): x̂0 = D(x̃, σ̃)."""

    def solve(counted, sde, x_T, budget, t_end, seed):
        import diffusers

        sched = getattr(diffusers, cls_name)(
            num_train_timesteps=1000, use_karras_sigmas=True, prediction_type="sample", **kwargs
        )
        n = max(int(budget), 1)
        sched.set_timesteps(n)
        sigmas = karras_sigmas(sde, n, t_end)
        sched.sigmas = sigmas.clone()
        sched.timesteps = torch.arange(n - 1, -1, -1, dtype=torch.int64) * (1000 // max(n, 1))
        den = EDMDenoiser(counted, sde)
        x = _edm_start(sde, x_T) / float(torch.sqrt(1.0 + sigmas[0] ** 2))
        for i, tau in enumerate(sched.timesteps):
            sig = float(sigmas[i])
            x0 = den(x * (1.0 + sig**2) ** 0.5, _times(sig, x))
            x = sched.step(x0, tau, x).prev_sample
        return x, {"steps": n, "sigmas": "karras rho 7"}

    return solve


# ---------------------------------------------------------------------------------------------
# torchsde (reverse SDE), scipy and torchdiffeq (PF-ODE)
# ---------------------------------------------------------------------------------------------


def _torchsde(method: str):
    def solve(counted, sde, x_T, budget, t_end, seed):
        import torchsde

        shape = x_T.shape
        n = shape[0]
        span = sde.T - t_end

        class ReverseSDE(torch.nn.Module):
            noise_type = "diagonal"
            sde_type = "ito"

            def f(self, s: Tensor, y: Tensor) -> Tensor:
                x = y.reshape(shape)
                t = _times(sde.T - s, x)
                return -sde.reverse_drift(x, t, counted(x, t)).reshape(n, -1)

            def g(self, s: Tensor, y: Tensor) -> Tensor:
                t = _times(sde.T - s, y)
                return sde.diffusion(t)[:, None].expand_as(y).clone()

        y0 = x_T.reshape(n, -1)
        ts = torch.tensor([0.0, span], dtype=y0.dtype)
        levy = "space-time" if method == "srk" else "none"
        bm = torchsde.BrownianInterval(
            t0=0.0, t1=span, size=y0.shape, dtype=y0.dtype, entropy=int(seed), levy_area_approximation=levy
        )
        ys = torchsde.sdeint(
            ReverseSDE(), y0, ts, bm=bm, method=method, adaptive=True, rtol=budget, atol=budget, dt=span / 20
        )
        x = ys[-1].reshape(shape)
        return _denoise(counted, sde, x, t_end), {"rtol": budget, "atol": budget, "method": method}

    return solve


def _scipy_rk45(counted, sde, x_T, budget, t_end, seed):
    def fun(x: Tensor, t: Tensor, rows: None) -> Tensor:
        tt = t.to(x.dtype)
        return sde.ode_drift(x, tt, counted(x, tt))

    x, _, _ = scipy_rk45(fun, x_T, sde.T, t_end, rtol=budget, atol=budget)
    return _denoise(counted, sde, x, t_end), {"rtol": budget, "atol": budget}


def _torchdiffeq_dopri5(counted, sde, x_T, budget, t_end, seed):
    from torchdiffeq import odeint

    def func(t: Tensor, x: Tensor) -> Tensor:
        tt = _times(t, x)
        return sde.ode_drift(x, tt, counted(x, tt))

    ts = torch.tensor([sde.T, t_end], dtype=x_T.dtype)
    # step_t makes the last step end exactly at t_end: dopri5 would otherwise evaluate past it
    # (at t < 0, where the process is undefined) and interpolate back.
    opts = {"step_t": ts[1:]}
    x = odeint(func, x_T, ts, rtol=budget, atol=budget, method="dopri5", options=opts)[-1]
    return _denoise(counted, sde, x, t_end), {"rtol": budget, "atol": budget}


def _diffusers_sasolver(counted, sde, x_T, budget, t_end, seed):
    """diffusers' SASolverScheduler with its defaults on the trailing timesteps (VP); its last step ends
    at timestep 0 (t = 1/1000) with noise σ(1/1000) left, so the counted Tweedie denoise follows."""
    import diffusers

    n_train = 1000
    sched = diffusers.SASolverScheduler(
        num_train_timesteps=n_train,
        trained_betas=vp_trained_betas(sde, n_train).numpy(),
        timestep_spacing="trailing",
        prediction_type="epsilon",
    )
    n = max(int(budget) - 1, 1)
    sched.set_timesteps(n)
    gen = torch.Generator().manual_seed(int(seed))
    x = x_T
    for tau in sched.timesteps:
        t = _times((float(tau) + 1.0) / n_train, x)
        eps = -broadcast_to_rows(sde.marginal_std(t), x) * counted(x, t)
        x = sched.step(eps, tau, x, generator=gen).prev_sample
    return _denoise(counted, sde, x, 1.0 / n_train), {"steps": n, "spacing": "trailing", "orders": "p = c = 2"}


# ---------------------------------------------------------------------------------------------
# diffusers flow-matching schedulers (RectifiedFlow)
# ---------------------------------------------------------------------------------------------


class FlowVelocity:
    """The velocity v(x, σ) = ε̂ − x̂0 = (x − x̂0)/σ of a flow-matching network, rebuilt from fastsde's
    counted score on a RectifiedFlow: x̂0 from the score's ``data_prediction`` at u = u(σ) (one counted
    evaluation). σ is a float (one noise level for the batch); the result has x's dtype."""

    def __init__(self, counted: CountingScore, sde: SDE) -> None:
        if not isinstance(sde, RectifiedFlow):
            raise ValueError(f"a flow-matching peer needs a RectifiedFlow process, got {sde!r}")
        if not counted.has_data_prediction:
            raise ValueError(
                "a flow-matching peer needs a score with data_prediction (VelocityScore, GaussianMixture, a flow model)"
            )
        self.counted = counted
        self.sde = sde

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        if not 0.0 < sigma <= 1.0:
            raise ValueError(f"the velocity is evaluated at 0 < σ ≤ 1, got σ = {sigma!r}")
        u = float(self.sde.t_from_sigma(torch.tensor(sigma, dtype=torch.float64)).clamp(max=1.0))
        x0 = self.counted.data_prediction(x, _times(u, x))
        return ((x - x0) / sigma).to(x.dtype)


def _flow_shift_kwargs(sde: RectifiedFlow, static: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(scheduler kwargs, set_timesteps kwargs) giving the process's shift: ``static`` names the scheduler's
    static-shift argument; μ (dynamic shifting) goes to set_timesteps."""
    if sde.shift_terminal is not None:
        raise ValueError("the flow-matching peers do not take shift_terminal")
    if sde.mu is None:
        return {static: sde.effective_shift}, {}
    return {"use_dynamic_shifting": True, "time_shift_type": sde.time_shift_type}, {"mu": sde.mu}


def _flow_match(cls_name: str, nfe_per_step: Callable[[int], int]):
    """FlowMatchEulerDiscreteScheduler / FlowMatchHeunDiscreteScheduler with N steps from σ = 1 to 0."""

    def solve(counted, sde, x_T, budget, t_end, seed):
        import diffusers

        vel = FlowVelocity(counted, sde)
        n = _steps_for(budget, nfe_per_step)
        cls = getattr(diffusers, cls_name)
        if cls_name == "FlowMatchHeunDiscreteScheduler":
            if sde.mu is not None or sde.shift_terminal is not None:
                raise ValueError("FlowMatchHeunDiscreteScheduler has a static shift only")
            sched, set_kw = cls(shift=sde.effective_shift), {}
        else:
            kw, set_kw = _flow_shift_kwargs(sde, "shift")
            sched = cls(**kw)
        sched.set_timesteps(n, **set_kw)
        x = x_T
        for tau in sched.timesteps:
            sigma = float(tau) / sched.config.num_train_timesteps
            x = sched.step(vel(x, sigma), tau, x).prev_sample
        return x.to(x_T.dtype), {"steps": n, "shift": sde.effective_shift}

    return solve


def _flow_multistep(cls_name: str, **kwargs: Any):
    """A diffusers multistep scheduler with ``use_flow_sigmas=True, prediction_type="flow_prediction"``
    and final σ = 0, N steps (N evaluations)."""

    def solve(counted, sde, x_T, budget, t_end, seed):
        import diffusers

        vel = FlowVelocity(counted, sde)
        n = max(int(budget), 1)
        shift_kw, set_kw = _flow_shift_kwargs(sde, "flow_shift")
        sched = getattr(diffusers, cls_name)(
            use_flow_sigmas=True, prediction_type="flow_prediction", final_sigmas_type="zero", **shift_kw, **kwargs
        )
        sched.set_timesteps(n, **set_kw)
        gen = torch.Generator().manual_seed(int(seed))
        step_kw = {"generator": gen} if kwargs.get("algorithm_type", "").startswith("sde-") else {}
        x = x_T
        for i, tau in enumerate(sched.timesteps):
            sigma = float(sched.sigmas[i])
            x = sched.step(vel(x, sigma), tau, x, **step_kw).prev_sample
        return x.to(x_T.dtype), {"steps": n, "first_sigma": float(sched.sigmas[0]), "flow_shift": sde.effective_shift}

    return solve


def _one(n: int) -> int:
    return n


def _heun_nfe(n: int) -> int:
    return 2 * n - 1


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer("kdiff_euler", "k_diffusion", False, "nfe", _kdiff_fixed("sample_euler", _one)),
        Peer("kdiff_heun", "k_diffusion", False, "nfe", _kdiff_fixed("sample_heun", _heun_nfe)),
        Peer("kdiff_dpmpp_2m", "k_diffusion", False, "nfe", _kdiff_fixed("sample_dpmpp_2m", _one)),
        Peer("kdiff_lms", "k_diffusion", False, "nfe", _kdiff_fixed("sample_lms", _one)),
        Peer("kdiff_dpmpp_2m_sde", "k_diffusion", True, "nfe", _kdiff_fixed("sample_dpmpp_2m_sde", _one)),
        Peer("kdiff_dpmpp_3m_sde", "k_diffusion", True, "nfe", _kdiff_fixed("sample_dpmpp_3m_sde", _one)),
        Peer("kdiff_dpm_adaptive_eta0", "k_diffusion", False, "tol", _kdiff_adaptive(0.0)),
        Peer("kdiff_dpm_adaptive_eta1", "k_diffusion", True, "tol", _kdiff_adaptive(1.0)),
        Peer(
            "diffusers_ddim",
            "diffusers",
            False,
            "nfe",
            _diffusers("DDIMScheduler", set_alpha_to_one=True, clip_sample=False),
            vp_only=True,
        ),
        Peer(
            "diffusers_dpmsolver_2m",
            "diffusers",
            False,
            "nfe",
            _diffusers("DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_order=2),
            vp_only=True,
        ),
        Peer("diffusers_unipc", "diffusers", False, "nfe", _diffusers("UniPCMultistepScheduler"), vp_only=True),
        Peer("diffusers_euler", "diffusers", False, "nfe", _diffusers("EulerDiscreteScheduler"), vp_only=True),
        Peer(
            "diffusers_unipc_karras",
            "diffusers",
            False,
            "nfe",
            _diffusers_karras("UniPCMultistepScheduler"),
            summary="UniPC with diffusers' defaults (order 2, bh2, corrector), Karras σ, final σ = 0",
        ),
        Peer(
            "diffusers_dpmsolver_2m_karras",
            "diffusers",
            False,
            "nfe",
            _diffusers_karras("DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_order=2),
            summary="DPM-Solver++(2M), Karras σ, final σ = 0",
        ),
        Peer("diffusers_sasolver", "diffusers", True, "nfe", _diffusers_sasolver, vp_only=True),
        Peer("torchsde_srk", "torchsde", True, "tol", _torchsde("srk")),
        Peer("torchsde_milstein", "torchsde", True, "tol", _torchsde("milstein")),
        Peer("scipy_rk45", "scipy.integrate", False, "tol", _scipy_rk45),
        Peer("torchdiffeq_dopri5", "torchdiffeq", False, "tol", _torchdiffeq_dopri5),
    )
}


#: the diffusers flow-matching peers (RectifiedFlow only); also in PEERS
FLOW_PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer(
            "diffusers_flow_euler",
            "diffusers",
            False,
            "nfe",
            _flow_match("FlowMatchEulerDiscreteScheduler", _one),
            summary="FlowMatchEulerDiscreteScheduler, N steps σ = 1 → 0",
            flow_only=True,
        ),
        Peer(
            "diffusers_flow_heun",
            "diffusers",
            False,
            "nfe",
            _flow_match("FlowMatchHeunDiscreteScheduler", _heun_nfe),
            summary="FlowMatchHeunDiscreteScheduler (static shift), N steps, 2N − 1 NFE",
            flow_only=True,
        ),
        Peer(
            "diffusers_dpmsolver_2m_flow",
            "diffusers",
            False,
            "nfe",
            _flow_multistep("DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_order=2),
            summary="DPM-Solver++(2M), use_flow_sigmas, flow_prediction, final σ = 0",
            flow_only=True,
        ),
        Peer(
            "diffusers_unipc_flow",
            "diffusers",
            False,
            "nfe",
            _flow_multistep("UniPCMultistepScheduler"),
            summary="UniPC (order 2, bh2, corrector), use_flow_sigmas, flow_prediction, final σ = 0",
            flow_only=True,
        ),
        Peer(
            "diffusers_dpmsolver_2m_sde_flow",
            "diffusers",
            True,
            "nfe",
            _flow_multistep("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++", solver_order=2),
            summary="SDE-DPM-Solver++(2M), use_flow_sigmas, flow_prediction, final σ = 0",
            flow_only=True,
        ),
    )
}
PEERS.update(FLOW_PEERS)


def available_peers(names: list[str] | None = None) -> tuple[list[Peer], list[str]]:
    """The peers (all, or those named) whose packages import, and one note per skipped peer."""
    chosen = list(PEERS.values()) if names is None else [PEERS[n] for n in names]
    ok, notes = [], []
    for p in chosen:
        avail, note = p.available()
        (ok.append(p) if avail else notes.append(note))
    return ok, notes

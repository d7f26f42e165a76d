"""Forward processes: VP, sub-VP, VE (Song et al. 2021) and EDM (Karras et al. 2022).

Every process has Gaussian marginals x_t = m(t)·x0 + σ(t)·z, so one interface serves all of them:
drift f, diffusion g, mean coefficient m, marginal std σ, the half log-SNR λ = log(m/σ) and its
inverse, the prior, and the reverse-time family dx = [f − (1+λ²)/2 · g² s] dt + λ g dw̄.

Times are 1-D tensors holding one time per row of x; nothing here assumes a shared time.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "SDE",
    "VPSDE",
    "SubVPSDE",
    "VESDE",
    "EDM",
    "DiscreteVPSDE",
    "RectifiedFlow",
    "broadcast_to_rows",
    "sde_from_config",
]


def broadcast_to_rows(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-row vector (n,) so that it broadcasts against x of shape (n, *dims)."""
    return v.reshape(v.shape[0], *([1] * (x.dim() - 1)))


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


class SDE(ABC):
    """A forward diffusion process on t ∈ [0, T] with Gaussian marginals.

    Subclasses define the schedule; everything derived (reverse drift, denoiser, prior) lives here.
    """

    #: Final time of the forward process (start of sampling).
    T: float
    #: Default end time of sampling (ε).
    default_t_end: float
    #: Smallest time at which the process is defined (0 for the diffusions, σ_min for EDM).
    t_min: float = 0.0
    #: Width of the data interval in model space; sets the default absolute tolerance (range/256).
    data_range: float = 2.0
    #: m(t) = 1 at every t (the variance-exploding processes): no division by m where it is exactly 1
    unit_mean: bool = False

    # -- schedule -------------------------------------------------------------------------
    @abstractmethod
    def mean_coeff(self, t: Tensor) -> Tensor:
        """m(t): the marginal mean is m(t)·x0."""

    @abstractmethod
    def marginal_std(self, t: Tensor) -> Tensor:
        """σ(t): the marginal std of x_t given x0."""

    @abstractmethod
    def diffusion(self, t: Tensor) -> Tensor:
        """g(t), per row."""

    @abstractmethod
    def drift_coeff(self, t: Tensor) -> Tensor:
        """a(t) with f(x, t) = a(t)·x (every process here is linear in x)."""

    @abstractmethod
    def t_from_lambda(self, lam: Tensor) -> Tensor:
        """Inverse of the half log-SNR λ(t) = log(m(t)/σ(t))."""

    @property
    @abstractmethod
    def prior_std(self) -> float:
        """Std of the prior N(0, prior_std² I) at t = T."""

    # -- derived --------------------------------------------------------------------------
    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """f(x, t), the forward drift."""
        return broadcast_to_rows(self.drift_coeff(t), x) * x

    def log_snr(self, t: Tensor) -> Tensor:
        """Half log-SNR λ(t) = log(m/σ); decreasing in t."""
        return torch.log(self.mean_coeff(t)) - torch.log(self.marginal_std(t))

    def edm_sigma(self, t: Tensor) -> Tensor:
        """σ/m: the noise level of x/m, the time variable of the EDM coordinates."""
        return self.marginal_std(t) / self.mean_coeff(t)

    def t_from_edm_sigma(self, sigma: Tensor) -> Tensor:
        """Inverse of edm_sigma."""
        return self.t_from_lambda(-torch.log(sigma))

    def reverse_drift(self, x: Tensor, t: Tensor, score: Tensor, lam: float = 1.0) -> Tensor:
        """Forward-time drift of the reverse family: f − (1+λ²)/2 · g² · s.

        λ = 1 is the reverse SDE, λ = 0 the probability-flow ODE. A backward step of size h is
        x ← x − h·b + λ·g·√h·z.
        """
        g2 = broadcast_to_rows(self.diffusion(t) ** 2, x)
        return self.drift(x, t) - 0.5 * (1.0 + lam * lam) * g2 * score

    def ode_drift(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """Drift of the probability-flow ODE, dx/dt = f − ½ g² s."""
        return self.reverse_drift(x, t, score, lam=0.0)

    def denoise(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """Tweedie's posterior mean x̂0 = (x + σ²·s)/m (no division where m ≡ 1: ``unit_mean``)."""
        sigma = broadcast_to_rows(self.marginal_std(t), x)
        out = x + sigma**2 * score
        return out if self.unit_mean else out / broadcast_to_rows(self.mean_coeff(t), x)

    def prior_sample(self, z: Tensor) -> Tensor:
        """Map standard normal draws z to prior draws."""
        return self.prior_std * z

    def prior_logp(self, x: Tensor) -> Tensor:
        """Log-density of the prior N(0, prior_std² I), one value per row."""
        d = x[0].numel()
        s2 = self.prior_std**2
        sq = x.reshape(x.shape[0], -1).pow(2).sum(dim=1)
        return -0.5 * d * math.log(2 * math.pi * s2) - sq / (2 * s2)

    def check_time(self, name: str, t: float) -> None:
        """Raise a ValueError unless t lies in the process's range [t_min, T]."""
        if not (isinstance(t, (int, float)) and math.isfinite(t)):
            raise ValueError(f"{name} must be a finite number, got {t!r}")
        if not (self.t_min <= t <= self.T) or (self.t_min == 0.0 and t <= 0.0):
            lo = "(0" if self.t_min == 0.0 else f"[{self.t_min:g}"
            raise ValueError(f"{name} must lie in {lo}, {self.T:g}] for {self!r}, got {t!r}")

    def config(self) -> dict:
        """JSON-able description (type and parameters), used in checkpoints and benchmark records."""
        return {"type": type(self).__name__, **self._params()}

    @abstractmethod
    def _params(self) -> dict: ...

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"


class _BetaSchedule(SDE):
    """Shared linear-β schedule of VP and sub-VP: β(t) = β_min + t(β_max − β_min)."""

    T = 1.0
    default_t_end = 1e-3

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        _check_positive("beta_min", beta_min)
        _check_positive("beta_max", beta_max)
        if beta_max < beta_min:
            raise ValueError(f"beta_max must be >= beta_min, got beta_min={beta_min}, beta_max={beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def _params(self) -> dict:
        return {"beta_min": self.beta_min, "beta_max": self.beta_max}

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: Tensor) -> Tensor:
        """log m(t) = −½∫₀ᵗ β."""
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def t_from_log_alpha(self, log_alpha: Tensor) -> Tensor:
        """Solve ¼(β_max−β_min)t² + ½β_min t + log α = 0 for t ≥ 0."""
        db = self.beta_max - self.beta_min
        if db == 0.0:
            return -2.0 * log_alpha / self.beta_min
        return (-self.beta_min + torch.sqrt(self.beta_min**2 - 4.0 * db * log_alpha)) / db

    def mean_coeff(self, t: Tensor) -> Tensor:
        return torch.exp(self.log_alpha(t))

    def drift_coeff(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t)

    @property
    def prior_std(self) -> float:
        return 1.0


class VPSDE(_BetaSchedule):
    """Variance-preserving SDE (DDPM): dx = −½β(t)x dt + √β(t) dw."""

    def marginal_std(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def diffusion(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.beta(t))

    def log_snr(self, t: Tensor) -> Tensor:
        la = self.log_alpha(t)
        return la - 0.5 * torch.log(-torch.expm1(2.0 * la))

    def t_from_lambda(self, lam: Tensor) -> Tensor:
        # m² = 1/(1 + e^{−2λ})  ⇒  log α = −½ log1p(e^{−2λ})
        return self.t_from_log_alpha(-0.5 * torch.nn.functional.softplus(-2.0 * lam))

    def discrete_betas(self, n: int, dtype: torch.dtype = torch.float64) -> Tensor:
        """DDPM's β_i = linspace(β_min/N, β_max/N, N), used by reverse diffusion and ancestral."""
        return torch.linspace(self.beta_min / n, self.beta_max / n, n, dtype=dtype)

    # -- discrete-time schedules (DDPM checkpoints) ------------------------------------------
    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod) -> DiscreteVPSDE:
        """The VP process of a discrete schedule given by its table ᾱ_0 … ᾱ_{N−1} (see DiscreteVPSDE)."""
        return DiscreteVPSDE(alphas_cumprod)

    @classmethod
    def from_betas(cls, betas) -> DiscreteVPSDE:
        """The VP process of a discrete schedule given by its betas: ᾱ_i = ∏_{j≤i} (1 − β_j), in float64."""
        b = _as_table("betas", betas)
        if not bool(((b > 0) & (b < 1)).all()):
            raise ValueError("betas must all lie in (0, 1)")
        return DiscreteVPSDE(torch.cumprod(1.0 - b, dim=0))

    @classmethod
    def from_diffusers_scheduler(cls, scheduler) -> DiscreteVPSDE:
        """The VP process of a diffusers scheduler (DDPM, DDIM, DPMSolver…): its own ``alphas_cumprod``
        table when it has one (so the match is exact), else its ``betas``."""
        table = getattr(scheduler, "alphas_cumprod", None)
        if table is not None:
            return DiscreteVPSDE(table)
        betas = getattr(scheduler, "betas", None)
        if betas is None:
            raise ValueError(f"{type(scheduler).__name__} has neither alphas_cumprod nor betas")
        return cls.from_betas(betas)


class SubVPSDE(_BetaSchedule):
    """sub-VP SDE: dx = −½β x dt + √(β(1 − e^{−2∫β})) dw; std 1 − e^{−∫β} (not square-rooted)."""

    def marginal_std(self, t: Tensor) -> Tensor:
        return -torch.expm1(2.0 * self.log_alpha(t))

    def diffusion(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.beta(t) * -torch.expm1(4.0 * self.log_alpha(t)))

    def t_from_lambda(self, lam: Tensor) -> Tensor:
        # λ = log m − log(1 − m²); with r = e^λ: r m² + m − r = 0  ⇒  m = 2r / (1 + √(1 + 4r²)).
        r = torch.exp(lam)
        m = 2.0 * r / (1.0 + torch.sqrt(1.0 + 4.0 * r * r))
        return self.t_from_log_alpha(torch.log(m))


class VESDE(SDE):
    """Variance-exploding SDE (SMLD): σ(t) = σ_min(σ_max/σ_min)^t, dx = σ(t)√(2 ln(σ_max/σ_min)) dw.

    The marginal std is σ(t), as in the reference code (the exact kernel std √(σ(t)² − σ_min²)
    differs only by the σ_min² that the data distribution is taken to be convolved with).
    """

    unit_mean = True

    T = 1.0
    default_t_end = 1e-5

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0) -> None:
        _check_positive("sigma_min", sigma_min)
        _check_positive("sigma_max", sigma_max)
        if sigma_max <= sigma_min:
            raise ValueError(f"sigma_max must be > sigma_min, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def _params(self) -> dict:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def mean_coeff(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def marginal_std(self, t: Tensor) -> Tensor:
        return self.sigma(t)

    def diffusion(self, t: Tensor) -> Tensor:
        return self.sigma(t) * math.sqrt(2.0 * self._log_ratio)

    def drift_coeff(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def log_snr(self, t: Tensor) -> Tensor:
        return -(math.log(self.sigma_min) + t * self._log_ratio)

    def t_from_lambda(self, lam: Tensor) -> Tensor:
        return (-lam - math.log(self.sigma_min)) / self._log_ratio

    def discrete_sigmas(self, n: int, dtype: torch.dtype = torch.float64) -> Tensor:
        """SMLD's σ_i = exp(linspace(ln σ_min, ln σ_max, N)), used by reverse diffusion and ancestral."""
        return torch.exp(torch.linspace(math.log(self.sigma_min), math.log(self.sigma_max), n, dtype=dtype))

    @property
    def prior_std(self) -> float:
        return self.sigma_max


class EDM(SDE):
    """Karras et al.'s formulation: x = x0 + σ z with time t = σ, f = 0, g = √(2σ).

    Sampling runs from σ_max down to σ_min; the final denoise takes σ_min to 0.
    """

    unit_mean = True

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        _check_positive("sigma_min", sigma_min)
        _check_positive("sigma_max", sigma_max)
        if sigma_max <= sigma_min:
            raise ValueError(f"sigma_max must be > sigma_min, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.T = self.sigma_max
        self.default_t_end = self.sigma_min
        self.t_min = self.sigma_min

    def _params(self) -> dict:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

    def mean_coeff(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def marginal_std(self, t: Tensor) -> Tensor:
        return t

    def diffusion(self, t: Tensor) -> Tensor:
        return torch.sqrt(2.0 * t)

    def drift_coeff(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def log_snr(self, t: Tensor) -> Tensor:
        return -torch.log(t)

    def t_from_lambda(self, lam: Tensor) -> Tensor:
        return torch.exp(-lam)

    @property
    def prior_std(self) -> float:
        return self.sigma_max


#: time-shift types of diffusers' dynamic (resolution-dependent) shifting
TIME_SHIFT_TYPES = ("exponential", "linear")


def _check_unit_open(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 < value < 1):
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")


class RectifiedFlow(SDE):
    """The flow-matching / rectified-flow path of SD3, FLUX, ...: x = (1 − σ)·x0 + σ·ε, the network
    predicting the velocity v = ε − x0 (see :class:`~fastsde.score.VelocityScore`).

    Process time u ∈ (0, 1] (T = 1) runs through the *shifted* schedule
    σ(u) = s·u/(1 + (s − 1)·u), m(u) = 1 − σ(u), so that fastsde's time-uniform grids are diffusers'
    shifted sigma schedules and λ-uniform grids do not depend on the shift (the shift only
    reparametrises time). s is ``shift`` (SD3's static shift), or e^μ (``mu``, FLUX's dynamic
    shift, ``time_shift_type="exponential"``: σ = e^μ/(e^μ + 1/u − 1)) or μ (``"linear"``:
    σ = μ/(μ + 1/u − 1)): all three are the same Möbius map. ``shift_terminal`` stretches the
    schedule as diffusers does, m(u) = κ·(1 − σ_s(u)) with κ = (1 − shift_terminal)/(1 − σ_s(t_end)),
    so that σ(t_end) = shift_terminal (the data are then reached at t_min > 0). With D = 1 + (s−1)u:

        m = κ(1 − u)/D,  σ = 1 − m,  dσ/du = κ s/D²,
        a(u) = d log m/du = −s/(D(1 − u)),  g(u)² = dσ²/du − 2aσ² = 2σ(dσ/du − aσ),

    the drift and diffusion of the Itô SDE dx = a·x du + g dw whose marginals are these. Half
    log-SNR λ = log(m/σ); its inverse is closed-form (m = sigmoid(λ)).

    u = T = 1 is singular: m = 0 (pure noise, prior N(0, I)), λ = −∞, a and g² infinite, and the
    score there is −x whatever the data, so the data prediction x̂0 cannot be read from a score at
    u = 1. A solve from u = 1 therefore takes x̂0 there from the score's ``data_prediction``
    (VelocityScore, GaussianMixture, CFGScore over one of them) and every solver runs it: euler, ddim
    and dpmpp_2m take their own first move (exact in x̂0, ``singular_start``), every other solver the
    driver's shared one (``solvers.core.driver.first_move``); log_likelihood integrates the velocity
    (σ̇/σ)·(x − x̂0) up to u = 1.
    ``default_t_end`` is 1e-3 (diffusers' last inference time for dynamic shifting, in u).
    """

    T = 1.0

    def __init__(
        self,
        shift: float = 1.0,
        *,
        mu: float | None = None,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        t_end: float = 1e-3,
    ) -> None:
        if isinstance(shift, bool) or not isinstance(shift, (int, float)):
            raise ValueError(f"shift must be a positive finite number, got {shift!r}")
        _check_positive("shift", shift)
        if time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"time_shift_type must be one of {list(TIME_SHIFT_TYPES)}, got {time_shift_type!r}")
        if mu is not None:
            if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu):
                raise ValueError(f"mu must be a finite number, got {mu!r}")
            if shift != 1.0:
                raise ValueError(
                    f"give either shift (static) or mu (dynamic shifting), not both: shift={shift!r}, mu={mu!r}"
                )
            if time_shift_type == "linear" and mu <= 0:
                raise ValueError(f"mu must be > 0 for time_shift_type='linear', got {mu!r}")
            eff = math.exp(mu) if time_shift_type == "exponential" else float(mu)
            if not (math.isfinite(eff) and eff > 0):
                raise ValueError(f"mu = {mu!r} gives a shift e^mu that is not a positive finite number")
        else:
            eff = float(shift)
        _check_unit_open("t_end", t_end)
        if shift_terminal is not None:
            _check_unit_open("shift_terminal", shift_terminal)
        self.shift = float(shift)
        self.mu = None if mu is None else float(mu)
        self.time_shift_type = time_shift_type
        self.shift_terminal = None if shift_terminal is None else float(shift_terminal)
        self.t_end = float(t_end)
        self.default_t_end = self.t_end
        #: the shift s of σ_s(u) = s·u/(1 + (s − 1)·u), whichever way it was given
        self.effective_shift = eff
        sig_end = eff * self.t_end / (1.0 + (eff - 1.0) * self.t_end)
        #: the terminal stretch κ of m = κ·(1 − σ_s) (1 without shift_terminal)
        self.kappa = 1.0 if shift_terminal is None else (1.0 - self.shift_terminal) / (1.0 - sig_end)
        # with κ > 1 the data (σ = 0) sit at σ_s = 1 − 1/κ
        sig0 = 1.0 - 1.0 / self.kappa if self.kappa > 1.0 else 0.0
        self.t_min = sig0 / (eff - (eff - 1.0) * sig0)

    def _params(self) -> dict:
        out: dict = {"shift": self.shift}
        if self.mu is not None:
            out.update(mu=self.mu, time_shift_type=self.time_shift_type)
        if self.shift_terminal is not None:
            out["shift_terminal"] = self.shift_terminal
        out["t_end"] = self.t_end
        return out

    # -- construction from FLUX / diffusers settings --------------------------------------------
    @staticmethod
    def dynamic_mu(
        image_seq_len: int,
        base_seq_len: int = 256,
        max_seq_len: int = 4096,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
    ) -> float:
        """FLUX's μ: linear in the image sequence length through (base_seq_len, base_shift) and
        (max_seq_len, max_shift), as diffusers' pipelines compute it (``calculate_shift``)."""
        for name, v in (("image_seq_len", image_seq_len), ("base_seq_len", base_seq_len), ("max_seq_len", max_seq_len)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name, v in (("base_shift", base_shift), ("max_shift", max_shift)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if max_seq_len == base_seq_len:
            raise ValueError(f"max_seq_len must differ from base_seq_len, both are {base_seq_len!r}")
        slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
        return image_seq_len * slope + (base_shift - slope * base_seq_len)

    @classmethod
    def dynamic(
        cls,
        image_seq_len: int | None = None,
        *,
        mu: float | None = None,
        base_seq_len: int = 256,
        max_seq_len: int = 4096,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        t_end: float = 1e-3,
    ) -> RectifiedFlow:
        """FLUX's dynamic shift: μ given, or computed from ``image_seq_len`` by :meth:`dynamic_mu`."""
        if (mu is None) == (image_seq_len is None):
            raise ValueError(
                f"give exactly one of mu and image_seq_len, got mu={mu!r}, image_seq_len={image_seq_len!r}"
            )
        if mu is None:
            mu = cls.dynamic_mu(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
        return cls(mu=mu, time_shift_type=time_shift_type, shift_terminal=shift_terminal, t_end=t_end)

    @classmethod
    def from_diffusers_scheduler(
        cls, scheduler_or_config, *, image_seq_len: int | None = None, mu: float | None = None
    ) -> RectifiedFlow:
        """The process of a diffusers ``FlowMatchEulerDiscreteScheduler`` (or its config dict): its shift,
        or with ``use_dynamic_shifting`` the μ of ``image_seq_len`` (or ``mu``) from its base/max shift and
        sequence lengths, its ``time_shift_type`` and ``shift_terminal``. ``t_end`` is the scheduler's
        last inference time (1/num_train_timesteps, shifted once more under a static shift, as
        diffusers' set_timesteps does), so a time-uniform grid of N points is its N-step schedule."""
        cfg = getattr(scheduler_or_config, "config", scheduler_or_config)
        if not isinstance(cfg, Mapping):
            raise ValueError(f"expected a FlowMatchEulerDiscreteScheduler or its config dict, got {type(cfg).__name__}")
        cfg = dict(cfg)
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas"):
            if cfg.get(key):
                raise ValueError(
                    f"scheduler option {key}=True is not a rectified-flow time shift fastsde can represent"
                )
        n_train = cfg.get("num_train_timesteps", 1000)
        if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {n_train!r}")
        kind = cfg.get("time_shift_type", "exponential")
        terminal = cfg.get("shift_terminal") or None
        if cfg.get("use_dynamic_shifting", False):
            if mu is None and image_seq_len is None:
                raise ValueError(
                    "this scheduler uses dynamic shifting (use_dynamic_shifting=True): pass image_seq_len= (the "
                    "number of latent tokens, e.g. (H/16)·(W/16) for FLUX) or mu="
                )
            return cls.dynamic(
                image_seq_len,
                mu=mu,
                base_seq_len=cfg.get("base_image_seq_len", 256),
                max_seq_len=cfg.get("max_image_seq_len", 4096),
                base_shift=cfg.get("base_shift", 0.5),
                max_shift=cfg.get("max_shift", 1.15),
                time_shift_type=kind,
                shift_terminal=terminal,
                t_end=1.0 / n_train,
            )
        if mu is not None or image_seq_len is not None:
            raise ValueError("image_seq_len / mu apply only to a scheduler with use_dynamic_shifting=True")
        shift = cfg.get("shift", 1.0)
        _check_positive("shift", shift)
        t_end = shift * (1.0 / n_train) / (1.0 + (shift - 1.0) / n_train)
        return cls(shift, shift_terminal=terminal, t_end=t_end)

    # -- schedule -------------------------------------------------------------------------------
    def _den(self, t: Tensor) -> Tensor:
        return 1.0 + (self.effective_shift - 1.0) * t

    def mean_coeff(self, t: Tensor) -> Tensor:
        return self.kappa * (1.0 - t) / self._den(t)

    def marginal_std(self, t: Tensor) -> Tensor:
        # 1 − m written without cancellation: ((1 − κ) + (s − 1 + κ)·u)/D
        s, k = self.effective_shift, self.kappa
        return ((1.0 - k) + (s - 1.0 + k) * t) / self._den(t)

    def sigma_dot(self, t: Tensor) -> Tensor:
        """dσ/du = κ·s/D²."""
        return self.kappa * self.effective_shift / self._den(t) ** 2

    def drift_coeff(self, t: Tensor) -> Tensor:
        return -self.effective_shift / (self._den(t) * (1.0 - t))

    def diffusion(self, t: Tensor) -> Tensor:
        sig = self.marginal_std(t)
        return torch.sqrt(2.0 * sig * (self.sigma_dot(t) - self.drift_coeff(t) * sig))

    def log_snr(self, t: Tensor) -> Tensor:
        return torch.log(self.mean_coeff(t)) - torch.log(self.marginal_std(t))

    def t_from_lambda(self, lam: Tensor) -> Tensor:
        # m = sigmoid(λ) (m + σ = 1); σ_s = 1 − m/κ = (κ − 1 + sigmoid(−λ))/κ; u = σ_s/(s − (s − 1)σ_s)
        s, k = self.effective_shift, self.kappa
        sig_s = (k - 1.0 + torch.sigmoid(-lam)) / k
        return sig_s / (s - (s - 1.0) * sig_s)

    def t_from_sigma(self, sigma: float | Tensor) -> float | Tensor:
        """The process time u at which σ(u) = sigma (the flow-matching t of the network)."""
        s, k = self.effective_shift, self.kappa
        sig_s = (k - 1.0 + sigma) / k
        return sig_s / (s - (s - 1.0) * sig_s)

    @property
    def prior_std(self) -> float:
        return 1.0


def _as_table(name: str, values) -> Tensor:
    """A 1-D float64 CPU tensor of at least 2 finite values from a tensor, array or sequence."""
    try:
        v = torch.as_tensor(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name} must be a 1-D sequence of numbers: {exc}") from None
    if v.dim() != 1 or v.numel() < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 entries, got shape {tuple(v.shape)}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} must be finite")
    return v.clone()


class DiscreteVPSDE(VPSDE):
    """The VP process of a discrete-time schedule (DDPM checkpoints), exact at its training timesteps.

    Timestep i (0 … N−1) sits at t_i = (i+1)/N, so t ∈ (0, 1] covers the table and timestep N−1 is T = 1.
    Between timesteps the half log-SNR λ = −log σ̃ (σ̃² = (1−ᾱ)/ᾱ) is interpolated linearly in the
    fractional timestep, i.e. log σ̃ is piecewise linear, as in k-diffusion's discrete schedules; below
    t_0 it continues as σ̃² ∝ t (the continuous VP's behaviour near 0). So ᾱ(t_i) = ᾱ_i to float64
    precision, λ(t) is strictly decreasing and t_from_lambda inverts it exactly, and the SDE
    f = ½ d log ᾱ/dt · x, g² = −d log ᾱ/dt has these marginals.

    A discrete network is conditioned on the fractional timestep ``timestep(t)`` = N·t − 1 (the inverse
    of the log σ̃ interpolation), clamped at 0 below the first timestep. Sampling ends by default at t_0.
    """

    def __init__(self, alphas_cumprod) -> None:
        ac = _as_table("alphas_cumprod", alphas_cumprod)
        if not bool(((ac > 0) & (ac < 1)).all()):
            raise ValueError(
                "alphas_cumprod must lie in (0, 1) (a schedule with zero terminal SNR, ᾱ = 0, has no "
                "Gaussian prior and is not supported)"
            )
        if not bool((ac[1:] < ac[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        self.alphas_cumprod = ac
        self.num_timesteps = int(ac.numel())
        self._lam = 0.5 * (torch.log(ac) - torch.log1p(-ac))  # λ_i, decreasing
        self._tables: dict[tuple, tuple[Tensor, Tensor]] = {}
        self.default_t_end = 1.0 / self.num_timesteps
        # the β(t) = −d log ᾱ/dt at both ends, for reference (VPSDE's names)
        self.beta_min = float(self.beta(torch.tensor([self.default_t_end], dtype=torch.float64))[0])
        self.beta_max = float(self.beta(torch.tensor([1.0], dtype=torch.float64))[0])

    def _params(self) -> dict:
        return {"alphas_cumprod": self.alphas_cumprod.tolist()}

    def __repr__(self) -> str:
        ac = self.alphas_cumprod
        return f"DiscreteVPSDE(N={self.num_timesteps}, alphas_cumprod=[{ac[0]:.6g}, …, {ac[-1]:.6g}])"

    def _table(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """λ_i and the λ slope per unit t of each segment, in the dtype and on the device of ``like``."""
        key = (like.dtype, like.device)
        if key not in self._tables:
            lam = self._lam.to(dtype=like.dtype, device=like.device)
            self._tables[key] = (lam, (self._lam[1:] - self._lam[:-1]).to(like) * self.num_timesteps)
        return self._tables[key]

    def _lam_and_slope(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """λ(t) and dλ/dt: linear in τ = N·t − 1 between timesteps, λ_0 − ½ log(N·t) below t_0 (computed in
        float32 for a half-precision t, whose N·t cannot even name the timesteps)."""
        if t.dtype in (torch.float16, torch.bfloat16):
            lam_t, slope_t = self._lam_and_slope(t.float())
            return lam_t.to(t.dtype), slope_t.to(t.dtype)
        lam, slope = self._table(t)
        n = self.num_timesteps
        tau = n * t - 1.0
        i = tau.floor().clamp(0, n - 2).long()
        w = tau - i.to(t.dtype)
        lin = lam[i] + w * (lam[i + 1] - lam[i])
        below = tau < 0
        t_safe = torch.where(below, t, torch.ones_like(t))
        low = lam[0] - 0.5 * torch.log(n * t_safe)
        return torch.where(below, low, lin), torch.where(below, -0.5 / t_safe, slope[i])

    def timestep(self, t: Tensor) -> Tensor:
        """The fractional training timestep τ(t) = N·t − 1 a discrete network is conditioned on (≥ 0)."""
        return (self.num_timesteps * t - 1.0).clamp_min(0.0)

    def log_snr(self, t: Tensor) -> Tensor:
        return self._lam_and_slope(t)[0]

    def log_alpha(self, t: Tensor) -> Tensor:
        """log m(t) = ½ log ᾱ(t) = −½ softplus(−2λ)."""
        return -0.5 * torch.nn.functional.softplus(-2.0 * self.log_snr(t))

    def marginal_std(self, t: Tensor) -> Tensor:
        return torch.exp(-0.5 * torch.nn.functional.softplus(2.0 * self.log_snr(t)))

    def beta(self, t: Tensor) -> Tensor:
        """β(t) = −d log ᾱ/dt = −2 σ² dλ/dt (piecewise, positive)."""
        lam, dlam = self._lam_and_slope(t)
        return -2.0 * torch.sigmoid(-2.0 * lam) * dlam

    def t_from_lambda(self, lam: Tensor) -> Tensor:
        table = self._table(lam)[0]
        n = self.num_timesteps
        # segment i with λ_i ≥ λ > λ_{i+1} (λ beyond the table extrapolates the end segments)
        i = (torch.searchsorted(-table, -lam.contiguous(), right=True) - 1).clamp(0, n - 2)
        w = (table[i] - lam) / (table[i] - table[i + 1])
        t_lin = (i.to(lam.dtype) + w + 1.0) / n
        t_low = torch.exp(-2.0 * (lam - table[0])) / n
        return torch.where(lam > table[0], t_low, t_lin)

    def t_from_log_alpha(self, log_alpha: Tensor) -> Tensor:
        # λ = log m − ½ log(1 − m²)
        return self.t_from_lambda(log_alpha - 0.5 * torch.log(-torch.expm1(2.0 * log_alpha)))

    def discrete_betas(self, n: int, dtype: torch.dtype = torch.float64) -> Tensor:
        """β_k = 1 − ᾱ(k/n)/ᾱ((k−1)/n), k = 1 … n (ᾱ(0) = 1): the table's own betas when n = N."""
        t = torch.arange(1, n + 1, dtype=torch.float64) / n
        la = 2.0 * self.log_alpha(t)
        prev = torch.cat([torch.zeros(1, dtype=torch.float64), la[:-1]])
        return (-torch.expm1(la - prev)).to(dtype)


#: The processes by the short names the CLI, the bench and the docs use (default parameters).
PROCESSES: dict[str, type[SDE]] = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE, "edm": EDM}


#: Processes that need their parameters (no defaults), by short name; kept out of PROCESSES, whose
#: entries are built with default parameters.
TABULATED_PROCESSES: dict[str, type[SDE]] = {"vp_discrete": DiscreteVPSDE}


def process_name(sde: SDE) -> str:
    """The short name of a process ('vp', 'subvp', 've', 'edm', 'vp_discrete'), or its class name."""
    for name, cls in {**PROCESSES, **TABULATED_PROCESSES}.items():
        if type(sde) is cls:
            return name
    return type(sde).__name__


def process_by_name(name: str, **params) -> SDE:
    """A process from its short name (``vp_discrete`` needs ``alphas_cumprod=``); an unknown name is a
    ValueError listing the valid ones."""
    if name in TABULATED_PROCESSES:
        if not params:
            raise ValueError(f"process {name!r} needs its schedule, e.g. alphas_cumprod=[...]")
        return TABULATED_PROCESSES[name](**params)
    if name not in PROCESSES:
        raise ValueError(f"unknown process {name!r}; valid processes: {list(PROCESSES) + list(TABULATED_PROCESSES)}")
    return PROCESSES[name](**params)


def grid_beta(sde: SDE, t: Tensor, t_next: Tensor) -> Tensor:
    """β_i = 1 − m(t)²/m(t_next)² of a VP-type (β-schedule) process between two times: the one-step
    DDPM β that a grid implies for the move t → t_next, computed without cancellation."""
    return -(2.0 * (sde.log_alpha(t) - sde.log_alpha(t_next))).expm1()


def per_row(value: float | Tensor, n: int, dtype: torch.dtype, device) -> Tensor:
    """One value per row: a number, a 0-d tensor or a per-row tensor as an (n,) tensor (a copy)."""
    if isinstance(value, Tensor):
        v = value.to(device=device, dtype=dtype)
        return v.expand(n).clone() if v.dim() == 0 else v.clone()
    return torch.full((n,), float(value), dtype=dtype, device=device)


def sde_from_config(cfg: dict[str, Any]) -> SDE:
    """Rebuild a process from its ``sde.config()`` dict."""
    kinds = {cls.__name__: cls for cls in [*PROCESSES.values(), *TABULATED_PROCESSES.values(), RectifiedFlow]}
    cfg = dict(cfg)
    kind = cfg.pop("type", None)
    if kind not in kinds:
        raise ValueError(f"unknown sde type {kind!r}; expected one of {sorted(kinds)}")
    return kinds[kind](**cfg)

"""Exact per-mode Fréchet distance of samples to a Gaussian mixture, its finite-sample floor, and
the MSE to a reference batch.

Definition (``mixture_frechet``). Let the target be the mixture Σ_k w_k N(μ_k, S_k) at time t
(t = 0: the data distribution). For samples x_1..x_n:

1. responsibilities r_ik = P(mode k | x_i) under the exact target (``GaussianMixture.responsibilities``);
2. per mode, the responsibility-weighted Gaussian fit: ŵ_k = mean_i r_ik, μ̂_k = Σ_i r_ik x_i / Σ_i r_ik,
   Σ̂_k = Σ_i r_ik (x_i − μ̂_k)(x_i − μ̂_k)ᵀ / Σ_i r_ik (full covariance, so correlations count);
3. per mode, the Fréchet (2-Wasserstein²) distance between N(μ̂_k, Σ̂_k) and the exact N(μ_k, S_k):
   F_k = ‖μ̂_k − μ_k‖² + tr(Σ̂_k + S_k − 2 (S_k^{½} Σ̂_k S_k^{½})^{½});
4. a mode-weight term W = χ²(ŵ‖w) · v̄, with χ² = Σ_k (ŵ_k − w_k)²/w_k and v̄ = Σ_k w_k tr(S_k) the mean
   total variance of a mode. Its finite-sample size is ≈ (K−1)/n · v̄, the same order as the per-mode
   terms' (a mode mean misplaced by its own sampling error costs tr(S_k)/n_k), so neither part swamps
   the other; a weight error δ between two modes costs about δ²(1/w_j + 1/w_k)·v̄. W is in the same
   units as F_k (squared units of x);
5. the distance is  FD = Σ_k w_k F_k + W  (units of x², summed over dimensions).

A mode that receives (almost) no responsibility mass is fitted by a point mass at the overall
sample mean (this only matters for broken samplers; W already charges the lost mass). Non-finite samples give FD = inf.

Even exact samples have FD > 0 at finite n (estimation noise); ``mixture_frechet_floor`` measures
that floor: the same statistic on exact samples of the same size, averaged over a few draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..score import GaussianMixture

__all__ = ["MixtureFD", "frechet_gaussian", "mixture_frechet", "mixture_frechet_floor", "mse"]


@dataclass
class MixtureFD:
    """The per-mode Fréchet distance and its parts."""

    value: float  # Σ_k w_k F_k + W
    per_mode: list[float] = field(default_factory=list)  # F_k
    weight_term: float = 0.0  # W
    weights_hat: list[float] = field(default_factory=list)  # ŵ_k


def _sqrtm_psd(a: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigendecomposition)."""
    vals, vecs = torch.linalg.eigh(0.5 * (a + a.T))
    return (vecs * vals.clamp(min=0.0).sqrt()) @ vecs.T


def frechet_gaussian(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Fréchet distance ‖μ₁−μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₂^{½} Σ₁ Σ₂^{½})^{½}) between two Gaussians
    (computed in float64)."""
    mu1, cov1, mu2, cov2 = (v.detach().to("cpu", torch.float64) for v in (mu1, cov1, mu2, cov2))
    s2 = _sqrtm_psd(cov2)
    cross = _sqrtm_psd(s2 @ cov1 @ s2)
    d = float(((mu1 - mu2) ** 2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2.0 * torch.trace(cross))
    return max(d, 0.0)


def mixture_frechet(samples: Tensor, mixture: GaussianMixture, t: float = 0.0) -> MixtureFD:
    """Per-mode Fréchet distance of ``samples`` (n, *dims) to the exact mixture marginal at time t.

    See the module docstring for the definition. Computed in float64.
    """
    if samples.dim() < 2 or tuple(samples.shape[1:]) != tuple(mixture.dims):
        raise ValueError(f"samples must have shape (n, *{tuple(mixture.dims)}), got {tuple(samples.shape)}")
    n = samples.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 samples, got {n}")
    x = samples.detach().to("cpu", torch.float64).reshape(n, -1)
    w, means, stds = mixture.marginal_params(t)
    k = w.shape[0]
    mu = means.reshape(k, -1)
    var = (stds.reshape(k, -1)) ** 2
    if not bool(torch.isfinite(x).all()):
        return MixtureFD(math.inf, [math.inf] * k, math.inf, [math.nan] * k)
    r = mixture.responsibilities(x.reshape(samples.shape), torch.full((n,), float(t), dtype=torch.float64))
    mass = r.sum(0)
    w_hat = mass / n
    per_mode = []
    overall = x.mean(0)
    for j in range(k):
        cov_true = torch.diag(var[j])
        if float(mass[j]) < 1e-8:
            per_mode.append(frechet_gaussian(overall, torch.zeros_like(cov_true), mu[j], cov_true))
            continue
        rj = r[:, j] / mass[j]
        mean_j = (rj[:, None] * x).sum(0)
        diff = x - mean_j
        cov_j = (rj[:, None] * diff).T @ diff
        per_mode.append(frechet_gaussian(mean_j, cov_j, mu[j], cov_true))
    chi2 = float(((w_hat - w) ** 2 / w).sum())
    vbar = float((w * var.sum(1)).sum())
    weight_term = chi2 * vbar
    value = float((w * torch.tensor(per_mode, dtype=torch.float64)).sum()) + weight_term
    return MixtureFD(value, per_mode, weight_term, w_hat.tolist())


def mixture_frechet_floor(
    mixture: GaussianMixture, n: int, t: float = 0.0, draws: int = 5, seed: int = 0
) -> tuple[float, float]:
    """Finite-sample floor of ``mixture_frechet``: mean and std of the statistic on ``draws`` sets of
    n exact samples of the target (seeded, so reproducible)."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws!r}")
    g = torch.Generator().manual_seed(seed)
    vals = torch.tensor([mixture_frechet(mixture.sample(n, t, generator=g), mixture, t).value for _ in range(draws)])
    std = float(vals.std()) if draws > 1 else 0.0
    return float(vals.mean()), std


def mse(samples: Tensor, reference: Tensor) -> float:
    """Mean over samples and elements of (x − x_ref)²; the reference is solved from the same noise."""
    if samples.shape != reference.shape:
        raise ValueError(f"samples {tuple(samples.shape)} and reference {tuple(reference.shape)} must match")
    d = samples.detach().to("cpu", torch.float64) - reference.detach().to("cpu", torch.float64)
    return float((d * d).mean())

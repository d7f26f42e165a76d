"""Exact test problems: Gaussian mixtures whose diffused score and density are closed-form.

Used by the tests, the benchmarks and the main job before any trained model exists.
"""

from __future__ import annotations

import torch

from .score import GaussianMixture
from .sde import SDE

__all__ = ["mixture_2d", "mixture_nd", "ConditionalMixture", "conditional_mixture_2d"]


def mixture_2d(sde: SDE, scale: float = 1.0) -> GaussianMixture:
    """A 2-D, three-mode mixture with unequal weights and stds (data roughly in [-1, 1]·scale)."""
    means = torch.tensor([[-0.6, -0.3], [0.5, 0.5], [0.4, -0.6]], dtype=torch.float64) * scale
    stds = torch.tensor([[0.10, 0.15], [0.12, 0.08], [0.06, 0.10]], dtype=torch.float64) * scale
    return GaussianMixture([0.5, 0.3, 0.2], means, stds, sde)


def mixture_nd(sde: SDE, dim: int = 16, modes: int = 4, seed: int = 0) -> GaussianMixture:
    """A d-dimensional mixture with well-separated modes inside [-1, 1]^d (a harder benchmark)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(modes, dim, generator=g, dtype=torch.float64) * 1.2 - 0.6
    stds = 0.05 + 0.1 * torch.rand(modes, dim, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(modes, generator=g, dtype=torch.float64)
    return GaussianMixture(weights, means, stds, sde)


class ConditionalMixture:
    """An exact class-conditional problem: class y has its own Gaussian mixture p_y; the label
    ``null_label`` (= the number of classes) is the unconditional model Σ_y w_y p_y, as a network
    trained with label dropout learns it. Everything is closed-form at every t:
    ``score(x, t, class_labels)``, ``log_prob``, and the classifier ``logits(x, t)`` = log w_y + log p_y,
    whose log-softmax is log p(y | x, t) (for exact classifier guidance)."""

    def __init__(self, classes: list[GaussianMixture], weights: list[float] | None = None) -> None:
        if not classes:
            raise ValueError("ConditionalMixture needs at least one class")
        self.classes = classes
        w = torch.as_tensor(weights if weights is not None else [1.0] * len(classes), dtype=torch.float64)
        self.class_weights = w / w.sum()
        self.null_label = len(classes)
        self.sde = classes[0].sde
        means = torch.cat([c.means for c in classes])
        stds = torch.cat([c.stds for c in classes])
        comp = torch.cat([wy * c.weights for wy, c in zip(self.class_weights, classes)])
        self.unconditional = GaussianMixture(comp, means, stds, self.sde)

    def _pick(self, label: int) -> GaussianMixture:
        return self.unconditional if label == self.null_label else self.classes[label]

    def score(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """Exact ∇ₓ log p_t(x | y) row by row (the null label: the unconditional score)."""
        out = torch.empty_like(x)
        labels = class_labels.reshape(-1).to("cpu", torch.long)
        if labels.shape[0] != x.shape[0]:
            raise ValueError(f"score got {x.shape[0]} rows but {labels.shape[0]} labels")
        for y in labels.unique().tolist():
            idx = (labels == y).nonzero().squeeze(1).to(x.device)
            out[idx] = self._pick(int(y)).score(x[idx], t[idx])
        return out

    __call__ = score

    def logits(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log w_y + log p_t(x | y) for every class (n, K): an exact noisy-image classifier."""
        cols = [torch.log(wy).to(x.dtype) + c.log_prob(x, t) for wy, c in zip(self.class_weights, self.classes)]
        return torch.stack(cols, dim=1)


def conditional_mixture_2d(sde: SDE) -> ConditionalMixture:
    """Three 2-D classes, each a Gaussian mixture (class 2 with two modes), well apart."""
    d = torch.float64
    c0 = GaussianMixture([1.0], torch.tensor([[-0.6, -0.3]], dtype=d), torch.tensor([[0.10, 0.15]], dtype=d), sde)
    c1 = GaussianMixture([1.0], torch.tensor([[0.5, 0.5]], dtype=d), torch.tensor([[0.12, 0.08]], dtype=d), sde)
    c2 = GaussianMixture(
        [0.6, 0.4],
        torch.tensor([[0.4, -0.6], [0.7, -0.1]], dtype=d),
        torch.tensor([[0.06, 0.10], [0.05, 0.05]], dtype=d),
        sde,
    )
    return ConditionalMixture([c0, c1, c2], [0.5, 0.3, 0.2])

"""Digits quality: a Fréchet distance in the features of a shipped digits classifier (the digits
analogue of FID) plus the classifier's mean confidence.

- The classifier is a small CNN trained on the train split only; its 64-d penultimate layer is the
  feature space.
- FD = ‖μ_s − μ_h‖² + tr(Σ_s + Σ_h − 2(Σ_h^{½} Σ_s Σ_h^{½})^{½}) between the Gaussian fits of the samples'
  features and the held-out split's (300 images); the held-out mean/covariance are precomputed and shipped.
- The floor is the same FD for real data: random subsets of the train split, of the same size as the
  samples (FD is biased upwards at small n), averaged over 5 subsets; shipped as a table over n.
- Confidence = mean over samples of the classifier's max softmax probability (held-out data: see the
  shipped ``heldout_confidence``).

Samples are in model space [−1, 1] (pixel v ↦ v/8 − 1) and are clipped to that range first.
Rebuild the assets (deterministic, ~1 min of one core): ``python -m fastsde.metrics.digits --build``.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["DigitsClassifier", "digits_quality", "digits_features", "frechet_distance", "load_classifier"]

_ASSET = "data/digits_classifier"


class DigitsClassifier(nn.Module):
    """conv(1→32) → conv(32→64) → pool → fc 64 (features) → fc 10."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 64),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(0.5 * (a + a.T))
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein²) distance between two Gaussians; the matrix root is taken on the
    symmetric form cov2^½ cov1 cov2^½, so singular sample covariances (n < 64) are fine."""
    diff = mu1 - mu2
    root2 = _sqrt_psd(cov2)
    inner = root2 @ cov1 @ root2
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (inner + inner.T)), 0.0, None)).sum())
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_covmean)


def _stats(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return f.mean(0), np.cov(f, rowvar=False)


@lru_cache(maxsize=1)
def load_classifier() -> tuple[DigitsClassifier, dict[str, Any], dict[str, np.ndarray]]:
    """The shipped classifier (eval mode), its JSON record and the held-out feature statistics."""
    from safetensors.torch import load

    root = resources.files("fastsde")
    tensors = load(root.joinpath(_ASSET + ".safetensors").read_bytes())
    meta = json.loads(root.joinpath(_ASSET + ".json").read_text())
    net = DigitsClassifier()
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    net.eval().requires_grad_(False)
    stats = {k: tensors[k].double().numpy() for k in ("heldout_mean", "heldout_cov")}
    return net, meta, stats


def _prepare(samples: Tensor) -> Tensor:
    if not isinstance(samples, Tensor):
        samples = torch.as_tensor(np.asarray(samples))
    if samples.dim() == 3:
        samples = samples.unsqueeze(1)
    if tuple(samples.shape[1:]) != (1, 8, 8):
        raise ValueError(f"digits samples must have shape (n, 1, 8, 8) or (n, 8, 8), got {tuple(samples.shape)}")
    if samples.shape[0] < 2:
        raise ValueError(f"need at least 2 samples for a Fréchet distance, got {samples.shape[0]}")
    return samples.detach().float().cpu()


def digits_features(samples: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features (n, 64), softmax probabilities (n, 10)) of samples in [−1, 1]."""
    net, _, _ = load_classifier()
    x = _prepare(samples).clamp(-1.0, 1.0)
    with torch.no_grad():
        feats = torch.cat([net.features(b) for b in x.split(1024)])
        probs = torch.softmax(net.head(feats), dim=1)
    return feats.double().numpy(), probs.double().numpy()


def floor_for(n: int) -> float:
    """The real-data FD floor at sample size n (interpolated in 1/n from the shipped table)."""
    _, meta, _ = load_classifier()
    table = sorted((int(k), float(v)) for k, v in meta["floor"].items())
    ns = np.array([1.0 / k for k, _ in table])
    vals = np.array([v for _, v in table])
    order = np.argsort(ns)
    return float(np.interp(1.0 / n, ns[order], vals[order]))


def digits_quality(samples: Tensor) -> dict[str, float]:
    """{"fd", "confidence", "floor", "n"} for samples (n, 1, 8, 8) in [−1, 1]; lower fd is better.

    Non-finite samples make fd = inf (they are not dropped silently).
    """
    x = _prepare(samples)
    n = x.shape[0]
    floor = floor_for(n)
    if not bool(torch.isfinite(x).all()):
        return {"fd": math.inf, "confidence": math.nan, "floor": floor, "n": n}
    feats, probs = digits_features(x)
    _, _, stats = load_classifier()
    mu, cov = _stats(feats)
    fd = frechet_distance(mu, cov, stats["heldout_mean"], stats["heldout_cov"])
    return {"fd": fd, "confidence": float(probs.max(1).mean()), "floor": floor, "n": n}


# ---------------------------------------------------------------------------------------------
# Building the shipped assets
# ---------------------------------------------------------------------------------------------


def build_assets(epochs: int = 40, seed: int = 0) -> dict[str, Any]:
    """Train the classifier on the train split, compute held-out stats and the floor table, write them."""
    from pathlib import Path

    from safetensors.torch import save_file

    from ..data import digits_labels, load_digits

    torch.manual_seed(seed)
    xtr, ytr = load_digits("train"), digits_labels("train")
    xho, yho = load_digits("heldout"), digits_labels("heldout")
    net = DigitsClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(xtr.shape[0], generator=g)
        for idx in perm.split(64):
            xb = xtr[idx]
            # light augmentation: one-pixel shifts and a little noise, so the features are smooth
            shift = tuple(int(s) for s in torch.randint(-1, 2, (2,), generator=g))
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            xb = (xb + 0.05 * torch.randn(xb.shape, generator=g)).clamp(-1, 1)
            loss = nn.functional.cross_entropy(net(xb), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc_tr = float((net(xtr).argmax(1) == ytr).float().mean())
        acc_ho = float((net(xho).argmax(1) == yho).float().mean())
        fho = net.features(xho).double().numpy()
        ftr = net.features(xtr).double().numpy()
        conf_ho = float(torch.softmax(net(xho), 1).max(1).values.mean())
    mu_h, cov_h = _stats(fho)
    rng = np.random.default_rng(seed)
    floor = {}
    for n in (16, 32, 64, 100, 200, 500, 1000, 1497):
        vals = []
        for _ in range(1 if n == xtr.shape[0] else 5):
            idx = rng.choice(xtr.shape[0], size=n, replace=False)
            vals.append(frechet_distance(*_stats(ftr[idx]), mu_h, cov_h))
        floor[str(n)] = float(np.mean(vals))
    tensors = {f"net.{k}": v.contiguous() for k, v in net.state_dict().items()}
    tensors["heldout_mean"] = torch.from_numpy(mu_h).float()
    tensors["heldout_cov"] = torch.from_numpy(cov_h).float()
    root = Path(__file__).resolve().parent.parent
    save_file(tensors, str(root / (_ASSET + ".safetensors")))
    meta = {
        "architecture": "conv32-conv64-pool-fc64-fc10",
        "feature_dim": 64,
        "epochs": epochs,
        "seed": seed,
        "train_accuracy": acc_tr,
        "heldout_accuracy": acc_ho,
        "heldout_confidence": conf_ho,
        "floor": floor,
        "floor_definition": "FD of n random train-split images vs the held-out statistics (mean of 5 subsets)",
    }
    (root / (_ASSET + ".json")).write_text(json.dumps(meta, indent=2) + "\n")
    load_classifier.cache_clear()
    return meta


if __name__ == "__main__":
    import sys

    if "--build" in sys.argv:
        torch.set_num_threads(1)
        print(json.dumps(build_assets(), indent=2))

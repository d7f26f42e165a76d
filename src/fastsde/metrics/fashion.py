"""Fashion-MNIST quality: a Fréchet distance in the features of a Fashion-MNIST classifier that the
project trains and ships (an FID for 28 × 28 clothing, since Inception weights cannot be had here).

- The classifier is a small CNN trained on the 60 000 training images only; its 128-d penultimate
  layer is the feature space. Its held-out accuracy is in the shipped record.
- FD = ‖μ_s − μ_h‖² + tr(Σ_s + Σ_h − 2(Σ_h^{½} Σ_s Σ_h^{½})^{½}) between the Gaussian fits of the
  samples' features and of the 10 000 held-out (test) images' features; the held-out mean and
  covariance ship with the classifier, so samples are judged without the dataset installed.
- The floor is the same FD for real data: n random training images (without replacement) against the
  held-out statistics, shipped as a table over n of the mean and the standard deviation over subsets;
  ``floor_for(n)`` / ``floor_sd_for(n)`` interpolate it in 1/n. The sd is the seed-to-seed noise to
  expect of a sampler's FD at that n.
- Confidence = mean over samples of the classifier's largest softmax probability.

Samples are in model space [−1, 1] (pixel v ↦ v/127.5 − 1) and are clipped to that range first.
Rebuild everything (needs the dataset: Debian package dataset-fashion-mnist; changes every FD measured
so far): ``python -m fastsde.metrics.fashion --build``.
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

from ..files import check_tensor
from .classifier import check_samples, features_and_probs, interp_in_inverse_n, load_network, read_assets
from .frechet import frechet_distance, gaussian_fit, sqrt_psd

__all__ = [
    "FashionClassifier",
    "FEATURE_DIM",
    "fashion_features",
    "fashion_quality",
    "fashion_class_quality",
    "floor_for",
    "floor_sd_for",
    "load_classifier",
    "read_classifier",
]

_ASSET = "_assets/data/fashion_classifier"
SHAPE = (1, 28, 28)
FEATURE_DIM = 128
FLOOR_SIZES: tuple[int, ...] = (64, 128, 256, 500, 1000, 2000, 4000, 10000)
FLOOR_SUBSETS = 100
#: The held-out feature statistics in the classifier's file and their shapes.
STAT_SHAPES = {"heldout_mean": (FEATURE_DIM,), "heldout_cov": (FEATURE_DIM, FEATURE_DIM)}


class FashionClassifier(nn.Module):
    """conv32 → conv32 → pool → conv64 → conv64 → pool → fc 128 (features) → fc 10."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, FEATURE_DIM),
            nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@lru_cache(maxsize=1)
def load_classifier() -> tuple[FashionClassifier, dict[str, Any], dict[str, np.ndarray]]:
    """The shipped classifier (eval mode), its JSON record and the held-out feature statistics."""
    root = resources.files("fastsde")
    weights, record = root.joinpath(_ASSET + ".safetensors"), root.joinpath(_ASSET + ".json")
    return read_classifier(weights.read_bytes(), record.read_bytes(), str(weights), str(record))


def read_classifier(
    weights: bytes, record: bytes, weights_name: str, record_name: str
) -> tuple[FashionClassifier, dict[str, Any], dict[str, np.ndarray]]:
    """The classifier, record and statistics of the asset's bytes, every field checked (a
    FileFormatError naming the file and the field)."""
    tensors, f = read_assets(weights, record, weights_name, record_name)
    f.number("heldout_accuracy", low=0.0, high=1.0)
    stats = {k: check_tensor(weights_name, tensors, k, shape).double().numpy() for k, shape in STAT_SHAPES.items()}
    net = load_network(FashionClassifier(), tensors, weights_name)
    return net, f.data, stats


def _prepare(samples: Tensor) -> Tensor:
    return check_samples(samples, SHAPE, "Fashion-MNIST")


def fashion_features(samples: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features (n, 128), softmax probabilities (n, 10)) of samples in [−1, 1]."""
    net, _, _ = load_classifier()
    return features_and_probs(net, _prepare(samples), 500)


def _interp_floor(key: str, n: int) -> float:
    return interp_in_inverse_n(load_classifier()[1][key], n)


def floor_for(n: int) -> float:
    """The real-data FD floor at sample size n (mean over training subsets of size n), interpolated
    linearly in 1/n from the shipped table (clamped outside its sizes)."""
    return _interp_floor("floor", n)


def floor_sd_for(n: int) -> float:
    """The standard deviation over training subsets of the real-data FD at size n: the noise of one FD."""
    return _interp_floor("floor_sd", n)


def fashion_quality(samples: Tensor) -> dict[str, Any]:
    """{"fd", "confidence", "floor", "floor_sd", "n", "against"} for samples (n, 1, 28, 28) in [−1, 1];
    lower fd is better; floor / floor_sd: mean / sd of the real-data FD at the same n. Non-finite
    samples make fd = inf (they are not dropped silently)."""
    x = _prepare(samples)
    n = x.shape[0]
    out = {"floor": floor_for(n), "floor_sd": floor_sd_for(n), "n": n, "against": _AGAINST}
    if not bool(torch.isfinite(x).all()):
        return {"fd": math.inf, "confidence": math.nan, **out}
    feats, probs = fashion_features(x)
    _, _, stats = load_classifier()
    fd = frechet_distance(*gaussian_fit(feats), stats["heldout_mean"], stats["heldout_cov"])
    return {"fd": fd, "confidence": float(probs.max(1).mean()), **out}


_AGAINST = "against the 10000 held-out Fashion-MNIST images"


def fashion_class_quality(samples: Tensor, labels: Tensor) -> dict[str, Any]:
    """fashion_quality plus ``accuracy``: the share of class-conditional samples that the classifier
    assigns to the label they were drawn for (non-finite samples count as wrong)."""
    x = _prepare(samples)
    labels = torch.as_tensor(labels).reshape(-1).to("cpu", torch.long)
    if labels.shape[0] != x.shape[0] or bool((labels < 0).any()) or bool((labels > 9).any()):
        raise ValueError(
            f"labels must hold one class in 0..9 per sample ({x.shape[0]}), got shape {tuple(labels.shape)}"
        )
    base = fashion_quality(x)
    finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
    _, probs = fashion_features(torch.where(finite[:, None, None, None], x, torch.zeros_like(x)))
    correct = (probs.argmax(1) == labels.numpy()) & finite.numpy()
    return {**base, "accuracy": float(correct.mean())}


# ---------------------------------------------------------------------------------------------
# Building the shipped assets (needs the dataset)
# ---------------------------------------------------------------------------------------------


def _train(epochs: int, seed: int) -> FashionClassifier:
    from ..data import fashion_labels, load_fashion_mnist

    torch.manual_seed(seed)
    x, y = load_fashion_mnist("train"), fashion_labels("train")
    net = FashionClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * math.ceil(x.shape[0] / 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        net.train()
        for idx in torch.randperm(x.shape[0], generator=g).split(128):
            xb = x[idx]
            # light augmentation (one-pixel shifts, mirror images, a little noise) so that the features
            # vary smoothly around real images, where a sampler's near-misses land
            shift = tuple(int(s) for s in torch.randint(-1, 2, (2,), generator=g))
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            if bool(torch.rand((), generator=g) < 0.5):
                xb = xb.flip(3)
            xb = (xb + 0.05 * torch.randn(xb.shape, generator=g)).clamp(-1, 1)
            loss = nn.functional.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{epochs} loss {float(loss.detach()):.4f}", flush=True)
    return net.eval().requires_grad_(False)


def compute_floor(
    feats_train: np.ndarray, mu_h: np.ndarray, cov_h: np.ndarray, subsets: int = FLOOR_SUBSETS, seed: int = 0
) -> dict[int, dict[str, float]]:
    """{n: {"mean", "sd", "subsets"}}: the FD of random training subsets of each size against the
    held-out statistics (subsets of size n from ``numpy.random.default_rng([seed, n])``)."""
    root_h = sqrt_psd(cov_h)
    total = feats_train.shape[0]
    out: dict[int, dict[str, float]] = {}
    for n in FLOOR_SIZES:
        rng = np.random.default_rng([seed, n])
        vals = np.array(
            [
                frechet_distance(*gaussian_fit(feats_train[rng.choice(total, n, replace=False)]), mu_h, cov_h, root_h)
                for _ in range(subsets)
            ]
        )
        out[n] = {"mean": float(vals.mean()), "sd": float(vals.std(ddof=1)), "subsets": subsets}
    return out


def build_assets(epochs: int = 8, seed: int = 0) -> dict[str, Any]:
    """Train the classifier, compute the held-out statistics and the floor table, write the assets."""
    from pathlib import Path

    from safetensors.torch import save_file

    from ..data import fashion_labels, load_fashion_mnist

    net = _train(epochs, seed)
    with torch.no_grad():
        accuracy = {}
        feats = {}
        for split in ("train", "heldout"):
            x, y = load_fashion_mnist(split), fashion_labels(split)
            f = torch.cat([net.features(b) for b in x.split(500)])
            accuracy[split] = float((net.head(f).argmax(1) == y).float().mean())
            feats[split] = (f, torch.softmax(net.head(f), 1).max(1).values.mean())
    mu_h, cov_h = gaussian_fit(feats["heldout"][0].double().numpy())
    tensors = {f"net.{k}": v.contiguous() for k, v in net.state_dict().items()}
    tensors["heldout_mean"] = torch.from_numpy(mu_h)
    tensors["heldout_cov"] = torch.from_numpy(cov_h)
    root = Path(__file__).resolve().parent.parent
    save_file(tensors, str(root / (_ASSET + ".safetensors")))
    floor = compute_floor(feats["train"][0].double().numpy(), mu_h, cov_h, seed=seed)
    meta = {
        "architecture": "conv32-conv32-pool-conv64-conv64-pool-fc128-fc10",
        "feature_dim": FEATURE_DIM,
        "epochs": epochs,
        "seed": seed,
        "train_accuracy": accuracy["train"],
        "heldout_accuracy": accuracy["heldout"],
        "heldout_confidence": float(feats["heldout"][1]),
        "floor": {str(n): r["mean"] for n, r in floor.items()},
        "floor_sd": {str(n): r["sd"] for n, r in floor.items()},
        "floor_subsets": FLOOR_SUBSETS,
        "floor_definition": (
            f"FD of n random training images (without replacement) vs the held-out statistics: mean ('floor') "
            f"and sd ('floor_sd') over {FLOOR_SUBSETS} subsets per n; fastsde.metrics.fashion.compute_floor"
        ),
        "command": f"python -m fastsde.metrics.fashion --build --epochs {epochs} --seed {seed}",
    }
    (root / (_ASSET + ".json")).write_text(json.dumps(meta, indent=2) + "\n")
    load_classifier.cache_clear()
    return meta


def main(argv: list[str] | None = None) -> int:
    """``--build``: train the classifier and write the shipped assets (needs the dataset)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fastsde.metrics.fashion", description=main.__doc__)
    p.add_argument("--build", action="store_true", required=True, help="retrain the classifier and rebuild the assets")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(build_assets(args.epochs, args.seed), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

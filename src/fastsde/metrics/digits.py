"""Digits quality: a Fréchet distance in the features of a shipped digits classifier (the digits
analogue of FID) plus the classifier's mean confidence.

- The classifier is a small CNN trained on the train split only; its 64-d penultimate layer is the
  feature space.
- FD = ‖μ_s − μ_h‖² + tr(Σ_s + Σ_h − 2(Σ_h^{½} Σ_s Σ_h^{½})^{½}) between the Gaussian fits of the samples'
  features and the held-out split's (300 images); the held-out mean/covariance are precomputed and shipped.
- The floor is the same FD for real data: random subsets of the train split, of the same size as the
  samples (FD is biased upwards at small n). It is shipped as a table over n of the mean and the
  standard deviation over many subsets (``compute_floor``; 1000 per n); ``floor_for(n)`` and
  ``floor_sd_for(n)`` interpolate it in 1/n. The sd is the spread of one FD at that n, i.e. the
  seed-to-seed noise to expect of a sampler's FD as well. Subsets are drawn without replacement from
  the 1497 train digits, so as n nears 1497 they overlap and the sd shrinks to 0 (it understates the
  spread of fresh draws, roughly by √(1 − n/1497): ~11 % at n = 300).
- Confidence = mean over samples of the classifier's max softmax probability (held-out data: see the
  shipped ``heldout_confidence``).

Samples are in model space [−1, 1] (pixel v ↦ v/8 − 1) and are clipped to that range first.
Recompute only the floor table (classifier and held-out stats untouched; deterministic, ~5 s with
numpy's BLAS on one thread): ``OPENBLAS_NUM_THREADS=1 python -m fastsde.metrics.digits --floor --write``. Retrain everything (changes the classifier, so
every shipped FD moves): ``python -m fastsde.metrics.digits --build``.
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

from ..data import digits_labels, load_digits
from ..files import check_tensor
from .classifier import check_samples, features_and_probs, interp_in_inverse_n, load_network, read_assets
from .frechet import frechet_distance
from .frechet import gaussian_fit as _stats
from .frechet import sqrt_psd as _sqrt_psd

__all__ = [
    "DigitsClassifier",
    "FLOOR_SIZES",
    "compute_floor",
    "digits_features",
    "digits_quality",
    "class_conditional_quality",
    "class_floor",
    "floor_for",
    "floor_sd_for",
    "frechet_distance",
    "load_classifier",
    "write_floor",
]

_ASSET = "_assets/data/digits_classifier"
FLOOR_SIZES: tuple[int, ...] = (16, 32, 64, 100, 128, 200, 256, 300, 400, 500, 750, 1000, 1497)
FLOOR_SUBSETS = 1000


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


@lru_cache(maxsize=1)
def load_classifier() -> tuple[DigitsClassifier, dict[str, Any], dict[str, np.ndarray]]:
    """The shipped classifier (eval mode), its JSON record and the held-out feature statistics."""
    root = resources.files("fastsde")
    weights, record = root.joinpath(_ASSET + ".safetensors"), root.joinpath(_ASSET + ".json")
    return read_classifier(weights.read_bytes(), record.read_bytes(), str(weights), str(record))


def read_classifier(
    weights: bytes, record: bytes, weights_name: str, record_name: str
) -> tuple[DigitsClassifier, dict[str, Any], dict[str, np.ndarray]]:
    """The classifier, record and statistics of the asset's bytes, checked (a FileFormatError naming
    the file and field): the network's weights, finite held-out mean (64,) and covariance (64, 64),
    and the floor tables (sample size -> positive finite FD) the metric interpolates."""
    tensors, f = read_assets(weights, record, weights_name, record_name)
    stats = {k: check_tensor(weights_name, tensors, k, shape).numpy() for k, shape in STAT_SHAPES.items()}
    net = load_network(DigitsClassifier(), tensors, weights_name)
    return net, f.data, stats


#: The held-out feature statistics in the classifier's file and their shapes.
STAT_SHAPES = {"heldout_mean": (64,), "heldout_cov": (64, 64)}


def _prepare(samples: Tensor) -> Tensor:
    return check_samples(samples, (1, 8, 8), "digits")


def digits_features(samples: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features (n, 64), softmax probabilities (n, 10)) of samples in [−1, 1]."""
    net, _, _ = load_classifier()
    return features_and_probs(net, _prepare(samples), 1024)


def _interp_floor(key: str, n: int) -> float:
    return interp_in_inverse_n(load_classifier()[1][key], n)


def floor_for(n: int) -> float:
    """The real-data FD floor at sample size n: the mean over train subsets of size n, interpolated
    linearly in 1/n from the shipped table (clamped outside 16..1497)."""
    return _interp_floor("floor", n)


def floor_sd_for(n: int) -> float:
    """Standard deviation over train subsets of the real-data FD at size n (interpolated like
    ``floor_for``): the noise of a single FD measured on n samples."""
    return _interp_floor("floor_sd", n)


def compute_floor(
    sizes: tuple[int, ...] = FLOOR_SIZES, subsets: int = FLOOR_SUBSETS, seed: int = 0
) -> dict[int, dict[str, float]]:
    """FD of random train subsets of each size n against the shipped held-out statistics.

    Returns {n: {"mean", "sd", "subsets"}} (sd with ddof = 1). Uses the shipped classifier and the
    shipped (float32) held-out stats, exactly as ``digits_quality`` does. Slow on a busy machine
    unless numpy's BLAS runs on one thread (``OPENBLAS_NUM_THREADS=1``). Deterministic: the subsets of
    size n come from ``numpy.random.default_rng([seed, n])``, whatever the other sizes. A size equal to
    the whole train split has a single subset (sd 0).
    """
    if subsets < 2:
        raise ValueError(f"subsets must be >= 2 to give an sd, got {subsets}")
    feats, _ = digits_features(load_digits("train"))
    _, _, stats = load_classifier()
    mu_h, cov_h = stats["heldout_mean"], stats["heldout_cov"]
    root_h = _sqrt_psd(cov_h)
    total = feats.shape[0]
    out: dict[int, dict[str, float]] = {}
    for n in sizes:
        if not 2 <= n <= total:
            raise ValueError(f"floor sizes must lie in [2, {total}], got {n}")
        rng = np.random.default_rng([seed, n])
        reps = 1 if n == total else subsets
        subs = (feats[rng.choice(total, size=n, replace=False)] for _ in range(reps))
        vals = np.array([frechet_distance(*_stats(f), mu_h, cov_h, root_h) for f in subs])
        out[n] = {"mean": float(vals.mean()), "sd": float(vals.std(ddof=1)) if reps > 1 else 0.0, "subsets": reps}
    return out


def write_floor(table: dict[int, dict[str, float]], subsets: int, seed: int) -> None:
    """Store a ``compute_floor`` table in the shipped JSON (other keys unchanged)."""
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / (_ASSET + ".json")
    meta = json.loads(path.read_text())
    meta["floor"] = {str(n): r["mean"] for n, r in sorted(table.items())}
    meta["floor_sd"] = {str(n): r["sd"] for n, r in sorted(table.items())}
    meta["floor_subsets"] = subsets
    meta["floor_seed"] = seed
    meta["floor_definition"] = (
        f"FD of n random train-split images (without replacement) vs the held-out statistics: mean "
        f"('floor') and sd ('floor_sd') over {subsets} subsets per n (1 at n = the whole split); "
        f"fastsde.metrics.digits.compute_floor(subsets={subsets}, seed={seed})"
    )
    path.write_text(json.dumps(meta, indent=2) + "\n")
    load_classifier.cache_clear()


def digits_quality(samples: Tensor, classes: Any = None) -> dict[str, Any]:
    """{"fd", "confidence", "floor", "floor_sd", "n"} for samples (n, 1, 8, 8) in [−1, 1]; lower fd is
    better. floor / floor_sd: mean / sd of the real-data FD at the same n.

    ``classes``: measure against the held-out digits of these labels only (samples drawn for label 3
    compared with all digits would be far from them whatever their quality). The floor is then the FD
    of n random train digits of those labels against that reference (``class_floor``), and the result
    adds ``classes`` and ``reference`` (the number of held-out images). None or all ten labels: the
    shipped all-digits reference and floor table, as before.

    Non-finite samples make fd = inf (they are not dropped silently).
    """
    x = _prepare(samples)
    n = x.shape[0]
    chosen = _check_classes(classes)
    extra: dict[str, Any] = {}
    if chosen is None:
        floor, floor_sd = floor_for(n), floor_sd_for(n)
        _, _, stats = load_classifier()
        ref_mu, ref_cov = stats["heldout_mean"], stats["heldout_cov"]
    else:
        floor, floor_sd = class_floor(chosen, n)
        ref_mu, ref_cov, _, count = _heldout_subset_stats(chosen)
        extra = {"classes": list(chosen), "reference": count}
    if not bool(torch.isfinite(x).all()):
        return {"fd": math.inf, "confidence": math.nan, "floor": floor, "floor_sd": floor_sd, "n": n, **extra}
    feats, probs = digits_features(x)
    mu, cov = _stats(feats)
    fd = frechet_distance(mu, cov, ref_mu, ref_cov)
    return {"fd": fd, "confidence": float(probs.max(1).mean()), "floor": floor, "floor_sd": floor_sd, "n": n, **extra}


#: random train subsets behind a per-label floor (computed on demand, unlike the shipped table)
CLASS_FLOOR_SUBSETS = 200


def _check_classes(classes: Any) -> tuple[int, ...] | None:
    """Sorted distinct labels in 0..9, or None for "all digits" (None, or all ten labels)."""
    if classes is None:
        return None
    values = sorted({int(c) for c in torch.as_tensor(classes).reshape(-1).tolist()})
    if not values or values[0] < 0 or values[-1] > 9:
        raise ValueError(f"classes must be labels in 0..9, got {classes!r}")
    return None if len(values) == 10 else tuple(values)


@lru_cache(maxsize=16)
def _heldout_subset_stats(classes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(feature mean, covariance, covariance^½, image count) of the held-out digits of ``classes``."""
    feats, _ = digits_features(load_digits("heldout"))
    rows = np.isin(digits_labels("heldout").numpy(), classes)
    mu, cov = _stats(feats[rows])
    return mu, cov, _sqrt_psd(cov), int(rows.sum())


@lru_cache(maxsize=64)
def class_floor(
    classes: tuple[int, ...], n: int, subsets: int = CLASS_FLOOR_SUBSETS, seed: int = 0
) -> tuple[float, float]:
    """(mean, sd) over random subsets of n train digits of ``classes`` (without replacement; at most
    all of them) of their FD against the held-out digits of ``classes``: the real-data floor of a
    per-label FD. Deterministic (``numpy.random.default_rng([seed, n, *classes])``)."""
    if n < 2:
        raise ValueError(f"the floor needs n >= 2 samples, got {n}")
    feats, _ = digits_features(load_digits("train"))
    pool = feats[np.isin(digits_labels("train").numpy(), classes)]
    size = min(n, pool.shape[0])
    mu_h, cov_h, root_h, _ = _heldout_subset_stats(classes)
    rng = np.random.default_rng([seed, n, *classes])
    reps = 1 if size == pool.shape[0] else subsets
    vals = np.array(
        [
            frechet_distance(*_stats(pool[rng.choice(pool.shape[0], size=size, replace=False)]), mu_h, cov_h, root_h)
            for _ in range(reps)
        ]
    )
    return float(vals.mean()), float(vals.std(ddof=1)) if reps > 1 else 0.0


@lru_cache(maxsize=1)
def _heldout_class_stats() -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per class of the held-out split: (feature mean, covariance, covariance^½) (21–35 images each)."""
    feats, _ = digits_features(load_digits("heldout"))
    labels = digits_labels("heldout").numpy()
    out = {}
    for y in range(10):
        mu, cov = _stats(feats[labels == y])
        out[y] = (mu, cov, _sqrt_psd(cov))
    return out


def class_conditional_quality(samples: Tensor, labels: Tensor, *, against_labels: bool = False) -> dict[str, Any]:
    """Quality of class-conditional samples (n, 1, 8, 8) drawn for ``labels`` (n,) in 0..9:

    - ``accuracy``: the share of samples the shipped classifier assigns to their requested label;
    - ``class_fd``: the mean over the requested classes of the FD between that class's samples and the
      held-out images of that class (21–35 per class, so the FD carries a floor of its own: compare
      samplers at the same n per class; ``class_fd_per_class`` lists each class);
    - ``fd``, ``floor``, ...: the unconditional digits_quality of all samples (for a balanced label mix),
      or with ``against_labels`` the digits_quality against the held-out digits of the requested labels
      only (``classes`` and ``reference`` added when they are not all ten).
    Non-finite samples give accuracy 0 for them and an infinite FD."""
    x = _prepare(samples)
    labels = torch.as_tensor(labels).reshape(-1).to("cpu", torch.long)
    if labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels must hold one label per sample ({x.shape[0]}), got {labels.shape[0]}")
    if bool((labels < 0).any()) or bool((labels > 9).any()):
        raise ValueError("labels must lie in 0..9 (digits classes)")
    base = digits_quality(x, classes=labels.unique() if against_labels else None)
    finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
    feats, probs = digits_features(torch.where(finite[:, None, None, None], x, torch.zeros_like(x)))
    y = labels.numpy()
    correct = (probs.argmax(1) == y) & finite.numpy()
    stats = _heldout_class_stats()
    per_class = {}
    for c in sorted(set(y.tolist())):
        rows = y == c
        if rows.sum() < 2:
            continue
        if not bool(finite.numpy()[rows].all()):
            per_class[c] = math.inf
            continue
        mu, cov = _stats(feats[rows])
        hmu, hcov, hroot = stats[c]
        per_class[c] = frechet_distance(mu, cov, hmu, hcov, root2=hroot)
    class_fd = float(np.mean(list(per_class.values()))) if per_class else math.nan
    return {
        **base,
        "accuracy": float(correct.mean()),
        "class_fd": class_fd,
        "class_fd_per_class": {str(k): v for k, v in per_class.items()},
    }


# ---------------------------------------------------------------------------------------------
# Building the shipped assets
# ---------------------------------------------------------------------------------------------


def build_assets(epochs: int = 40, seed: int = 0) -> dict[str, Any]:
    """Train the classifier on the train split, compute held-out stats and the floor table, write them.

    This replaces the shipped classifier (every FD measured so far changes); to refresh only the floor
    table use ``compute_floor`` / ``--floor``."""
    from pathlib import Path

    from safetensors.torch import save_file

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
        conf_ho = float(torch.softmax(net(xho), 1).max(1).values.mean())
    mu_h, cov_h = _stats(fho)
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
    }
    (root / (_ASSET + ".json")).write_text(json.dumps(meta, indent=2) + "\n")
    load_classifier.cache_clear()
    write_floor(compute_floor(seed=seed), FLOOR_SUBSETS, seed)  # against the new classifier's shipped stats
    return load_classifier()[1]


def main(argv: list[str] | None = None) -> int:
    """``--floor``: print (and with ``--write`` store) the floor table; ``--build``: retrain everything."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fastsde.metrics.digits", description=main.__doc__)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--floor", action="store_true", help="recompute the real-data floor table only")
    mode.add_argument("--build", action="store_true", help="retrain the classifier and rebuild all assets")
    p.add_argument("--subsets", type=int, default=FLOOR_SUBSETS, help="random train subsets per n (--floor)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true", help="store the --floor table in the shipped JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.build:
        print(json.dumps(build_assets(seed=args.seed), indent=2))
        return 0
    table = compute_floor(subsets=args.subsets, seed=args.seed)
    print("| n | floor (mean FD) | sd | subsets |")
    print("|---|---|---|---|")
    for n, r in table.items():
        print(f"| {n} | {r['mean']:.2f} | {r['sd']:.2f} | {r['subsets']} |")
    if args.write:
        write_floor(table, args.subsets, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The Fréchet distance between Gaussian fits of feature sets: the arithmetic behind FID-like metrics."""

from __future__ import annotations

import numpy as np

__all__ = ["frechet_distance", "gaussian_fit", "sqrt_psd"]


def sqrt_psd(a: np.ndarray) -> np.ndarray:
    """The symmetric square root of a positive semi-definite matrix (negative eigenvalues from rounding clipped)."""
    vals, vecs = np.linalg.eigh(0.5 * (a + a.T))
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(
    mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray, root2: np.ndarray | None = None
) -> float:
    """Fréchet (2-Wasserstein²) distance between two Gaussians; the matrix root is taken on the
    symmetric form cov2^½ cov1 cov2^½, so singular sample covariances (n < feature dimension) are fine.
    ``root2``: cov2^½ if already known (saves one eigendecomposition when cov2 is fixed)."""
    diff = mu1 - mu2
    if root2 is None:
        root2 = sqrt_psd(cov2)
    inner = root2 @ cov1 @ root2
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (inner + inner.T)), 0.0, None)).sum())
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_covmean)


def gaussian_fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of feature rows (n, d)."""
    return features.mean(0), np.cov(features, rowvar=False)

"""What the classifier-feature metrics (``digits``, ``fashion``) share: reading a shipped classifier's
two files, checking the samples, the features in batches, and the real-data floor table over n."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..files import Fields, FileFormatError, check_tensor

__all__ = ["read_assets", "load_network", "check_samples", "features_and_probs", "interp_in_inverse_n"]


def read_assets(weights: bytes, record: bytes, weights_name: str, record_name: str) -> tuple[dict, Fields]:
    """(tensors, record as Fields) of a classifier's safetensors and JSON bytes, the floor tables checked:
    ``floor`` and ``floor_sd`` map sample sizes (integers >= 2) to non-negative FDs. A FileFormatError
    naming the file and the field."""
    from safetensors.torch import load

    try:
        tensors = load(weights)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types on junk
        raise FileFormatError(weights_name, None, str(exc)[:200], what="a safetensors file") from None
    try:
        meta = json.loads(record.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FileFormatError(record_name, None, f"not JSON ({exc})", what="the classifier's record") from None
    f = Fields(record_name, meta)
    for key in ("floor", "floor_sd"):
        table = f.obj(key)
        if not table.data or not all(k.isdigit() and int(k) >= 2 for k in table.data):
            raise f.error(key, "a non-empty table: sample size (an integer >= 2) -> FD", table.data)
        for k in table.data:
            table.number(k, low=0.0)
    return tensors, f


def load_network(net: nn.Module, tensors: dict[str, Tensor], weights_name: str) -> nn.Module:
    """``net`` with its weights from the tensors ``net.<name>`` (each checked for its shape), in eval mode."""
    own = net.state_dict()
    for k, v in own.items():
        check_tensor(weights_name, tensors, "net." + k, tuple(v.shape))
    net.load_state_dict({k: tensors["net." + k].float() for k in own})
    return net.eval().requires_grad_(False)


def check_samples(samples: Any, shape: tuple[int, ...], what: str) -> Tensor:
    """Samples (n, *shape), or (n, H, W) for one channel, as a float CPU tensor; at least 2 of them."""
    if not isinstance(samples, Tensor):
        samples = torch.as_tensor(np.asarray(samples))
    if samples.dim() == 3:
        samples = samples.unsqueeze(1)
    if tuple(samples.shape[1:]) != shape:
        raise ValueError(
            f"{what} samples must have shape (n, {', '.join(map(str, shape))}) or (n, {shape[1]}, {shape[2]}), "
            f"got {tuple(samples.shape)}"
        )
    if samples.shape[0] < 2:
        raise ValueError(f"need at least 2 samples for a Fréchet distance, got {samples.shape[0]}")
    return samples.detach().float().cpu()


def features_and_probs(net: nn.Module, x: Tensor, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features, softmax probabilities) of ``net`` (``features`` then ``head``) on x clipped
    to [−1, 1], ``batch`` rows at a time, as float64 arrays."""
    with torch.no_grad():
        feats = torch.cat([net.features(b) for b in x.clamp(-1.0, 1.0).split(batch)])
        probs = torch.softmax(net.head(feats), dim=1)
    return feats.double().numpy(), probs.double().numpy()


def interp_in_inverse_n(table: dict[str, float], n: int) -> float:
    """A floor table {size: value} at sample size n, linear in 1/n (clamped outside its sizes)."""
    if n < 2:
        raise ValueError(f"the floor needs n >= 2 samples, got {n}")
    rows = sorted((int(k), float(v)) for k, v in table.items())
    inv = np.array([1.0 / k for k, _ in rows])[::-1]  # increasing in 1/n
    vals = np.array([v for _, v in rows])[::-1]
    return float(np.interp(1.0 / n, inv, vals))

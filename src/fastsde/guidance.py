"""Guidance as score wrappers: classifier-free guidance and classifier guidance.

Both are plain score functions ``score(x, t, **cond)``, so every solver runs them unchanged and the one
counting wrapper sees them as one evaluation per row:

- :class:`CFGScore` (classifier-free guidance, Ho & Salimans 2022): s = s_u + w·(s_c − s_u), where s_c
  is the score with the sample's conditioning and s_u the score with the null conditioning. w = 1 is the
  conditional model, w = 0 the unconditional one, w > 1 sharpens towards the condition. Both halves are
  one batched call of the wrapped score (2n rows), so NFE counts 1 per sample per evaluation and
  ``network_evals = 2`` makes ``res.network_evals`` report the 2 network evaluations.
- :class:`ClassifierGuidance` (Dhariwal & Nichol 2021): s = s(x, t) + scale·∇ₓ log p(y | x, t) with a
  user classifier; the gradient is taken with autograd enabled inside the wrapper, so it works although
  ``fastsde.sample`` runs under ``torch.no_grad``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .score import data_prediction_of, scores_of
from .sde import SDE

__all__ = ["CFGScore", "ClassifierGuidance", "with_null_rows"]


def _own_process(score: Any) -> SDE | None:
    for obj in (score, getattr(score, "__self__", None)):
        sde = getattr(obj, "sde", None)
        if isinstance(sde, SDE):
            return sde
    return None


def _check_scale(scale: Any, name: str = "scale") -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale)):
        raise ValueError(
            f"{name} must be a finite number (w = 1: the conditional model, w = 0: unconditional), got {scale!r}"
        )
    return float(scale)


class CFGScore:
    """Classifier-free guidance: s = s_u + w·(s_c − s_u), evaluated as ONE call of ``score`` on 2n rows.

    Args:
        score: a conditional score ``score(x, t, **cond)``; with the null conditioning it is the
            unconditional model (e.g. a network trained with label dropout).
        scale: the guidance weight w (1: the conditional model; 0: the unconditional one).
        null_cond: the unconditional model's conditioning: a dict whose values are a number, a tensor of
            one row (broadcast to every sample) or one row per sample (per-sample negative prompts); a
            key of cond that it does not name is passed unchanged to both halves. A bare tensor or number
            stands for the keyword ``cond`` (what ``fastsde.sample(cond=tensor)`` passes).
        sde: the process the score belongs to (default: the wrapped score's own, if it has one).

    ``network_evals = 2``: each row is two network evaluations (``res.network_evals``).

    Per-sample null conditioning follows the rows like ``cond`` does: ``fastsde.sample`` adds it to the
    per-sample conditioning under the reserved key ``cfg_null__<key>`` (:func:`with_null_rows`), so a
    solver that evaluates a subset of the samples hands this wrapper the null rows of exactly those
    samples. The same key can be given in ``cond=`` directly (e.g. to ``sample_to_dir``, whose shards
    slice ``cond``); it then takes the place of ``null_cond[key]``.
    """

    network_evals = 2
    #: prefix of the conditioning keys that carry per-sample null rows (``cfg_null__class_labels``)
    ROW_KEY_PREFIX = "cfg_null__"

    def __init__(
        self,
        score: Callable[..., Tensor],
        scale: float,
        null_cond: Mapping[str, Any] | Tensor | float,
        sde: SDE | None = None,
    ) -> None:
        if not callable(score):
            raise ValueError(f"score must be callable as score(x, t, **cond), got {score!r}")
        self.scale = _check_scale(scale)
        if not isinstance(null_cond, Mapping):
            null_cond = {"cond": null_cond}
        if not null_cond:
            raise ValueError("null_cond must name the unconditional conditioning, e.g. {'class_labels': 10}")
        for key, value in null_cond.items():
            if not isinstance(value, (Tensor, numbers.Number)) or isinstance(value, bool):
                raise ValueError(f"null_cond[{key!r}] must be a number or a tensor, got {type(value).__name__}")
        self.score = score
        self.null_cond = dict(null_cond)
        self.sde = sde if sde is not None else _own_process(score)
        self.network_evals = 2 * int(getattr(score, "network_evals", 1))

    def per_sample_keys(self, cond: Mapping[str, Tensor], n: int) -> list[str]:
        """The keys of ``null_cond`` that hold one row per sample of a batch of n with conditioning ``cond``
        (a tensor of cond's rank with n > 1 rows); a ValueError for a tensor of cond's rank whose row count
        is neither 1 nor n."""
        keys = []
        for key, value in self.null_cond.items():
            like = cond.get(key)
            if self.ROW_KEY_PREFIX + key in cond:  # the rows are already there (a shard of sample_to_dir)
                continue
            if not isinstance(value, Tensor) or not isinstance(like, Tensor) or value.dim() != like.dim():
                continue
            if value.dim() > 0 and value.shape[0] == n and n > 1:
                keys.append(key)
            elif value.dim() > 0 and value.shape[0] != 1:
                raise ValueError(
                    f"null_cond[{key!r}] of shape {tuple(value.shape)} must hold one row or one row per sample "
                    f"(n = {n}; cond[{key!r}] has shape {tuple(like.shape)})"
                )
        return keys

    def _null_rows(self, key: str, like: Tensor, rows: Tensor | None) -> Tensor:
        """The null conditioning of ``key`` as rows shaped like the conditional rows ``like``: the
        per-sample rows handed in with the conditioning (``rows``) or null_cond's value broadcast."""
        value = self.null_cond[key] if rows is None else rows
        n = like.shape[0]
        v = torch.as_tensor(value, dtype=like.dtype, device=like.device)
        if v.dim() == like.dim() and v.shape[0] == n:
            return v
        if v.dim() == like.dim() and v.shape[0] == 1:
            return v.expand_as(like)
        if v.dim() == like.dim() - 1:
            return v.unsqueeze(0).expand_as(like)
        raise ValueError(
            f"null_cond[{key!r}] of shape {tuple(v.shape)} does not fit the conditioning rows {tuple(like.shape)}: "
            "per-sample null conditioning reaches the score through the front door (fastsde.sample adds it to "
            f"cond as {self.ROW_KEY_PREFIX}{key}; with sample_to_dir pass cond={{'{self.ROW_KEY_PREFIX}{key}': ...}})"
        )

    def __call__(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        return self._guided(self.score, x, t, cond)

    @property
    def data_prediction(self) -> Callable[..., Tensor] | None:
        """The guided data prediction x̂0_u + w·(x̂0_c − x̂0_u), one call of the wrapped score's data
        prediction on 2n rows; None where the wrapped score has none. The score is affine in x̂0 with
        coefficients that do not depend on the model (s = (m·x̂0 − x)/σ²), so this is the x̂0 of the guided
        score where m > 0, and what a solve from m = 0 (a rectified flow's pure noise) needs."""

        inner = data_prediction_of(self.score)
        if inner is None:
            return None

        def predict(x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
            return self._guided(inner, x, t, cond)

        return predict

    def _guided(self, fn: Callable[..., Tensor], x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """lerp(f_u, f_c, w) of ``fn`` (the score or its data prediction), one call on 2n rows."""
        cond = dict(cond)
        rows = {k[len(self.ROW_KEY_PREFIX) :]: cond.pop(k) for k in list(cond) if k.startswith(self.ROW_KEY_PREFIX)}
        missing = [k for k in self.null_cond if k not in cond]
        if missing:
            raise ValueError(
                f"CFGScore needs the conditioning {missing} (pass cond={{{missing[0]!r}: ...}} to fastsde.sample)"
            )
        unknown = [k for k in rows if k not in self.null_cond]
        if unknown:
            raise ValueError(
                f"cond names null rows for {unknown} ({self.ROW_KEY_PREFIX}{unknown[0]}), which null_cond does not name"
            )
        n = x.shape[0]
        both = {
            k: torch.cat([v, self._null_rows(k, v, rows.get(k))]) if k in self.null_cond else torch.cat([v, v])
            for k, v in cond.items()
        }
        out = fn(torch.cat([x, x]), torch.cat([t, t]), **both)
        s_c, s_u = out[:n], out[n:]
        # lerp is exact at both ends: w = 0 returns s_u and w = 1 returns s_c bit for bit
        return torch.lerp(s_u, s_c, self.scale)

    def __repr__(self) -> str:
        return f"CFGScore(scale={self.scale:g}, null_cond={self.null_cond!r})"


class ClassifierGuidance:
    """Classifier guidance: s = s(x, t) + scale·∇ₓ log p(y | x, t).

    Args:
        score: the (usually unconditional) score ``score(x, t)``.
        classifier: ``classifier(x, t) -> logits (n, K)`` of the noisy-image classifier; log p(y | x, t)
            is the log-softmax of the logits at the sample's label. Differentiable in x.
        scale: the guidance weight (0: the unguided score).
        label_key: the conditioning keyword holding the labels (default ``class_labels``).
        score_cond: also pass the conditioning to ``score`` (a conditional model under classifier
            guidance); default False, so ``score`` is called as score(x, t).
        sde: the process (default: the wrapped score's own, if it has one).

    The gradient is taken under ``torch.enable_grad()`` inside the wrapper (``fastsde.sample`` runs
    under no_grad) and detached; the classifier is not counted as a network evaluation of the score.
    """

    def __init__(
        self,
        score: Callable[..., Tensor],
        classifier: Callable[[Tensor, Tensor], Tensor],
        scale: float,
        label_key: str = "class_labels",
        score_cond: bool = False,
        sde: SDE | None = None,
    ) -> None:
        if not callable(score) or not callable(classifier):
            raise ValueError("score and classifier must be callable (score(x, t), classifier(x, t) -> logits)")
        self.score = score
        self.classifier = classifier
        self.scale = _check_scale(scale)
        self.label_key = label_key
        self.score_cond = bool(score_cond)
        self.sde = sde if sde is not None else _own_process(score)
        self.network_evals = int(getattr(score, "network_evals", 1))

    def log_prob_grad(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """∇ₓ log p(y | x, t), one gradient per row (autograd enabled here)."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logits = self.classifier(xg, t)
            if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
                got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                raise ValueError(f"classifier(x, t) must return logits (n, K) with n = {x.shape[0]}, got {got}")
            logp = torch.log_softmax(logits, dim=1).gather(1, y.to(logits.device, torch.long).reshape(-1, 1))
            (grad,) = torch.autograd.grad(logp.sum(), xg)
        return grad.detach()

    def __call__(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        if self.label_key not in cond:
            raise ValueError(
                f"ClassifierGuidance needs the labels as cond[{self.label_key!r}] (pass cond= to fastsde.sample)"
            )
        y = cond[self.label_key]
        s = self.score(x, t, **cond) if self.score_cond else self.score(x, t)
        if self.scale == 0.0:
            return s
        return s + self.scale * self.log_prob_grad(x, t, y).to(s.dtype)

    #: no data prediction: the guided x̂0 = x̂0 + scale·(σ²/m)·∇ₓ log p(y | x, t) is 0·∞ where m = 0 (a
    #: rectified flow's pure noise), the only place a solver asks for it; the front door says so
    data_prediction = None

    def __repr__(self) -> str:
        return f"ClassifierGuidance(scale={self.scale:g}, label_key={self.label_key!r})"


def with_null_rows(
    score: Any, cond: Tensor | Mapping[str, Tensor] | None, n: int
) -> Tensor | Mapping[str, Tensor] | None:
    """``cond`` with a :class:`CFGScore`'s per-sample null conditioning added as per-sample conditioning
    (key ``cfg_null__<key>``), so the front door hands the score the null rows of exactly the samples it
    evaluates; for a ``fastsde.Levels``, that of each level that is a CFGScore (levels must agree on a key).
    ``cond`` unchanged for any other score, for a null_cond of one row, and where ``cond`` already carries
    the key. A ValueError (before any compute) for null rows that fit neither one row nor n."""
    guided = [f for f in scores_of(score) if isinstance(f, CFGScore)]
    if not guided or cond is None:
        return cond
    as_dict = {"cond": cond} if isinstance(cond, Tensor) else cond
    if not isinstance(as_dict, Mapping):
        return cond  # check_cond names the problem
    extra: dict[str, Tensor] = {}
    for f in guided:
        for key in f.per_sample_keys(as_dict, n):
            name = f.ROW_KEY_PREFIX + key
            if name in as_dict:
                continue
            if name in extra and not torch.equal(extra[name], f.null_cond[key]):
                raise ValueError(f"the levels' CFGScores hold different per-sample null_cond[{key!r}]: give one")
            extra[name] = f.null_cond[key]
    return {**as_dict, **extra} if extra else cond

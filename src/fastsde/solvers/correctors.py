"""Correctors: moves at a fixed noise level that the driver makes after accepted steps.

:class:`Langevin` is Song et al.'s corrector with the snr step-size rule: M steps of
x ← x + ε·s + √(2ε)·z at fixed t, ε = 2α·(snr·‖z‖/‖s‖)², one NFE each. ``pc`` and ``adaptive`` use
this one object; after it moves a sample the driver tells the stepper to forget multistep / FSAL
values of the old position.

Placement: ``at_start`` corrects x_T before the first step; ``at_end`` also corrects samples that
have just reached t_end (``pc`` corrects grid points t_0 … t_{N−2}: at_start, not at_end; the
adaptive solvers correct every accepted point, t_end included). The corrector's noise is
Stream.CORRECTOR with counter key·M + j, where the key is the point's index on the grid
(``key="point"``) or the index of the accepted attempt (``key="attempt"``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..noise import Stream
from ..sde import broadcast_to_rows

__all__ = ["Langevin"]

#: alpha(t, t_next) -> per-row α of the step-size rule (None: α = 1).
AlphaFn = Callable[[Tensor, "Tensor | None"], Tensor]


class Langevin:
    """M Langevin steps with the snr rule; norms per sample or batch means (Song's reference code)."""

    def __init__(
        self,
        steps: int,
        snr: float,
        *,
        per_sample_norm: bool = True,
        alpha: AlphaFn | None = None,
        at_start: bool = False,
        at_end: bool = True,
        key: str = "attempt",
    ) -> None:
        self.steps, self.snr, self.per_sample_norm, self.alpha = steps, snr, per_sample_norm, alpha
        self.at_start, self.at_end, self.key = at_start, at_end, key

    @property
    def nfe(self) -> int:
        """Evaluations per corrected point."""
        return self.steps

    def _norms(self, v: Tensor) -> Tensor:
        norms = v.reshape(v.shape[0], -1).norm(dim=1)
        return norms if self.per_sample_norm else norms.mean().expand_as(norms)

    def __call__(
        self, ctx, x: Tensor, t: Tensor, rows: Tensor | None, key: Tensor, t_next: Tensor | None = None
    ) -> Tensor:
        """Correct x at times t; rows are the sample indices (None: all in order), key per row."""
        alpha = self.alpha(t, t_next) if self.alpha is not None else None
        tiny = torch.finfo(x.dtype).tiny
        for j in range(self.steps):
            s = ctx.score(x, t, rows=rows)
            z = ctx.noise.normal(
                x.shape[1:], Stream.CORRECTOR, key * self.steps + j, rows, dtype=x.dtype, device=x.device
            )
            ratio = self.snr * self._norms(z) / self._norms(s).clamp_min(tiny)
            eps = 2.0 * alpha * ratio**2 if alpha is not None else 2.0 * ratio**2
            eps = broadcast_to_rows(eps, x)
            x = x + eps * s + (2.0 * eps).sqrt() * z
        return x

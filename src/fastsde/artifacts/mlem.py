"""A learned ML-EM schedule (``fastsde.fit_mlem``): p_k(t) for ``solver="mlem"``, keyed to its run, and
its file.

The schedule is p_k(u) = p_min + (1 − p_min)·sigmoid(Σ_d θ_{k,d}·u^d), u ∈ [0, 1] the position in
log-SNR from T (u = 0) to t_end (u = 1): a few numbers per correction, smooth in time. A schedule is
keyed like an IIA table: the run's part (process, base, eta, steps, t_end, grid) is checked when the
solver's options are resolved, the levels' part (costs, sample shape, a fingerprint of every level)
against the run's ``fastsde.Levels``; a run whose key differs is refused, naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..files import Fields, check_tensor
from ..grids import time_grid
from ..score import scores_of
from ..sde import SDE, sde_from_config
from .artifact import (
    FittedArtifact,
    check_key,
    grid_hash,
    model_fingerprint,
    read_grid_hash,
    read_key_common,
    read_model_key,
    relative_difference,
    same_identity,
)

__all__ = ["MLEMSchedule", "load_mlem", "probabilities", "schedule_grid", "unit_time", "powers"]

FORMAT = "fastsde-mlem-schedule-1"
#: relative difference of a probed level's outputs that still counts as the level the schedule was fitted for
PROBE_TOL = 1e-4


# ---------------------------------------------------------------------------------------------
# The schedule's maths
# ---------------------------------------------------------------------------------------------


def unit_time(sde: SDE, t: Tensor, t_end: float) -> Tensor:
    """u(t) ∈ [0, 1]: the position of t in log-SNR from T (0) to t_end (1)."""
    ends = torch.tensor([sde.T, t_end], dtype=torch.float64)
    lo, hi = sde.log_snr(ends).tolist()
    return ((sde.log_snr(t.to(torch.float64)) - lo) / (hi - lo)).clamp(0.0, 1.0)


def powers(u: Tensor, degree: int) -> Tensor:
    """The basis (..., degree + 1): u^0 … u^degree."""
    return torch.stack([u**d for d in range(degree + 1)], dim=-1)


def probabilities(theta: Tensor, basis: Tensor, p_min: float) -> Tensor:
    """p = p_min + (1 − p_min)·sigmoid(basis·θᵀ): (m, K−1) from θ (K−1, D) and basis (m, D)."""
    return p_min + (1.0 - p_min) * torch.sigmoid(basis @ theta.T)


def schedule_grid(sde: SDE, options: Mapping[str, Any], t_end: float) -> Tensor:
    """The time grid of an mlem run with these resolved options, from T to t_end."""
    return time_grid(sde, options["grid"], int(options["steps"]), sde.T, t_end, options["rho"])


# ---------------------------------------------------------------------------------------------
# The schedule
# ---------------------------------------------------------------------------------------------


@dataclass
class MLEMSchedule(FittedArtifact):
    """A learned p_k(t) for ``solver="mlem"`` (pass it as ``p=``); callable as p(t) -> (K−1,).

    ``theta``: (K−1, degree+1) float64, the logit polynomial of each correction in u.
    ``key``: the run it was fitted for. ``fit``: how it was fitted (objective before/after, λ,
    iterations, fit compute)."""

    kind: ClassVar[str] = "ML-EM schedule"
    noun: ClassVar[str] = "schedule"
    made_by: ClassVar[str] = "fastsde.fit_mlem(...) or fastsde.load_mlem(path)"
    remedy: ClassVar[str] = "fit one for this run (fastsde.fit_mlem or `fastsde fit-mlem`)"
    FORMAT: ClassVar[str] = FORMAT
    file_kind: ClassVar[str] = "an ML-EM schedule file"
    main_tensor: ClassVar[str] = "theta"
    KEY_FIELDS: ClassVar[tuple[str, ...]] = ("process", "base", "eta", "steps", "t_end", "grid")
    #: the levels' part of the key, checked against the run's levels
    LEVEL_FIELDS: ClassVar[tuple[str, ...]] = ("costs", "shape")

    theta: Tensor
    p_min: float
    key: dict[str, Any]
    fit: dict[str, Any] = field(default_factory=dict)
    probes: list[Tensor | None] = field(default_factory=list)

    @property
    def corrections(self) -> int:
        return int(self.theta.shape[0])

    def probabilities(self, t: Tensor) -> Tensor:
        """(m, K−1) probabilities at the times t (m,)."""
        u = unit_time(sde_from_config(self.key["process"]), t.reshape(-1), float(self.key["t_end"]))
        return probabilities(self.theta, powers(u, self.theta.shape[1] - 1), self.p_min)

    def __call__(self, t: float) -> Tensor:
        return self.probabilities(torch.tensor([float(t)], dtype=torch.float64))[0]

    def config(self) -> dict[str, Any]:
        """JSON-ready description (what res.config() records for p)."""
        return {
            "kind": "learned",
            "theta": [[float(v) for v in row] for row in self.theta],
            "p_min": self.p_min,
            "steps": self.key["steps"],
            "base": self.key["base"],
            "lambda": self.fit.get("lambda"),
        }

    def __repr__(self) -> str:
        return f"MLEMSchedule({self.corrections + 1} levels, steps={self.key['steps']}, base={self.key['base']!r})"

    # -- the run -------------------------------------------------------------------------------

    @classmethod
    def run_key(cls, sde: SDE, solver: str, options: Mapping[str, Any], t_end: float) -> dict[str, Any]:
        """The run's part of the key: process, base, eta, steps, t_end, grid hash (the solver is mlem)."""
        return {
            "process": sde.config(),
            "base": options["base"],
            "eta": float(options["eta"]),
            "steps": int(options["steps"]),
            "t_end": float(t_end),
            "grid": grid_hash(schedule_grid(sde, options, t_end)),
        }

    @staticmethod
    def levels_key(levels: Any, shape: tuple[int, ...]) -> dict[str, Any]:
        """The levels' part of the key, their fingerprints aside: each level's cost and one sample's dims."""
        return {"costs": [float(c) for c in levels.costs], "shape": list(shape)}

    def check_levels(self, count: int) -> None:
        """ValueError unless the run has a hierarchy of as many levels as the schedule (one score: 1)."""
        if count < 2 or count != self.corrections + 1:
            raise ValueError(f"p is a learned schedule for {self.corrections + 1} levels, the run has {count}")

    def check_model(self, score: Any, shape: tuple[int, ...], dtype: torch.dtype, device: Any) -> None:
        """ValueError when the run's levels (a ``fastsde.Levels``; a plain score is one level) are not
        the ones this was fitted for: their number, costs, the sample dims, then each level's fingerprint."""
        scores = scores_of(score)
        self.check_levels(len(scores))
        check_key(self.key, self.levels_key(score, shape), self.LEVEL_FIELDS, self.mismatch)
        sde = sde_from_config(self.key["process"])
        for i, (mine, f) in enumerate(zip(self.key["levels"], scores)):
            theirs, probe = model_fingerprint(f, sde, tuple(shape), float(self.key["t_end"]), dtype, device)
            same = same_identity(mine, theirs)
            if same and probe is not None and i < len(self.probes) and self.probes[i] is not None:
                same = relative_difference(probe, self.probes[i]) <= PROBE_TOL
            if not same:
                raise ValueError(f"{self.kind} does not match this run: levels[{i}] is not the model it was fitted for")

    # -- files ---------------------------------------------------------------------------------

    def tensors(self) -> dict[str, Tensor]:
        tensors = {"theta": self.theta.to(torch.float64)}
        for i, p in enumerate(self.probes):
            if p is not None:
                tensors[f"probe{i}"] = p.to(torch.float64)
        return tensors

    def metadata(self) -> dict[str, Any]:
        return {"format": FORMAT, "p_min": self.p_min, "key": self.key, "fit": self.fit}

    @classmethod
    def read(cls, f: Fields, tensors: dict[str, Any], where: str) -> MLEMSchedule:
        """Every field checked before it can steer a run: p_min in (0, 1], θ finite of shape
        (levels − 1, degree + 1), one positive finite cost and one model fingerprint per level, the key."""
        p_min = f.number("p_min", low=0.0, low_open=True, high=1.0)
        key = read_key_common(f, tensors, model=False)[0]
        base = key.string("base", choices=("em", "ddim"))
        eta = key.number("eta", low=0.0, high=1.0)
        if base == "em" and eta != 0.0:
            raise key.error("eta", "0 with base 'em' (eta applies to base 'ddim' only)", eta)
        read_grid_hash(key)
        levels = key.items("levels", min_length=2)
        key.numbers("costs", length=len(levels), low=0.0, low_open=True)
        shape = key.integers("shape", min_length=1, low=1, high=1 << 20)
        probes = []
        for i, item in enumerate(levels):
            model, probe = read_model_key(Fields(where, item, f"key.levels[{i}]"), f"probe{i}", tensors)
            if model["kind"] == "probe" and list(model["shape"]) != shape:
                raise key.error(f"levels[{i}].shape", f"the schedule's shape {shape}", model["shape"])
            probes.append(probe)
        theta = check_tensor(where, tensors, "theta", (len(levels) - 1, None))
        if not 1 <= theta.shape[1] <= 16:
            raise f.error("theta", "1 to 16 columns (the logit polynomial's degree + 1)", theta)
        return cls(theta=theta, p_min=p_min, key=key.data, fit=f.obj("fit", {}).data, probes=probes)


def load_mlem(path: Any) -> MLEMSchedule:
    """Read a schedule written by :meth:`MLEMSchedule.save` (safetensors; nothing is unpickled), every
    field checked (a FileFormatError naming file and field): p_min in (0, 1], θ finite of shape
    (levels − 1, degree + 1), one positive finite cost and one model fingerprint per level, the key."""
    return MLEMSchedule.load(path)

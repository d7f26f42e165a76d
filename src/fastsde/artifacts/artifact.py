"""What every fitted artifact shares: its key, the checks of a run against it, its file and the
copies shipped in the package.

An artifact is data fitted once for a model and a run (an IIA table, a time grid, an ML-EM
schedule). Its key names what it was fitted for: the process, the solver and its options, the
grid, steps, t_end and a fingerprint of the model (a loaded model: a hash of its weights, with its
name as a label; any other score: its outputs on fixed inputs, compared within a tolerance). A run whose
key differs is a ValueError naming the field, before any compute:

- :meth:`FittedArtifact.check_run` compares the solver's part of the key with the run's, from plain
  data (the solver's name and resolved options, the process and t_end; never the solver registry);
- :meth:`FittedArtifact.check_model` compares the model fingerprint with the run's score.

Files are safetensors with the key and the fitting record as JSON metadata, every field checked on
load (``fastsde.files``); never pickle. This package sits below the solvers: they take artifacts as
options, the fitting procedures (``fastsde.fitting``) make them.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..files import Fields, check_tensor, read_tensors_with_meta, save_tensors_with_meta
from ..identity import PROBE_FRACTIONS, probe_outputs
from ..score import ScoreFn
from ..sde import SDE, sde_from_config

__all__ = [
    "FittedArtifact",
    "PROBE_ROWS",
    "PROBE_SEED",
    "grid_hash",
    "same",
    "check_key",
    "describe",
    "data_shape",
    "loaded_model",
    "model_fingerprint",
    "same_identity",
    "relative_difference",
    "read_model_key",
    "read_key_common",
    "read_grid_hash",
]

#: Fixed inputs of the model probe (user scores): rows and the noise seed (times: identity.PROBE_FRACTIONS of [t_end, T]).
PROBE_ROWS = 4
PROBE_SEED = 20240
#: Relative L2 difference of the probe outputs that still counts as the same model.
PROBE_TOL = {torch.float64: 1e-6}
PROBE_TOL_DEFAULT = 1e-3
#: The package folder of the shipped data (one subfolder per kind of artifact).
ASSETS = "_assets"


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------


def grid_hash(grid: Tensor) -> str:
    """SHA-256 of the grid values at 12 significant digits (stable across CPUs' last-bit rounding)."""
    text = ",".join(f"{v:.12e}" for v in grid.tolist())
    return hashlib.sha256(text.encode()).hexdigest()


def same(a: Any, b: Any) -> bool:
    """Whether two key values are the same: floats to 12 digits, dicts field by field, the rest by ==."""
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def check_key(
    key: Mapping[str, Any], run: Mapping[str, Any], fields: tuple[str, ...], mismatch: Callable[..., Exception]
) -> None:
    """Raise ``mismatch(name, stored, run)`` for the first of ``fields`` (each option of "options"
    by name) where a stored key differs from the run's."""
    for name in fields:
        mine, theirs = key.get(name), run[name]
        if name == "options" and isinstance(mine, dict):
            for k in sorted(set(mine) | set(theirs)):
                if not same(mine.get(k), theirs.get(k)):
                    raise mismatch(f"option {k}", mine.get(k), theirs.get(k))
        elif not same(mine, theirs):
            raise mismatch(name, mine, theirs)


def describe(model: Mapping[str, Any]) -> str:
    """A model fingerprint in words (for reprs and error messages)."""
    if model.get("kind") == "shipped":
        return f"model {model['name']!r} (weights {model['weights_sha256'][:12]})"
    return f"a score probed on fixed inputs of shape {tuple(model.get('shape', ()))}"


def data_shape(score: Any, shape: Any) -> tuple[int, ...]:
    """The dims of one sample: ``shape``, or read off the score (its ``shape``, or its owner's)."""
    if shape is not None:
        dims = tuple(shape)
    else:
        owner = getattr(score, "__self__", None)
        dims = getattr(score, "shape", None) or getattr(owner, "shape", None)
        if dims is None:
            raise ValueError("give shape=(*dims) of one sample: it cannot be read off this score")
        dims = tuple(dims)
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        raise ValueError(f"shape must be the dims of one sample (positive ints), got {shape!r}")
    return dims


# ---------------------------------------------------------------------------------------------
# Model fingerprints
# ---------------------------------------------------------------------------------------------


def _is_loaded_model(obj: Any) -> bool:
    """A model of ``fastsde.load_model`` (a shipped model or a model folder): ``LoadedModel`` marks itself
    ``is_loaded_model`` (read by attribute, as ``score.score_process`` reads a score's process, so this
    layer needs nothing from the models), with its name and its network."""
    return (
        getattr(type(obj), "is_loaded_model", False) is True
        and isinstance(getattr(obj, "name", None), str)
        and isinstance(getattr(obj, "network", None), torch.nn.Module)
    )


def loaded_model(score: Any) -> Any:
    """The loaded model behind a score (its bound ``score`` method's owner, or the model itself), or None."""
    owner = getattr(score, "__self__", None)
    return owner if _is_loaded_model(owner) else (score if _is_loaded_model(score) else None)


def _weights_hash(model: Any) -> str:
    h = hashlib.sha256()
    for name, v in sorted(model.network.state_dict().items()):
        h.update(name.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(
    score: ScoreFn, sde: SDE, shape: tuple[int, ...], t_end: float, dtype=torch.float64, device="cpu"
) -> tuple[dict[str, Any], Tensor | None]:
    """A loaded model: ({"kind": "shipped", name, weights_sha256}, None); any other score:
    ({"kind": "probe", ...}, its probe outputs: σ(t)·score on fixed inputs x = σ(t)·z at fixed times).
    A score that stands in for a network it cannot call directly (a diffusers scheduler's, whose outputs
    come from the pipeline) names that network's score as ``fingerprint_of``."""
    score = getattr(score, "fingerprint_of", None) or score
    model = loaded_model(score)
    if model is not None:
        return {"kind": "shipped", "name": model.name, "weights_sha256": _weights_hash(model)}, None
    desc = {"kind": "probe", "rows": PROBE_ROWS, "seed": PROBE_SEED, "fractions": list(PROBE_FRACTIONS)}
    desc["shape"] = list(shape)
    return desc, probe_outputs(score, sde, shape, t_end, dtype, device, seed=PROBE_SEED, rows=PROBE_ROWS)


def same_identity(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> bool:
    """Whether two fingerprints are of the same kind and, for loaded models, the same weights (probed
    scores are then compared by their probe outputs). A loaded model's name is only a label: a model
    folder that was moved or copied, or a folder holding a shipped model's weights, is the same model."""
    if mine.get("kind") != theirs["kind"]:
        return False
    if theirs["kind"] != "shipped":
        return True
    return mine.get("weights_sha256") == theirs["weights_sha256"]


def relative_difference(probe: Tensor, stored: Tensor) -> float:
    """‖probe − stored‖ / ‖stored‖ (the stored probe's norm floored at 1e-300)."""
    return float((probe - stored).norm() / stored.norm().clamp_min(1e-300))


# ---------------------------------------------------------------------------------------------
# Reading keys from files
# ---------------------------------------------------------------------------------------------


def read_model_key(m: Fields, probe_tensor: str, tensors: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """A model fingerprint of a file's record (Fields ``m``) and its probe tensor (None for a shipped
    model), checked: kind, name and weights hash, or the probe's rows, seed, fractions, shape and a
    finite (rows, *shape) tensor ``probe_tensor``. Shared by IIA tables, grids and ML-EM schedules."""
    kind = m.string("kind", choices=("shipped", "probe"))
    if kind == "shipped":
        m.string("name")
        digest = m.string("weights_sha256")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise m.error("weights_sha256", "a SHA-256 hex digest (64 lowercase hex digits)", digest)
        return m.data, None
    rows = m.integer("rows", low=1, high=4096)
    m.integer("seed", low=0)
    m.numbers("fractions", min_length=1, low=0.0, high=1.0)
    shape = m.integers("shape", min_length=1, low=1, high=1 << 20)
    if len(shape) > 8 or math.prod(shape) > 1 << 24:
        raise m.error("shape", "at most 8 dims of at most 2**24 values in all", shape)
    return m.data, check_tensor(m.path, tensors, probe_tensor, (rows, *shape))


def read_key_common(f: Fields, tensors: dict[str, Any], model: bool = True) -> tuple[Fields, SDE, int, float, Any]:
    """The fields every keyed file shares, checked: (key Fields, process, steps, t_end, probe):
    key.process a valid process config, key.steps an integer >= 2, key.t_end in (0, T) and (with
    ``model``) key.model with its probe tensor."""
    key = f.obj("key")
    sde = key.process("process")
    steps = key.integer("steps", low=2, high=1_000_000)
    t_end = key.number("t_end", low=0.0, low_open=True, high=float(sde.T), high_open=True)
    probe = read_model_key(key.obj("model"), "probe", tensors)[1] if model else None
    return key, sde, steps, t_end, probe


def read_grid_hash(key: Fields) -> str:
    """key.grid: the SHA-256 hex digest of the grid times (:func:`grid_hash`)."""
    grid = key.string("grid")
    if len(grid) != 64:
        raise key.error("grid", "a SHA-256 hex digest of the grid times", grid)
    return grid


# ---------------------------------------------------------------------------------------------
# The artifact
# ---------------------------------------------------------------------------------------------


class FittedArtifact:
    """Data fitted for a model and a run, with the ``key`` of that run.

    Subclasses (dataclasses) declare what they are for the shared code: their ``kind`` and ``noun``
    (error messages), how to fit one (``made_by``, ``remedy``), their file (``FORMAT``, ``file_kind``,
    ``main_tensor``), the key fields a run is checked on (``KEY_FIELDS``, from :meth:`run_key`) and the
    package folder of the shipped ones (``assets``); and implement :meth:`run_key`, :meth:`tensors`,
    :meth:`metadata` and :meth:`read`.
    """

    #: what it is, in messages: "<kind> does not match this run: ... in the <noun>"
    kind: ClassVar[str]
    noun: ClassVar[str]
    #: the calls that make one (for option errors), and the advice when a run does not match it
    made_by: ClassVar[str]
    remedy: ClassVar[str]
    #: the file: its format tag, what it is called in file errors, the tensor every file holds
    FORMAT: ClassVar[str]
    file_kind: ClassVar[str]
    main_tensor: ClassVar[str]
    #: the fields of :meth:`run_key` a run is checked on, in order
    KEY_FIELDS: ClassVar[tuple[str, ...]]
    #: the folder of the shipped ones under fastsde/_assets (None: none shipped)
    assets: ClassVar[str | None] = None
    #: a solver that takes this artifact runs on the grid from T, with or without one (it cannot start at t_start < T)
    starts_at_T: ClassVar[bool] = False
    #: the run's model is checked only when it is one plain score without conditioning (cond=)
    plain_score_only: ClassVar[bool] = False

    key: dict[str, Any]
    probe: Tensor | None

    # -- the run -------------------------------------------------------------------------------

    @classmethod
    def run_key(cls, sde: SDE, solver: str, options: Mapping[str, Any], t_end: float) -> dict[str, Any]:
        """The key of a run, the model aside, from the solver's name and resolved options."""
        raise NotImplementedError

    def mismatch(self, name: str, mine: Any, theirs: Any) -> ValueError:
        """The error of a key field that differs from the run's."""
        return ValueError(
            f"{self.kind} does not match this run: {name} is {mine!r} in the {self.noun}, {theirs!r} in the run; "
            f"{self.remedy}"
        )

    def check_run(self, sde: SDE, solver: str, options: Mapping[str, Any], t_end: float) -> None:
        """ValueError naming the first key field (``KEY_FIELDS``) where the run of ``solver`` with these
        resolved options under ``sde`` to ``t_end`` differs from the run this was fitted for."""
        check_key(self.key, self.run_key(sde, solver, options, t_end), self.KEY_FIELDS, self.mismatch)

    # -- the model -----------------------------------------------------------------------------

    def check_model(self, score: Any, shape: tuple[int, ...], dtype: torch.dtype, device: Any) -> None:
        """ValueError when ``score`` (samples of dims ``shape`` in ``dtype`` on ``device``) is not the
        model this was fitted for: another loaded model, or a score whose probe outputs differ."""
        mine = self.key["model"]
        sde = sde_from_config(self.key["process"])
        theirs, probe = model_fingerprint(score, sde, shape, self.key["t_end"], dtype, device)
        if not same_identity(mine, theirs):
            raise ValueError(
                f"{self.kind} does not match this run: model: the {self.noun} was fitted for {describe(mine)}, "
                f"the run uses {describe(theirs)}"
            )
        if theirs["kind"] == "probe":
            if tuple(mine.get("shape", ())) != tuple(shape):
                raise self.mismatch("model shape", tuple(mine.get("shape", ())), tuple(shape))
            assert self.probe is not None and probe is not None
            rel = relative_difference(probe, self.probe)
            tol = PROBE_TOL.get(dtype, PROBE_TOL_DEFAULT)
            if not rel <= tol:
                raise ValueError(
                    f"{self.kind} does not match this run: model: the score's outputs on the {self.noun}'s probe "
                    f"inputs differ by {rel:.3g} (relative), more than {tol:g}: a different model"
                )

    # -- files ---------------------------------------------------------------------------------

    def tensors(self) -> dict[str, Tensor]:
        """The tensors of its file (float64)."""
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        """The JSON metadata of its file, ``format`` included."""
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> Path:
        """Write it (safetensors + JSON metadata) whole or not at all (a temporary name, then os.replace)."""
        return save_tensors_with_meta(path, self.tensors(), self.metadata())

    @classmethod
    def read(cls, f: Fields, tensors: dict[str, Any], where: str) -> FittedArtifact:
        """One from a file's checked record ``f`` and its tensors (a FileFormatError naming file and field)."""
        raise NotImplementedError

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Any:
        """One from a file's bytes, every field checked (a FileFormatError naming ``where`` and the field)."""
        tensors, f = read_tensors_with_meta(data, where, cls.FORMAT, cls.file_kind, cls.main_tensor)
        return cls.read(f, tensors, where)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Any:
        """Read a file written by :meth:`save` (safetensors; nothing is unpickled)."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"no {cls.kind} at {str(p)!r}")
        return cls.from_bytes(p.read_bytes(), str(p))

    # -- shipped copies ------------------------------------------------------------------------

    @classmethod
    def file_name(cls, model: str, solver: str, steps: int, variant: str | None = None) -> str:
        """File name of a shipped one: <model>-<solver>-<steps>.safetensors."""
        return f"{model}-{solver}-{int(steps)}.safetensors"

    @classmethod
    def _folder(cls) -> Any:
        return resources.files("fastsde").joinpath(ASSETS).joinpath(cls.assets or "")

    @classmethod
    def shipped_names(cls) -> list[str]:
        """File names of the ones shipped in the package."""
        d = cls._folder()
        if cls.assets is None or not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if p.name.endswith(".safetensors"))

    @classmethod
    def shipped(cls, model: str, solver: str, steps: int, variant: str | None = None) -> Any:
        """The one shipped for this model, solver and steps (and variant), or None."""
        if cls.assets is None:
            return None
        f = cls._folder().joinpath(cls.file_name(model, solver, steps, variant))
        return cls.from_bytes(f.read_bytes(), f.name) if f.is_file() else None

    @classmethod
    def read_shipped(cls, name: str) -> Any:
        """A shipped one by its file name (see :meth:`shipped_names`)."""
        f = cls._folder().joinpath(name)
        if cls.assets is None or not f.is_file():
            raise FileNotFoundError(f"no shipped {cls.kind} {name!r}; shipped: {cls.shipped_names()}")
        return cls.from_bytes(f.read_bytes(), name)

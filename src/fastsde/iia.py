"""IIA coefficient tables: fitting (``fit_iia``), the keyed table, saving and loading, and the tables
shipped for the shipped models.

``fit_iia`` fits, step by step, the coefficients β_i of an IIA solver (``fastsde.solvers.iia``) by
least squares against the base solver run on ``fine_steps`` sub-steps of the same step (a grid of the
same family inside [t_{i+1}, t_i]), in float64 with a tiny ridge, from ``n`` prior draws of ``seed``,
advancing the batch with the fitted step so that step i + 1 is fitted on the states it will meet.

A table knows its key: the process and its parameters, the IIA solver and its options, the grid
(values hashed), steps, t_end and a fingerprint of the model (a shipped model: its name and a hash of
its weights; any other score: its outputs on fixed inputs, compared within a tolerance). Using a table
whose key does not match the run is a ValueError naming the field. Files are safetensors with the key
and the fitting record as JSON metadata; never pickle.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .grids import explicit_times
from .identity import PROBE_FRACTIONS, probe_outputs
from .noise import NoiseSource, Stream
from .score import CountingScore, ScoreFn
from .sde import SDE
from .solvers import get_solver
from .solvers.base import SolverContext
from .solvers.iia import IIA_BASES, IIAStepper
from .solvers.stepper import Step

__all__ = [
    "IIATable",
    "fit_iia",
    "load_iia",
    "iia_step_errors",
    "model_fingerprint",
    "shipped_table",
    "shipped_tables",
    "read_shipped",
    "table_name",
]

FORMAT = "fastsde-iia/1"
#: Fixed inputs of the model probe (user scores): rows, the noise seed and the times as fractions of [t_end, T].
PROBE_ROWS = 4
PROBE_SEED = 20240
#: Relative L2 difference of the probe outputs that still counts as the same model.
PROBE_TOL = {torch.float64: 1e-6}
PROBE_TOL_DEFAULT = 1e-3
#: The key fields, in the order they are checked.
KEY_FIELDS = ("process", "solver", "options", "steps", "t_end", "grid")


# ---------------------------------------------------------------------------------------------
# Key
# ---------------------------------------------------------------------------------------------


def iia_solver_name(solver: str) -> str:
    """ "dpmpp_2m" or "iia_dpmpp_2m" -> "iia_dpmpp_2m"."""
    if solver in IIA_BASES:
        return IIA_BASES[solver]
    if solver in IIA_BASES.values():
        return solver
    raise ValueError(f"solver must be one of {sorted(IIA_BASES)} (or their iia_ names), got {solver!r}")


def _grid_hash(grid: Tensor) -> str:
    """SHA-256 of the grid values at 12 significant digits (stable across CPUs' last-bit rounding)."""
    text = ",".join(f"{v:.12e}" for v in grid.tolist())
    return hashlib.sha256(text.encode()).hexdigest()


def run_key(sde: SDE, solver: str, options: dict[str, Any], t_end: float) -> dict[str, Any]:
    """The key of a run, the model aside: process, solver, its options, steps, t_end, grid hash."""
    from .grids import time_grid

    spec = get_solver(solver)
    opts = {k: options[k] for k in spec.options if k not in ("steps", "table")}
    grid = time_grid(sde, opts["grid"], options["steps"], sde.T, t_end, opts["rho"])
    if explicit_times(opts["grid"]) is not None:
        opts["grid"] = "explicit"  # the times themselves are keyed by the grid hash
    return {
        "process": sde.config(),
        "solver": spec.name,
        "options": opts,
        "steps": int(options["steps"]),
        "t_end": float(t_end),
        "grid": _grid_hash(grid),
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def check_key(key: dict[str, Any], run: dict[str, Any], fields: tuple[str, ...], mismatch) -> None:
    """Raise ``mismatch(name, stored, run)`` for the first of ``fields`` (each option of "options"
    by name) where a stored key differs from the run's."""
    for name in fields:
        mine, theirs = key.get(name), run[name]
        if name == "options" and isinstance(mine, dict):
            for k in sorted(set(mine) | set(theirs)):
                if not _same(mine.get(k), theirs.get(k)):
                    raise mismatch(f"option {k}", mine.get(k), theirs.get(k))
        elif not _same(mine, theirs):
            raise mismatch(name, mine, theirs)


def _shipped_model(score: Any):
    from .models import LoadedModel

    owner = getattr(score, "__self__", None)
    return owner if isinstance(owner, LoadedModel) else (score if isinstance(score, LoadedModel) else None)


def _weights_hash(model: Any) -> str:
    h = hashlib.sha256()
    for name, v in sorted(model.network.state_dict().items()):
        h.update(name.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _probe(score: ScoreFn, sde: SDE, shape: tuple[int, ...], t_end: float, dtype, device) -> Tensor:
    """σ(t)·score on fixed inputs x = σ(t)·z at fixed times (float64 result; ``fastsde.identity``)."""
    return probe_outputs(score, sde, shape, t_end, dtype, device, seed=PROBE_SEED, rows=PROBE_ROWS)


def model_fingerprint(
    score: ScoreFn, sde: SDE, shape: tuple[int, ...], t_end: float, dtype=torch.float64, device="cpu"
) -> tuple[dict[str, Any], Tensor | None]:
    """A shipped model: ({"kind": "shipped", name, weights_sha256}, None); any other score:
    ({"kind": "probe", ...}, its probe outputs)."""
    model = _shipped_model(score)
    if model is not None:
        return {"kind": "shipped", "name": model.name, "weights_sha256": _weights_hash(model)}, None
    desc = {"kind": "probe", "rows": PROBE_ROWS, "seed": PROBE_SEED, "fractions": list(PROBE_FRACTIONS)}
    desc["shape"] = list(shape)
    return desc, _probe(score, sde, shape, t_end, dtype, device)


def _describe(model: dict[str, Any]) -> str:
    if model.get("kind") == "shipped":
        return f"shipped model {model['name']!r} (weights {model['weights_sha256'][:12]})"
    return f"a score probed on fixed inputs of shape {tuple(model.get('shape', ()))}"


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------


@dataclass
class IIATable:
    """Per-step IIA coefficients with the key of the run they were fitted for.

    ``coefficients``: (steps − 1, m) float64, one row per move, one column per direction
    (``directions``). ``fit``: how it was fitted and what it cost (``nfe_per_sample``: evaluations
    per fitting sample, coarse steps and fine reference together; ``evaluations``; ``calls``;
    ``seconds``) and the per-step training MSE of the base step and of the IIA step against the
    fine reference (``mse_base``, ``mse_iia``).
    """

    coefficients: Tensor
    key: dict[str, Any]
    directions: tuple[str, ...]
    fit: dict[str, Any] = field(default_factory=dict)
    probe: Tensor | None = None

    @property
    def solver(self) -> str:
        return self.key["solver"]

    @property
    def steps(self) -> int:
        return int(self.key["steps"])

    def __repr__(self) -> str:
        return (
            f"IIATable({self.solver}, steps={self.steps}, {self.key['process'].get('type')}, "
            f"model={_describe(self.key['model'])})"
        )

    # -- checks --------------------------------------------------------------------------------

    def _mismatch(self, name: str, mine: Any, theirs: Any) -> ValueError:
        return ValueError(
            f"IIA table does not match this run: {name} is {mine!r} in the table, {theirs!r} in the run; "
            f"fit a table for this run (fastsde.fit_iia or `fastsde fit-iia`)"
        )

    def check_run(self, sde: SDE, solver: str, options: dict[str, Any], t_end: float) -> None:
        """ValueError naming the first key field (process, solver, options, steps, t_end, grid) that differs."""
        check_key(self.key, run_key(sde, solver, options, t_end), KEY_FIELDS, self._mismatch)
        if self.coefficients.shape[0] != self.steps - 1:
            raise ValueError(f"IIA table has {self.coefficients.shape[0]} coefficient rows for {self.steps} steps")

    def check_model(self, score: ScoreFn, shape: tuple[int, ...], dtype, device) -> None:
        """ValueError when the score is not the model the table was fitted for."""
        from .models import sde_from_config

        mine = self.key["model"]
        sde = sde_from_config(self.key["process"])
        theirs, probe = model_fingerprint(score, sde, shape, self.key["t_end"], dtype, device)
        if mine.get("kind") != theirs["kind"] or (
            theirs["kind"] == "shipped"
            and (mine.get("name"), mine.get("weights_sha256")) != (theirs["name"], theirs["weights_sha256"])
        ):
            raise ValueError(
                f"IIA table does not match this run: model: the table was fitted for {_describe(mine)}, "
                f"the run uses {_describe(theirs)}"
            )
        if theirs["kind"] == "probe":
            if tuple(mine.get("shape", ())) != tuple(shape):
                raise self._mismatch("model shape", tuple(mine.get("shape", ())), tuple(shape))
            assert self.probe is not None and probe is not None
            rel = float((probe - self.probe).norm() / self.probe.norm().clamp_min(1e-300))
            tol = PROBE_TOL.get(dtype, PROBE_TOL_DEFAULT)
            if not rel <= tol:
                raise ValueError(
                    f"IIA table does not match this run: model: the score's outputs on the table's probe inputs "
                    f"differ by {rel:.3g} (relative), more than {tol:g}: a different model"
                )

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table (safetensors + JSON metadata) whole or not at all (a temporary name, then os.replace)."""
        from .files import save_tensors_with_meta

        tensors = {"coefficients": self.coefficients.to(torch.float64)}
        if self.probe is not None:
            tensors["probe"] = self.probe.to(torch.float64)
        meta = {"format": FORMAT, "key": self.key, "directions": list(self.directions), "fit": self.fit}
        return save_tensors_with_meta(path, tensors, meta)


def read_model_key(m: Any, probe_tensor: str, tensors: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """A model fingerprint of a file's record (Fields ``m``) and its probe tensor (None for a shipped
    model), checked: kind, name and weights hash, or the probe's rows, seed, fractions, shape and a
    finite (rows, *shape) tensor ``probe_tensor``. Shared by IIA tables, grids and ML-EM schedules."""
    from .files import check_tensor

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


def read_key_common(f: Any, tensors: dict[str, Any], model: bool = True) -> tuple[Any, Any, int, float, Any]:
    """The fields every keyed file shares, checked: (key Fields, process, steps, t_end, probe):
    key.process a valid process config, key.steps an integer >= 2, key.t_end in (0, T) and (with
    ``model``) key.model with its probe tensor."""
    key = f.obj("key")
    sde = key.process("process")
    steps = key.integer("steps", low=2, high=1_000_000)
    t_end = key.number("t_end", low=0.0, low_open=True, high=float(sde.T), high_open=True)
    probe = read_model_key(key.obj("model"), "probe", tensors)[1] if model else None
    return key, sde, steps, t_end, probe


def _from_bytes(data: bytes, where: str) -> IIATable:
    """A table from a file's bytes, every field checked (a FileFormatError naming file and field)."""
    from .files import check_tensor, read_tensors_with_meta

    tensors, f = read_tensors_with_meta(data, where, FORMAT, "an IIA table file", "coefficients")
    key, _, steps, _, probe = read_key_common(f, tensors)
    solver = key.string("solver", choices=tuple(IIA_BASES.values()))
    options = key.obj("options")
    grid = key.string("grid")
    if len(grid) != 64:
        raise key.error("grid", "a SHA-256 hex digest of the grid times", grid)
    directions = tuple(f.strings("directions", min_length=1))
    expected = tuple(get_solver(solver).stepper.directions(options.data))
    if directions != expected:
        raise f.error("directions", f"{list(expected)} (the directions of {solver} with these options)", directions)
    coefficients = check_tensor(where, tensors, "coefficients", (steps - 1, len(directions)))
    fit = f.obj("fit", {}).data
    return IIATable(coefficients=coefficients, key=key.data, directions=directions, fit=fit, probe=probe)


def load_iia(path: str | os.PathLike) -> IIATable:
    """Read a table written by :meth:`IIATable.save` (safetensors; nothing is unpickled)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no IIA table at {str(p)!r}")
    return _from_bytes(p.read_bytes(), str(p))


# ---------------------------------------------------------------------------------------------
# Shipped tables
# ---------------------------------------------------------------------------------------------


def table_name(model: str, solver: str, steps: int, variant: str | None = None) -> str:
    """File name of a table: <model>-<base solver>[-<variant>]-<steps>.safetensors."""
    base = {v: k for k, v in IIA_BASES.items()}.get(solver, solver)
    tag = f"-{variant}" if variant and variant != "iia" else ""
    return f"{model}-{base}{tag}-{steps}.safetensors"


def _tables_dir():
    return resources.files("fastsde").joinpath("iia_tables")


def shipped_table(model: str, solver: str, steps: int, variant: str | None = None) -> IIATable | None:
    """The table shipped in the package for this model, solver and steps, or None."""
    f = _tables_dir().joinpath(table_name(model, solver, steps, variant))
    return _from_bytes(f.read_bytes(), f.name) if f.is_file() else None


def read_shipped(name: str) -> IIATable:
    """A shipped table by its file name (see :func:`shipped_tables`)."""
    f = _tables_dir().joinpath(name)
    if not f.is_file():
        raise FileNotFoundError(f"no shipped IIA table {name!r}; shipped: {shipped_tables()}")
    return _from_bytes(f.read_bytes(), name)


def shipped_tables() -> list[str]:
    """File names of the tables shipped in the package."""
    d = _tables_dir()
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".safetensors")) if d.is_dir() else []


# ---------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------


def _data_shape(score: Any, shape: Any) -> tuple[int, ...]:
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


def _ridge_solve(gram: list[list[float]], rhs: list[float], ridge: float) -> list[float]:
    """(GᵀG + λI)β = Gᵀr with λ = ridge · mean diagonal, by Cholesky in Python floats (m ≤ 4:
    exact same bits on every machine); zeros when GᵀG is zero."""
    m = len(rhs)
    lam = ridge * sum(gram[i][i] for i in range(m)) / m
    if all(gram[i][i] == 0 for i in range(m)):
        return [0.0] * m
    a = [[gram[i][j] + (lam if i == j else 0.0) for j in range(m)] for i in range(m)]
    low = [[0.0] * m for _ in range(m)]
    for i in range(m):
        for j in range(i + 1):
            acc = a[i][j] - sum(low[i][k] * low[j][k] for k in range(j))
            if i == j:
                if not acc > 0:
                    raise ValueError("IIA fit: the directions' Gram matrix is not positive definite; raise ridge")
                low[i][i] = math.sqrt(acc)
            else:
                low[i][j] = acc / low[j][j]
    y = [0.0] * m
    for i in range(m):
        y[i] = (rhs[i] - sum(low[i][k] * y[k] for k in range(i))) / low[i][i]
    out = [0.0] * m
    for i in reversed(range(m)):
        out[i] = (y[i] - sum(low[k][i] * out[k] for k in range(i + 1, m))) / low[i][i]
    return out


class _Loop:
    """One coarse solve in which each step is compared with the base solver on fine sub-steps of it:
    ``fit`` solves for β_i and advances with it; otherwise the given coefficients are used."""

    def __init__(
        self,
        score: ScoreFn,
        sde: SDE,
        stepper: IIAStepper,
        fine_steps: int,
        n: int,
        ridge: float,
        coefficients: Tensor | None,
    ) -> None:
        self.sde, self.stepper, self.fine = sde, stepper, fine_steps
        self.ridge, self.coefficients = ridge, coefficients
        self.ref_score = CountingScore(score, n)
        self.base_spec = stepper.base_spec
        self.betas: list[Tensor] = []
        self.mse_base: list[float] = []
        self.mse_iia: list[float] = []

    def reference(self, x: Tensor, t: float, t_next: float) -> Tensor:
        """The base solver from (x, t) to t_next on ``fine_steps`` moves of its grid family."""
        ctx = SolverContext(
            sde=self.sde, score=self.ref_score, noise=NoiseSource.from_seed(0, 1), t_start=t, t_end=t_next
        )
        opts = dict(self.stepper.base.options, steps=self.fine + 1)
        if explicit_times(opts.get("grid")) is not None:
            opts["grid"] = "logsnr"  # an explicit (e.g. fitted) grid: its sub-steps uniform in log-SNR
        if "lower_order_final" in opts:
            opts["lower_order_final"] = False  # the reference should be accurate, not few-step safe
        return self.base_spec.run(ctx, x, **opts)

    def __call__(self, x: Tensor, s: Step, base: Tensor, dirs: list[Tensor | None]) -> Tensor:
        t, t_next = float(s.t64[0]), float(s.t_next64[0])
        b = x.shape[0]
        r = (self.reference(x, t, t_next) - base).reshape(b, -1).to(torch.float64)
        cols = [j for j, g in enumerate(dirs) if g is not None]
        m = len(dirs)
        beta = torch.zeros(m, dtype=torch.float64)
        if self.coefficients is not None:
            beta = self.coefficients[int(s.index[0])].clone()
        elif cols:
            g = torch.stack([dirs[j].reshape(b, -1).to(torch.float64) for j in cols], dim=-1).reshape(-1, len(cols))
            # elementwise products and sums, not BLAS: the same bits on every run (MKL's dgemm is not)
            gram = (g[:, :, None] * g[:, None, :]).sum(0).tolist()
            rhs = (g * r.reshape(-1, 1)).sum(0).tolist()
            beta[cols] = torch.tensor(_ridge_solve(gram, rhs, self.ridge), dtype=torch.float64)
        corr = sum(
            (beta[j] * dirs[j].reshape(b, -1).to(torch.float64) for j in cols if beta[j] != 0),
            torch.zeros_like(r),
        )
        self.betas.append(beta)
        self.mse_base.append(float(r.pow(2).mean()))
        self.mse_iia.append(float((r - corr).pow(2).mean()))
        return beta.to(x.device)


def _run_loop(
    score: ScoreFn,
    sde: SDE,
    iia: str,
    opts: dict[str, Any],
    shape: tuple[int, ...],
    n: int,
    seed: int,
    t_end: float,
    fine_steps: int,
    ridge: float,
    coefficients: Tensor | None,
    progress: bool,
    dtype,
    device,
) -> tuple[_Loop, CountingScore]:
    from .solvers.driver import integrate

    spec = get_solver(iia)
    noise = NoiseSource.from_seed(seed, n)
    counted = CountingScore(score, n)
    ctx = SolverContext(sde=sde, score=counted, noise=noise, t_start=sde.T, t_end=float(t_end), progress=progress)
    plan = spec.build(ctx, dict(opts, table=None))
    loop = _Loop(score, sde, plan["stepper"], fine_steps, n, ridge, coefficients)
    plan["stepper"].fit_hook = loop
    with torch.no_grad():
        x = sde.prior_sample(noise.normal(shape, Stream.PRIOR, 0, dtype=dtype, device=device))
        integrate(ctx, x, desc=f"fit {iia}" if coefficients is None else f"check {iia}", **plan)
    if plan["stepper"].shared_first_move:
        # from m(T) = 0 (a rectified flow) move 0 is the driver's shared first move, exact in x̂0 and not an
        # IIA step: its row of coefficients is zero (not fitted; mse_base / mse_iia cover the later moves)
        loop.betas.insert(0, torch.zeros(len(plan["stepper"].directions(opts)), dtype=torch.float64))
    return loop, counted


def _check_common(score: Any, sde: Any, n: Any, fine_steps: Any, ridge: Any, seed: Any) -> None:
    from .api import check_score_and_process

    check_score_and_process(score, sde)
    for name, v, lo in (("n", n, 1), ("fine_steps", fine_steps, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not (ridge >= 0 and math.isfinite(ridge)):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")


def fit_iia(
    score: ScoreFn,
    sde: SDE,
    solver: str = "dpmpp_2m",
    steps: int = 8,
    n: int = 256,
    seed: int = 0,
    *,
    fine_steps: int = 10,
    shape: tuple[int, ...] | None = None,
    t_end: float | None = None,
    ridge: float = 1e-10,
    progress: bool = False,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    **options: Any,
) -> IIATable:
    """Fit the per-step coefficients of an IIA solver for this model, process and run.

    Args:
        score, sde: the model and its process.
        solver: the base solver, "dpmpp_2m", "heun" or "ddim" (or the iia_ name).
        steps: grid points of the runs the table is for.
        n: prior draws fitted on (from ``seed``; evaluate on other seeds).
        fine_steps: sub-steps of the base solver per step for the reference.
        shape: dims of one sample (read off the score when it has ``.shape``).
        t_end: end time (default: the process's).
        ridge: ridge λ relative to the mean diagonal of GᵀG.
        **options: the IIA solver's options (grid, rho, lower_order_final, variant).
    """
    _check_common(score, sde, n, fine_steps, ridge, seed)
    iia = iia_solver_name(solver)
    spec = get_solver(iia)
    t_end = sde.default_t_end if t_end is None else float(t_end)
    sde.check_time("t_end", t_end)
    if "table" in options:
        raise ValueError("fit_iia takes no table option")
    opts = spec.resolve(sde, {**options, "steps": steps}, t_end)
    dims = _data_shape(score, shape)
    start = time.perf_counter()
    loop, counted = _run_loop(
        score, sde, iia, opts, dims, n, seed, t_end, fine_steps, ridge, None, progress, dtype, device
    )
    seconds = time.perf_counter() - start
    fingerprint, probe = model_fingerprint(score, sde, dims, t_end, dtype, device)
    key = {**run_key(sde, iia, opts, t_end), "model": fingerprint}
    evaluations = float(counted.nfe_per_sample.sum() + loop.ref_score.nfe_per_sample.sum())
    fit = {
        "n": n,
        "seed": seed,
        "fine_steps": fine_steps,
        "ridge": ridge,
        "dtype": str(dtype).replace("torch.", ""),
        "nfe_per_sample": evaluations / n,
        "evaluations": evaluations,
        "calls": counted.calls + loop.ref_score.calls,
        "seconds": seconds,
        "mse_base": loop.mse_base,
        "mse_iia": loop.mse_iia,
    }
    coef = torch.stack(loop.betas) if loop.betas else torch.zeros(0, len(loop.stepper.directions(opts)))
    return IIATable(coef, key, loop.stepper.directions(opts), fit, probe)


def iia_step_errors(
    score: ScoreFn,
    sde: SDE,
    table: IIATable,
    n: int = 256,
    seed: int = 1,
    *,
    fine_steps: int | None = None,
    shape: tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Per-step MSE of the base step and of the IIA step against the fine reference on the states of
    an IIA run from ``n`` prior draws of ``seed`` (use a seed other than the table's): {"base", "iia"}."""
    fine = int(table.fit.get("fine_steps", 10)) if fine_steps is None else fine_steps
    _check_common(score, sde, n, fine, 0.0, seed)
    opts = {**table.key["options"], "steps": table.steps}
    t_end = float(table.key["t_end"])
    spec = get_solver(table.solver)
    opts = spec.resolve(sde, opts, t_end)
    table.check_run(sde, table.solver, opts, t_end)
    dims = _data_shape(score, shape)
    table.check_model(score, dims, dtype, device)
    loop, _ = _run_loop(
        score, sde, table.solver, opts, dims, n, seed, t_end, fine, 0.0, table.coefficients, False, dtype, device
    )
    return {"base": loop.mse_base, "iia": loop.mse_iia}

"""``fastsde.tune``: the best fixed-grid sampler for a model at each NFE budget, found and fitted.

For each budget N (network evaluations per sample, the final denoise included) every candidate solver
runs N grid points on its default grid; the best ``fit_top`` of them also get a fitted grid
(``fit_grid`` on the fitting seeds), and the IIA solvers their fitted table (``fit_iia``). Every
candidate is scored on held-out seeds against a fine reference solve from the same noise, with two
measures that need no data: the MSE to the reference, and the Fréchet distance between the Gaussian
fits of the two sample sets (in the samples' own space). Deterministic budgets choose by MSE (the error
of the solve); stochastic ones by FD (their samples follow other paths by design). The result is a
:class:`~fastsde.artifacts.recipe.Recipe`.

Time-boxed (``max_minutes``: no candidate starts after it; the recipe says which were skipped) and
resumable (``cache``: a folder of finished candidates, keyed by the model fingerprint and settings).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..api import sample
from ..artifacts.artifact import data_shape, model_fingerprint
from ..artifacts.recipe import Choice, Recipe
from ..files import FileFormatError, write_text_atomic
from ..grids import zero_mean_at
from ..metrics.mixture import frechet_gaussian, mse
from ..sde import SDE
from ..solvers import SOLVERS
from .grid import fit_grid
from .iia import fit_iia

__all__ = ["tune", "TuneSettings", "DETERMINISTIC", "STOCHASTIC"]

#: fixed-grid solvers with one evaluation per move, so N grid points cost N NFE
DETERMINISTIC = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "deis", "lms", "euler")
STOCHASTIC = ("dpmpp_2m_sde", "dpmpp_3m_sde", "er_sde", "sa_solver", "ancestral")
#: IIA solvers by their base (their table is fitted on the base's default grid)
IIA_OF = {"ddim": "iia_ddim", "dpmpp_2m": "iia_dpmpp_2m"}


@dataclass
class TuneSettings:
    """How ``tune`` searches: budgets (NFE), the candidate solvers, fitting and evaluation sizes and
    seeds, the fitted grids' effort, the reference, the time box and the cache."""

    budgets: tuple[int, ...] = (4, 6, 8, 10)
    stochastic: bool = False
    solvers: tuple[str, ...] | None = None
    n_fit: int = 64
    n_eval: int = 256
    fit_seed: int = 0
    eval_seed: int = 10_000
    fit_top: int = 2
    grid_fine: int = 30
    grid_sweeps: int = 1
    iia: bool = True
    reference_steps: int = 200
    max_minutes: float | None = 10.0
    cache: str | None = None
    progress: bool = True
    #: keep every fitted grid and table in the recipe (not only the chosen ones), for comparisons
    keep_all_files: bool = False
    #: what chooses: "mse" (to the reference from the same noise) or "fd" (between the sample sets);
    #: None: MSE for deterministic solvers, FD for stochastic ones
    measure: str | None = None

    def check(self) -> None:
        budgets = self.budgets
        if not budgets or any(isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 1000 for b in budgets):
            raise ValueError(f"budgets must be integers in [2, 1000] (NFE per sample), got {budgets!r}")
        pool = self.candidates()
        unknown = [s for s in pool if s not in SOLVERS]
        if unknown:
            raise ValueError(f"unknown solver(s) {unknown}; valid: {sorted(SOLVERS)}")
        several = [s for s in pool if SOLVERS[s].nfe_per_step != 1]
        if several:
            raise ValueError(f"tune takes fixed-grid solvers with one evaluation per move, got {several}")
        for name in ("n_fit", "n_eval", "reference_steps", "grid_fine"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 2:
                raise ValueError(f"{name} must be an integer >= 2, got {v!r}")
        if self.max_minutes is not None and not (isinstance(self.max_minutes, (int, float)) and self.max_minutes > 0):
            raise ValueError(f"max_minutes must be a positive number or None, got {self.max_minutes!r}")
        if self.measure not in (None, "mse", "fd"):
            raise ValueError(f"measure must be 'mse', 'fd' or None, got {self.measure!r}")
        if isinstance(self.fit_top, bool) or not isinstance(self.fit_top, int) or self.fit_top < 0:
            raise ValueError(f"fit_top must be an integer >= 0, got {self.fit_top!r}")
        if self.fit_seed == self.eval_seed:
            raise ValueError("fit_seed and eval_seed must differ (candidates are scored on held-out seeds)")

    def candidates(self) -> tuple[str, ...]:
        return tuple(self.solvers) if self.solvers else (STOCHASTIC if self.stochastic else DETERMINISTIC)


@dataclass
class _Row:
    """One scored candidate."""

    budget: int
    solver: str
    variant: str  # "default", "fitted grid", "IIA table"
    mse: float
    fd: float
    wall: float
    fit_seconds: float = 0.0
    file: str | None = None
    error: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def tune(
    score: Callable[..., Tensor],
    sde: SDE,
    shape: Sequence[int] | None = None,
    budgets: Sequence[int] = (4, 6, 8, 10),
    *,
    settings: TuneSettings | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    log: Callable[[str], Any] | None = print,
    **overrides: Any,
) -> Recipe:
    """Tune a recipe for ``score`` under ``sde`` (samples of dims ``shape``) at these NFE budgets.

    ``settings`` (or keyword overrides of :class:`TuneSettings`: ``stochastic=True``, ``max_minutes=``,
    ``cache=``, ``solvers=``, ...) say how; ``log`` gets one line per finished candidate (None: quiet).
    """
    s = settings or TuneSettings()
    s = TuneSettings(**{**asdict(s), "budgets": tuple(int(b) for b in budgets), **overrides})
    s.check()
    search = _Search(score, sde, data_shape(score, shape), s, dtype, device, log or (lambda _line: None))
    for budget in s.budgets:
        base = search.defaults(budget)
        if not s.stochastic:
            search.fitted_grids(budget, base)
            if s.iia:
                search.iia_tables(budget)
    return search.recipe()


class _Search:
    """One tuning run: the reference, the candidates scored so far, the fitted files, the time box."""

    def __init__(self, score: Any, sde: SDE, dims: tuple[int, ...], s: TuneSettings, dtype: Any, device: Any,
                 say: Callable[[str], Any]) -> None:  # fmt: skip
        self.score, self.sde, self.dims, self.s, self.dtype, self.device, self.say = (
            score,
            sde,
            dims,
            s,
            dtype,
            device,
            say,
        )
        self.start = time.perf_counter()
        self.deadline = None if s.max_minutes is None else self.start + 60.0 * float(s.max_minutes)
        self.fingerprint, self.probe = model_fingerprint(score, sde, dims, float(sde.default_t_end), dtype, device)
        self.cache = _Cache(s, self.fingerprint, sde, dims, self.probe)
        self.rows: list[_Row] = []
        self.files: dict[str, Any] = {}
        self.skipped: list[str] = []
        t0 = time.perf_counter()
        self.ref = sample(score, sde, (s.n_eval, *dims), "dpmpp_3m", seed=s.eval_seed, steps=s.reference_steps,
                          dtype=dtype, device=device, grid="uniform" if zero_mean_at(sde, sde.T) else "logsnr").samples  # fmt: skip
        self.ref_seconds = time.perf_counter() - t0
        self.ref_stats = _stats(self.ref)
        say(f"reference: dpmpp_3m, {s.reference_steps} points, {s.n_eval} samples ({self.ref_seconds:.1f} s)")
        per_nfe = self.ref_seconds / s.reference_steps
        n_default = len(s.candidates()) * sum(s.budgets)
        n_more = 0 if s.stochastic else (s.fit_top + (2 if s.iia else 0)) * sum(s.budgets)
        say(
            f"estimate: ~{per_nfe * n_default:.0f} s for {len(s.candidates()) * len(s.budgets)} default-grid candidates, "
            f"~{per_nfe * n_more:.0f} s to score the fitted ones, plus fitting ({s.fit_top} grids and "
            f"{2 if s.iia and not s.stochastic else 0} tables per budget; a grid costs about {s.grid_fine} × {s.n_fit} "
            f"sample-evaluations per sweep)"
        )

    def late(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def run(self, budget: int, solver: str, variant: str, options: dict[str, Any], fit_seconds: float = 0.0,
            file: str | None = None) -> _Row | None:  # fmt: skip
        """Score one candidate on the held-out seeds (or take it from the cache); None past the time box."""
        label = f"N={budget} {solver} ({variant})"
        cached = self.cache.get(label)
        if cached is not None:
            self.rows.append(cached)
            self.say(f"{label}: cached, MSE {cached.mse:.4g}, FD {cached.fd:.4g}")
            return cached
        if self.late():
            self.skipped.append(label)
            return None
        t0 = time.perf_counter()
        try:
            x = sample(self.score, self.sde, (self.s.n_eval, *self.dims), solver, seed=self.s.eval_seed, steps=budget,
                       dtype=self.dtype, device=self.device, **options).samples  # fmt: skip
        except (ValueError, FloatingPointError) as exc:  # a candidate that cannot run here is reported, not fatal
            row = _Row(budget, solver, variant, math.inf, math.inf, 0.0, fit_seconds, file, str(exc).split("\n")[0])
        else:
            finite = bool(torch.isfinite(x).all())
            row = _Row(
                budget, solver, variant, mse(x, self.ref) if finite else math.inf,
                _fd(x, self.ref_stats) if finite else math.inf, time.perf_counter() - t0, fit_seconds, file,
                None if finite else "non-finite samples", _plain(options),
            )  # fmt: skip
        self.rows.append(row)
        self.cache.put(label, row)
        self.say(f"{label}: MSE {row.mse:.4g}, FD {row.fd:.4g} ({row.wall:.1f} s{_fit_note(fit_seconds)})")
        return row

    def defaults(self, budget: int) -> list[_Row]:
        """Every candidate solver on its default grid."""
        return [r for r in (self.run(budget, name, "default", {}) for name in self.s.candidates()) if r is not None]

    def fitted_grids(self, budget: int, base: list[_Row]) -> None:
        """A fitted grid for the best ``fit_top`` default-grid candidates."""
        ranked = sorted((r for r in base if math.isfinite(r.mse)), key=lambda r: r.mse)
        for r in ranked[: self.s.fit_top]:
            self.fitted(budget, r.solver, "fitted grid", f"grid-{r.solver}-{budget}.safetensors", "grid",
                        lambda solver=r.solver: fit_grid(
                            self.score, self.sde, solver=solver, steps=budget, n=self.s.n_fit, seed=self.s.fit_seed,
                            M=max(self.s.grid_fine, budget), sweeps=self.s.grid_sweeps, shape=self.dims,
                            dtype=self.dtype, device=self.device))  # fmt: skip

    def iia_tables(self, budget: int) -> None:
        """The IIA solvers with a table fitted for this budget."""
        for base_name, iia_name in IIA_OF.items():
            if base_name in self.s.candidates():
                self.fitted(budget, iia_name, "IIA table", f"iia-{iia_name}-{budget}.safetensors", "table",
                            lambda base_name=base_name: fit_iia(
                                self.score, self.sde, solver=base_name, steps=budget, n=self.s.n_fit,
                                seed=self.s.fit_seed, shape=self.dims, dtype=self.dtype, device=self.device))  # fmt: skip

    def fitted(self, budget: int, solver: str, variant: str, name: str, kind: str, fit: Callable[[], Any]) -> None:
        """Score ``solver`` with its fitted grid or table ``name`` (``kind`` "grid" or "table"), taken from the
        cache or made by ``fit()`` (not past the time box; a fit the run refuses is reported and skipped)."""
        artifact, secs = self.cache.artifact(name, kind)
        if artifact is None:
            if self.late():
                self.skipped.append(f"N={budget} {solver} ({variant})")
                return
            t0 = time.perf_counter()
            try:
                artifact = fit()
            except ValueError as exc:
                self.say(f"N={budget} {solver}: no {variant} ({exc})")
                return
            secs = time.perf_counter() - t0
            self.cache.save_artifact(name, artifact, secs)
        self.files[name] = artifact
        self.run(budget, solver, variant, {kind: artifact}, secs, name)

    def recipe(self) -> Recipe:
        """The best candidate per budget (by MSE; by FD for stochastic solvers), as a Recipe."""
        s = self.s
        measure = s.measure or ("fd" if s.stochastic else "mse")
        choices: dict[int, Choice] = {}
        for budget in s.budgets:
            ok = [r for r in self.rows if r.budget == budget and math.isfinite(getattr(r, measure))]
            if not ok:
                continue
            best = min(ok, key=lambda r: getattr(r, measure))
            choice = Choice(best.solver, {"steps": budget, **best.options}, errors={"mse": best.mse, "fd": best.fd})
            if best.variant == "fitted grid":
                choice.grid_file = best.file
            elif best.variant == "IIA table":
                choice.table_file = best.file
            choices[budget] = choice
        if not choices:
            raise ValueError("no candidate finished: raise max_minutes")
        used = {c.grid_file for c in choices.values()} | {c.table_file for c in choices.values()}
        key = {"process": self.sde.config(), "steps": max(s.budgets), "t_end": float(self.sde.default_t_end),
               "model": self.fingerprint, "shape": list(self.dims)}  # fmt: skip
        record = {
            # the cache folder is where this machine kept its work, not a setting of the result
            "settings": _plain({k: v for k, v in asdict(s).items() if k != "cache"}),
            "reference": {"solver": "dpmpp_3m", "steps": s.reference_steps, "n": s.n_eval, "seconds": self.ref_seconds},
            "measure": measure,
            "seconds": time.perf_counter() - self.start,
            "fitting_seconds": sum(r.fit_seconds for r in self.rows if r.variant != "default"),
            "skipped": self.skipped,
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        kept = self.files if s.keep_all_files else {k: v for k, v in self.files.items() if k in used}
        candidates = [_plain(asdict(r)) for r in self.rows]
        return Recipe(key, choices, candidates, record, self.probe, files=kept)


def _stats(x: Tensor) -> tuple[Tensor, Tensor]:
    f = x.detach().to("cpu", torch.float64).reshape(x.shape[0], -1)
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def _fd(x: Tensor, ref: tuple[Tensor, Tensor]) -> float:
    mu, cov = _stats(x)
    return frechet_gaussian(mu, cov, *ref)


def _fit_note(seconds: float) -> str:
    return f", fit {seconds:.1f} s" if seconds else ""


def _plain(value: Any) -> Any:
    """JSON-ready: artifacts by their file, tuples as lists, inf as a string."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k not in ("grid", "table")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class _Cache:
    """Finished candidates and fitted artifacts in a folder, keyed by the model and the settings that
    change a result (not the time box, the budgets or the cache itself)."""

    def __init__(self, s: TuneSettings, fingerprint: dict[str, Any], sde: SDE, dims: tuple[int, ...], probe: Any):
        self.folder = None if s.cache is None else Path(s.cache)
        unkeyed = (
            "budgets",
            "max_minutes",
            "cache",
            "progress",
            "keep_all_files",
            "fit_top",
            "iia",
            "solvers",
            "measure",
        )
        keyed = {k: v for k, v in asdict(s).items() if k not in unkeyed}
        blob = json.dumps(
            {"settings": _plain(keyed), "model": fingerprint, "process": sde.config(), "shape": list(dims),
             "probe": None if probe is None else probe.flatten()[:64].tolist()},
            sort_keys=True, default=str,
        )  # fmt: skip
        self.tag = hashlib.sha256(blob.encode()).hexdigest()[:16]
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, label: str) -> Path:
        assert self.folder is not None
        digest = hashlib.sha256(f"{self.tag}:{label}".encode()).hexdigest()[:20]
        return self.folder / f"{digest}.json"

    def get(self, label: str) -> _Row | None:
        if self.folder is None or not self._path(label).is_file():
            return None
        try:
            data = json.loads(self._path(label).read_text())
            data = {k: (float(v) if k in ("mse", "fd") else v) for k, v in data.items()}
            return _Row(**data)
        except (ValueError, TypeError):
            return None  # a damaged entry is recomputed

    def put(self, label: str, row: _Row) -> None:
        if self.folder is None:
            return
        write_text_atomic(self._path(label), json.dumps(_plain(asdict(row))))

    def artifact(self, name: str, kind: str) -> tuple[Any, float]:
        if self.folder is None:
            return None, 0.0
        path = self.folder / f"{self.tag}-{name}"
        if not path.is_file():
            return None, 0.0
        from ..artifacts import load_grid, load_iia

        meta = self.folder / f"{self.tag}-{name}.seconds"
        try:
            seconds = float(meta.read_text()) if meta.is_file() else 0.0
        except ValueError:
            seconds = math.nan  # a damaged record of the fit's time: the artifact itself is checked on load
        if not (seconds >= 0.0):
            raise FileFormatError(meta, None, "the fit's seconds, one non-negative number", what="a tune cache file")
        return (load_grid(path) if kind == "grid" else load_iia(path)), seconds

    def save_artifact(self, name: str, artifact: Any, seconds: float) -> None:
        if self.folder is None:
            return
        artifact.save(self.folder / f"{self.tag}-{name}")
        write_text_atomic(self.folder / f"{self.tag}-{name}.seconds", repr(seconds))


def write_report(recipe: Recipe, folder: str | Path) -> None:
    """candidates.md (every candidate's MSE and FD per budget, the choices marked) and errors.png (the
    best MSE per budget of each solver, with and without its fitted grid or table) in the recipe folder."""
    folder = Path(folder)
    chosen = {(b, c.solver, "fitted grid" if c.grid_file else ("IIA table" if c.table_file else "default"))
              for b, c in recipe.choices.items()}  # fmt: skip
    lines = [
        f"# Recipe: {recipe.record.get('model_name', 'model')} ({recipe.record.get('measure', 'mse')} chooses)",
        "",
        f"Tuned in {recipe.record.get('seconds', 0):.0f} s (fitting {recipe.record.get('fitting_seconds', 0):.0f} s); "
        f"reference {recipe.record.get('reference', {})}.",
        "",
        "| NFE | solver | variant | MSE | FD | wall s | fit s | chosen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in recipe.candidates:
        mark = "**yes**" if (r["budget"], r["solver"], r["variant"]) in chosen else ""
        lines.append(
            f"| {r['budget']} | `{r['solver']}` | {r['variant']} | {_num(r['mse'])} | {_num(r['fd'])} | "
            f"{float(r['wall']):.2f} | {float(r['fit_seconds']):.1f} | {mark} |"
        )
    skipped = recipe.record.get("skipped") or []
    if skipped:
        lines += ["", f"Not run (time box): {', '.join(skipped)}."]
    write_text_atomic(folder / "candidates.md", "\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[str, dict[int, float]] = {}
    for r in recipe.candidates:
        value = float(r["mse"])
        if math.isfinite(value):
            label = r["solver"] + ("" if r["variant"] == "default" else f" ({r['variant']})")
            series.setdefault(label, {})[r["budget"]] = value
    for label, points in sorted(series.items()):
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=label, linewidth=1)
    ax.plot(recipe.budgets, [recipe.choices[b].errors["mse"] for b in recipe.budgets], "k--", linewidth=2,
            label="recipe")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel("MSE to the reference (held-out seeds)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    tmp = folder / "errors.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(folder / "errors.png")


def _num(v: Any) -> str:
    v = float(v)
    return f"{v:.4g}" if math.isfinite(v) else "—"

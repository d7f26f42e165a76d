"""The benchmark runner behind ``fastsde bench``: every fastsde sampler and every installed peer on
the same score and the same starting noise, quality against NFE and wall time.

Definitions used in the outputs:

- **budget**: fixed-step samplers get, per NFE budget B, the largest step count whose NFE is ≤ B
  (fastsde's NFE per step count comes from each solver's declarations, ``SolverSpec.fixed_nfe``;
  the peers' follow from their step rules). Adaptive samplers get a sweep of tolerances instead (loose
  to tight, stopped once NFE exceeds the largest budget). Each sampler is warmed up once on 8 rows
  (discarded) so that first-call imports do not count as wall time.
- **NFE**: mean score evaluations per sample (``CountingScore``), rejected steps and the final
  denoise included; ``calls`` counts batched calls (the per-batch cost of batch-shared step sizes).
- **quality**: mixture: the exact per-mode Fréchet distance (``fastsde.metrics.mixture``) at t = 0,
  with its finite-sample floor; digits / fashion: the dataset's classifier-feature FD to its held-out
  split, with the real-data floor at the same n.
- **MSE**: deterministic samplers only, to a high-accuracy PF-ODE solution from the same x_T
  (scipy DOP853 at rtol = atol = 1e-9 on the mixture; the final Tweedie denoise applied).
- **converged quality** threshold τ = max(1.1·floor, floor + 2·sd(floor), 1.1·q_ref), where q_ref is the
  quality of that reference solution (the value deterministic samplers converge to from this x_T);
  **NFE to converge** = the smallest NFE of a sampler's runs from which on every run with more NFE
  has quality ≤ τ (None if its largest run is above τ).
- **outside share**: 1 − (time inside the score)/(wall time), measured by timing the raw score
  inside the counting wrapper.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..api import _recordable, sample
from ..artifacts.grid import shipped_grid
from ..files import Fields, read_json, write_atomic, write_text_atomic
from ..metrics.mixture import mixture_frechet, mixture_frechet_floor
from ..models import load_model
from ..noise import Stream, as_noise_source
from ..problems import mixture_2d, mixture_nd
from ..score import ScoreFn
from ..sde import PROCESSES, SDE, process_by_name, process_name
from ..solvers import SOLVERS
from .peers import PEERS, Peer, TimedScore, available_peers

__all__ = ["BenchConfig", "Problem", "run_bench", "merge_results", "write_outputs", "converged_nfe", "read_results"]

DEFAULT_TOLS = (1e-1, 5e-2, 2e-2, 1e-2, 5e-3, 2e-3, 1e-3, 5e-4, 2e-4, 1e-4)


#: the benchmark problems: the exact mixtures, and the shipped image models judged by their classifier FD
PROBLEMS = ("mixture", "digits", "fashion")


@dataclass
class BenchConfig:
    problem: str = "mixture"
    budgets: list[int] = field(default_factory=lambda: [5, 10, 20, 50, 100, 200])
    processes: list[str] = field(default_factory=lambda: ["vp", "subvp", "ve"])
    samplers: list[str] | None = None  # fastsde solver names and/or peer names; None: all
    n: int = 2000
    dim: int = 16
    seed: int = 0
    tolerances: list[float] = field(default_factory=lambda: list(DEFAULT_TOLS))
    peers: bool = True
    progress: bool = True
    floor_draws: int = 30

    def check(self) -> None:
        if self.problem not in PROBLEMS:
            raise ValueError(f"problem must be one of {', '.join(map(repr, PROBLEMS))}, got {self.problem!r}")
        if not self.budgets or any((not isinstance(b, int)) or b < 1 for b in self.budgets):
            raise ValueError(f"budgets must be positive integers, got {self.budgets!r}")
        bad = [p for p in self.processes if p not in PROCESSES]
        if bad:
            raise ValueError(f"processes must be among {sorted(PROCESSES)}, got {bad}")
        if self.n < 2:
            raise ValueError(f"n must be >= 2, got {self.n!r}")
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim!r}")
        if not self.tolerances or any(not (0 < t < 1) for t in self.tolerances):
            raise ValueError(f"tolerances must lie in (0, 1), got {self.tolerances!r}")


@dataclass
class Problem:
    """One benchmark problem under one process."""

    name: str
    process: str
    sde: SDE
    score: ScoreFn
    dims: tuple[int, ...]
    dtype: torch.dtype
    quality: Callable[[Tensor], float]
    floor: tuple[float, float]
    quality_name: str
    reference_rtol: float
    model: str | None = None  # the shipped model's name (its fitted grids are looked up by it)


def mixture_problem(process: str, cfg: BenchConfig) -> Problem:

    sde = process_by_name(process)
    gm = mixture_2d(sde) if cfg.dim == 2 else mixture_nd(sde, dim=cfg.dim)
    floor = mixture_frechet_floor(gm, cfg.n, draws=cfg.floor_draws, seed=cfg.seed + 12345)
    return Problem(
        name=f"mixture{cfg.dim}d",
        process=process,
        sde=sde,
        score=gm.score,
        dims=gm.dims,
        dtype=torch.float64,
        quality=lambda x: mixture_frechet(x, gm).value,
        floor=floor,
        quality_name="per-mode Fréchet distance",
        reference_rtol=1e-9,
    )


def model_problem(name: str, cfg: BenchConfig) -> Problem:
    """A shipped image model ("digits" or "fashion"), judged by its dataset's classifier-feature
    Fréchet distance to the held-out split (``fastsde.metrics.digits`` / ``fastsde.metrics.fashion``);
    the floor is the real-data FD at the same n."""
    import importlib

    metric = importlib.import_module(f"..metrics.{name}", __package__)
    judge = metric.digits_quality if name == "digits" else metric.fashion_quality
    model = load_model(name)
    sde = model.sde
    return Problem(
        name=name,
        process=process_name(sde),
        sde=sde,
        score=model.score,
        dims=tuple(model.shape),
        dtype=torch.float32,
        quality=lambda x: float(judge(x)["fd"]),
        floor=(metric.floor_for(cfg.n), metric.floor_sd_for(cfg.n)),
        quality_name=f"{name} classifier-feature Fréchet distance",
        reference_rtol=1e-5,
        model=name,
    )


# ---------------------------------------------------------------------------------------------
# fastsde samplers
# ---------------------------------------------------------------------------------------------


@dataclass
class FastsdeSampler:
    name: str
    stochastic: bool
    budget_kind: str  # "nfe" or "tol"
    solver: str = ""  # registry name (default: name)
    fixed: dict[str, Any] = field(default_factory=dict)  # options that make a variant

    def __post_init__(self) -> None:
        self.solver = self.solver or self.name

    def options_for(self, setting: float, spec_options: dict) -> dict[str, Any]:
        """The options of one sweep point: the step count, or the solver's declared tolerance option
        with its absolute partner (atol = rtol for ``ode``; eps_abs = 0.78·eps_rel, the bench's
        choice for the mixed tolerance of the adaptive SDE solvers)."""
        if self.budget_kind == "nfe":
            return {"steps": int(setting)}
        tol = SOLVERS[self.solver].tolerance
        if tol == "rtol":
            return {"rtol": setting, "atol": setting}
        return {tol: setting, "eps_abs": setting * 0.78}


def _budget_kind(spec: Any) -> str | None:
    """How the bench sweeps a solver, from its declarations: "nfe" (steps of a fixed grid), "tol"
    (its declared tolerance option), or None."""
    if not spec.adaptive:
        return "nfe"
    return "tol" if spec.tolerance is not None else None


def fastsde_samplers() -> tuple[list[FastsdeSampler], list[str]]:
    """The registered fastsde solvers the bench can drive (discovered at run time); kind and
    stochasticity come from each solver's declarations, for the variant's options."""
    out, notes = [], []
    for name, spec in SOLVERS.items():
        kind = _budget_kind(spec)
        if "table" in spec.options:  # IIA: without a table fitted for the problem it repeats its base solver
            notes.append(f"{name}: skipped, needs a coefficient table fitted for the problem (benchmarks/iia.py)")
        elif kind is None:
            notes.append(f"{name}: skipped, no steps or tolerance option to sweep")
        else:
            out.append(FastsdeSampler(name, spec.is_stochastic(None), kind))
    for name, base, fixed in VARIANTS:
        if base in SOLVERS and all(k in SOLVERS[base].options for k in fixed):
            spec = SOLVERS[base]
            kind = _budget_kind(spec)
            if kind is not None:
                out.append(FastsdeSampler(name, spec.is_stochastic(fixed), kind, base, dict(fixed)))
    return out, notes


#: A variant's grid placeholder: the shipped grid fitted for the problem's model at each step count.
FITTED = "fitted"

#: Option variants of registered solvers that are benchmarked as samplers of their own.
VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("ddim_eta1", "ddim", {"eta": 1.0}),
    # The same method on the peers' Karras (EDM rho = 7) grid: separates grid effects from method effects.
    ("dpmpp_2m_karras", "dpmpp_2m", {"grid": "edm"}),
    ("dpmpp_2m_sde_karras", "dpmpp_2m_sde", {"grid": "edm"}),
    # ... and on the log-SNR grid, which differs from the default only on EDM (Karras there).
    ("dpmpp_2m_logsnr", "dpmpp_2m", {"grid": "logsnr"}),
    ("dpmpp_2m_sde_logsnr", "dpmpp_2m_sde", {"grid": "logsnr"}),
    # The adaptive SDE-DPM solver under PI step control instead of GGF's controller.
    ("adaptive_sde_dpm_pi", "adaptive_sde_dpm", {"pi_beta": 0.35}),
    # SDE-DPM-Solver++(2M) with the predictor-corrector step of adaptive_sde_dpm_2m, on its fixed grid.
    ("dpmpp_2m_sde_pc", "dpmpp_2m_sde", {"corrector": True}),
    # The alternatives the defaults were chosen against: UniPC's other B(h), its third order and the
    # Karras grid; iPNDM at fourth order; LMS at third.
    ("unipc_bh1", "unipc", {"variant": "bh1"}),
    ("unipc_order3", "unipc", {"order": 3}),
    ("unipc_karras", "unipc", {"grid": "edm"}),
    ("ipndm_order4", "ipndm", {"max_order": 4}),
    ("lms_order3", "lms", {"order": 3}),
    # The stochastic frontier steppers' other members: the exact third-order term, k-diffusion's end,
    # SA-Solver with τ = 1 everywhere and with diffusers' orders, ER-SDE on the reverse SDE.
    ("dpmpp_3m_sde_exact", "dpmpp_3m_sde", {"form": "exact"}),
    ("dpmpp_3m_sde_kdiff", "dpmpp_3m_sde", {"lower_order_final": False}),
    ("sa_solver_tau1", "sa_solver", {"tau_sigma": None}),
    ("sa_solver_p2c2", "sa_solver", {"predictor_order": 2, "corrector_order": 2}),
    ("er_sde_sde", "er_sde", {"phi": "sde"}),
    # On a shipped model: the grids fitted for it (fastsde.shipped_grid; budgets without one are skipped).
    ("unipc_fitted", "unipc", {"grid": FITTED}),
    ("ipndm_fitted", "ipndm", {"grid": FITTED}),
    ("deis_fitted", "deis", {"grid": FITTED}),
    ("dpmpp_2m_fitted", "dpmpp_2m", {"grid": FITTED}),
    ("dpmpp_3m_fitted", "dpmpp_3m", {"grid": FITTED}),
)


def _variant_is_default(s: FastsdeSampler, sde: SDE) -> bool:
    """True when a variant's fixed options are its base solver's defaults on this process (the
    variant would repeat the base row: the Karras grid is the default on EDM, the log-SNR grid elsewhere)."""
    options = SOLVERS[s.solver].options
    return all(options[k].default_for(sde) == v for k, v in s.fixed.items())


def fastsde_nfe(name: str, sde: SDE, steps: int, options: dict[str, Any] | None = None) -> float:
    """NFE per sample of a fixed-step fastsde solver at ``steps`` grid points, the final denoise
    included, from its declarations (no dry run)."""
    return float(SOLVERS[name].fixed_nfe({**(options or {}), "steps": steps}, denoise=True))


def steps_for_budget(name: str, sde: SDE, budget: int, options: dict[str, Any] | None = None) -> int | None:
    """Largest step count (≥ 2) whose declared NFE, first_nfe + (N − 1)·nfe_per_step + 1, is ≤ budget,
    or None."""
    if fastsde_nfe(name, sde, 2, options) > budget:
        return None
    per_step = fastsde_nfe(name, sde, 3, options) - fastsde_nfe(name, sde, 2, options)
    steps = 2 + int((budget - fastsde_nfe(name, sde, 2, options)) // per_step)
    assert fastsde_nfe(name, sde, steps, options) <= budget < fastsde_nfe(name, sde, steps + 1, options)
    return steps


# ---------------------------------------------------------------------------------------------
# reference and metrics
# ---------------------------------------------------------------------------------------------


def reference_solution(score: ScoreFn, sde: SDE, x_T: Tensor, t_end: float, rtol: float) -> Tensor:
    """High-accuracy PF-ODE solution from x_T (scipy DOP853, rtol = atol = rtol) + Tweedie denoise."""
    from scipy.integrate import solve_ivp

    shape, dtype = x_T.shape, x_T.dtype

    def fun(t: float, y):
        x = torch.from_numpy(y).to(dtype).reshape(shape)
        tt = torch.full((shape[0],), t, dtype=dtype)
        with torch.no_grad():
            return sde.ode_drift(x, tt, score(x, tt)).reshape(-1).double().numpy()

    sol = solve_ivp(fun, (sde.T, t_end), x_T.reshape(-1).double().numpy(), method="DOP853", rtol=rtol, atol=rtol)
    if not sol.success:
        raise RuntimeError(f"reference solve failed: {sol.message}")
    x = torch.from_numpy(sol.y[:, -1]).to(dtype).reshape(shape)
    tt = torch.full((shape[0],), t_end, dtype=dtype)
    with torch.no_grad():
        return sde.denoise(x, tt, score(x, tt))


def converged_threshold(floor: tuple[float, float], q_ref: float) -> float:
    """τ = max(1.1·floor, floor + 2·sd, 1.1·q_ref) (see the module docstring)."""
    vals = [1.1 * floor[0], floor[0] + 2.0 * floor[1]]
    if math.isfinite(q_ref):
        vals.append(1.1 * q_ref)
    vals = [v for v in vals if math.isfinite(v)]
    return max(vals) if vals else math.nan


def converged_nfe(records: list[dict], tau: float, median_of_3: bool = False) -> float | None:
    """Smallest NFE from which on every run (more NFE) has quality ≤ τ; None if the last is above.

    With ``median_of_3`` the runs after the first one judge by the median of each run's quality and
    its two neighbours' (by NFE; the last run with its one neighbour, by their mean or by itself,
    whichever is lower), so a single run above τ among converged ones, which happens to ~2 % of the
    runs of a stochastic sampler at τ = floor + 2·sd, does not reset the answer; the run at the answer
    itself must still be ≤ τ. The answer is never larger than the strict rule's.
    """
    runs = sorted((r for r in records if r.get("error") is None), key=lambda r: r["nfe"])
    q = [r["quality"] for r in runs]
    if median_of_3 and len(q) >= 2:
        smooth = [sorted(q[max(i - 1, 0) : i + 2])[1] if 0 < i < len(q) - 1 else None for i in range(len(q))]
        # the last run has one neighbour: judged by their mean, but never more strictly than by itself
        smooth[0], smooth[-1] = q[0], min(q[-1], 0.5 * (q[-2] + q[-1]))
    else:
        smooth = q
    best = None
    for i in reversed(range(len(runs))):
        if smooth[i] > tau:
            break
        if q[i] <= tau:
            best = runs[i]["nfe"]
    return best


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


def _select(names: list[str] | None, fs: list[FastsdeSampler], peers: list[Peer]):
    if names is None:
        return fs, peers
    known = {s.name for s in fs} | set(PEERS) | {"fastsde", "peers"}
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown sampler(s) {bad}; valid: {sorted(known)}")
    fs_sel = [s for s in fs if s.name in names or "fastsde" in names]
    peer_sel = [p for p in peers if p.name in names or "peers" in names]
    return fs_sel, peer_sel


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark; returns a JSON-able dict (config, notes, per-process floors, records,
    converged NFE)."""
    cfg.check()
    fs, notes = fastsde_samplers()
    peers, peer_notes = available_peers() if cfg.peers else ([], [])
    fs, peers = _select(cfg.samplers, fs, peers)
    if cfg.samplers is not None and "peers" not in cfg.samplers:
        peer_notes = [m for m in peer_notes if m.split(":")[0] in cfg.samplers]
    notes += peer_notes
    for note in notes:
        log(note)

    if cfg.problem == "mixture":
        problems = [mixture_problem(p, cfg) for p in cfg.processes]
    else:
        problems = [model_problem(cfg.problem, cfg)]
    records: list[dict] = []
    summary: dict[str, Any] = {}
    for prob in problems:
        sde = prob.sde
        t_end = sde.default_t_end
        n = cfg.n
        noise = as_noise_source(cfg.seed, n)
        x_T = sde.prior_sample(noise.normal(prob.dims, Stream.PRIOR, 0, dtype=prob.dtype))
        t0 = time.perf_counter()
        ref = reference_solution(prob.score, sde, x_T, t_end, prob.reference_rtol)
        q_ref = prob.quality(ref)
        tau = converged_threshold(prob.floor, q_ref)
        log(
            f"[{prob.name}/{prob.process}] floor {prob.floor[0]:.4g} ± {prob.floor[1]:.2g}, reference quality "
            f"{q_ref:.4g} ({time.perf_counter() - t0:.1f} s), converged threshold τ = {tau:.4g}"
        )
        jobs: list[tuple[str, Any]] = []
        for s in fs:
            if s.fixed and _variant_is_default(s, sde):
                log(f"{s.name}: skipped on {prob.process} (its options are {s.solver}'s defaults there)")
                continue
            if s.fixed.get("grid") == FITTED and prob.model is None:
                log(f"{s.name}: skipped on {prob.name} (fitted grids are shipped for the shipped models only)")
                continue
            jobs.append(("fastsde", s))
        for p in peers:
            if p.supports(sde):
                jobs.append(("peer", p))
            else:
                log(f"{p.name}: skipped on {prob.process} (built for the discrete VP process only)")
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(jobs), desc=f"{prob.name}/{prob.process}", leave=False)
        prob_records: list[dict] = []
        for source, s in jobs:
            prob_records += _run_sampler(source, s, prob, cfg, x_T, ref)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        conv = {}
        for name in dict.fromkeys(r["sampler"] for r in prob_records):
            rs = [r for r in prob_records if r["sampler"] == name]
            conv[name] = {
                "nfe": converged_nfe(rs, tau),
                "source": rs[0]["source"],
                "stochastic": rs[0]["stochastic"],
            }
        summary[prob.process] = {
            "problem": prob.name,
            "floor": prob.floor[0],
            "floor_sd": prob.floor[1],
            "reference_quality": q_ref,
            "threshold": tau,
            "quality_name": prob.quality_name,
            "t_end": t_end,
            "sde": sde.config(),
            "converged": conv,
        }
        records += prob_records
    return {"config": asdict(cfg), "notes": notes, "summary": summary, "records": records}


def merge_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool benchmark results of the same problem run in pieces (say, deterministic and stochastic
    samplers in two processes): records and converged NFE are combined per process.

    The pieces must share problem, n, dim and seed, hence the same x_T, floor, reference and
    threshold (checked); a sampler may appear in only one piece per process.
    """
    if not results:
        raise ValueError("nothing to merge: expected at least one bench result")
    base = results[0]["config"]
    for res in results[1:]:
        for key in ("problem", "n", "dim", "seed"):
            if res["config"][key] != base[key]:
                raise ValueError(
                    f"cannot merge bench runs with different {key}: {base[key]!r} and {res['config'][key]!r}"
                )
    config = dict(base)
    config["budgets"] = sorted({b for res in results for b in res["config"]["budgets"]})
    config["tolerances"] = sorted({t for res in results for t in res["config"]["tolerances"]}, reverse=True)
    config["processes"] = list(dict.fromkeys(p for res in results for p in res["config"]["processes"]))
    if all(res["config"]["samplers"] is not None for res in results):
        config["samplers"] = list(dict.fromkeys(s for res in results for s in res["config"]["samplers"]))
    else:
        config["samplers"] = None
    summary: dict[str, Any] = {}
    for res in results:
        for proc, summ in res["summary"].items():
            if proc not in summary:
                summary[proc] = {**summ, "converged": dict(summ["converged"])}
                continue
            have = summary[proc]
            for key in ("floor", "reference_quality", "threshold"):
                if not math.isclose(have[key], summ[key], rel_tol=1e-9, abs_tol=0.0):
                    raise ValueError(f"cannot merge {proc}: {key} differs ({have[key]!r} vs {summ[key]!r})")
            both = sorted(set(have["converged"]) & set(summ["converged"]))
            if both:
                raise ValueError(f"cannot merge {proc}: sampler(s) {both} appear in more than one run")
            have["converged"].update(summ["converged"])
    notes = list(dict.fromkeys(n for res in results for n in res["notes"]))
    records = [r for res in results for r in res["records"]]
    return {"config": config, "notes": notes, "summary": summary, "records": records}


def read_results(path: str | Path) -> dict[str, Any]:
    """The results.json written by :func:`write_outputs`, every field that merging, tables and plots
    read checked (a FileFormatError naming the file and the field, e.g. ``records[3].nfe``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no bench results at {str(path)!r}")
    f = Fields(path, read_json(path, "a results.json written by fastsde bench"))
    cfg = f.obj("config")
    cfg.string("problem", choices=PROBLEMS)
    for name in ("n", "dim"):
        cfg.integer(name, low=1)
    cfg.integer("seed", low=0)
    cfg.integers("budgets", min_length=1, low=1)
    cfg.numbers("tolerances", min_length=1, low=0.0, high=1.0, low_open=True, high_open=True)
    cfg.strings("processes", min_length=1)
    if cfg.raw("samplers", expected="a list of sampler names or null") is not None:
        cfg.strings("samplers")
    f.strings("notes")
    summary = f.obj("summary")
    for proc, value in summary.data.items():
        summ = Fields(path, value, summary.name(proc))
        summ.string("problem")
        summ.string("quality_name")
        for name in ("floor", "floor_sd", "reference_quality", "threshold", "t_end"):
            summ.number(name, finite=False)
        summ.obj("sde")
        conv = summ.obj("converged")
        for sampler, c in conv.data.items():
            cf = Fields(path, c, conv.name(sampler))
            if cf.raw("nfe", expected="a number or null") is not None:
                cf.number("nfe", low=0.0)
            cf.string("source")
            cf.boolean("stochastic")
    for i, rec in enumerate(f.items("records")):
        r = Fields(path, rec, f"records[{i}]")
        for name in ("problem", "sampler", "source"):
            r.string(name)
        r.string("process", choices=tuple(summary.data))
        r.boolean("stochastic")
        if r.raw("budget", expected="an integer or null") is not None:
            r.integer("budget", low=1)
        if r.raw("error", expected="a string or null") is not None:
            r.string("error")
        for name in ("nfe", "wall_time", "score_time", "outside_share", "quality"):
            r.number(name, finite=False)
        r.integer("calls", low=0)
        if r.raw("mse", expected="a number or null") is not None:
            r.number("mse", finite=False)
        setting = r.raw("setting", expected="a number, a string or null")
        if isinstance(setting, bool) or not isinstance(setting, (int, float, str, type(None))):
            raise r.error("setting", "a number, a string or null", setting)
        if r.raw("options", None) is not None:
            r.string("options")
        if rec["sampler"] not in summary.data[rec["process"]]["converged"]:
            raise r.error("sampler", f"a sampler of summary.{rec['process']}.converged", rec["sampler"])
    return f.data


def _run_sampler(source: str, s: Any, prob: Problem, cfg: BenchConfig, x_T: Tensor, ref: Tensor) -> list[dict]:

    sde = prob.sde
    out: list[dict] = []
    if s.budget_kind == "nfe":
        settings, seen = [], set()
        for b in sorted(cfg.budgets):
            st = steps_for_budget(s.solver, sde, b, s.fixed) if source == "fastsde" else b
            if st is not None and source == "fastsde" and _fitted_grid(prob, s, st) is False:
                continue  # no grid shipped for this step count
            if st is not None and st not in seen:
                seen.add(st)
                settings.append((b, st))
    else:
        settings = [(None, tol) for tol in sorted(cfg.tolerances, reverse=True)]
    limit = max(cfg.budgets)
    if settings:  # warm-up on a few rows, discarded: first calls pay imports and caches, not the sampler
        try:
            _solve(source, s, prob, cfg, x_T[: min(8, cfg.n)], settings[0][1])
        except Exception:  # noqa: BLE001 - the real run records the error
            pass
    for budget, setting in settings:
        rec: dict[str, Any] = {
            "problem": prob.name,
            "process": prob.process,
            "sampler": s.name,
            "source": "fastsde" if source == "fastsde" else s.package.split(".")[0],
            "stochastic": bool(s.stochastic),
            "budget": budget,
            "setting": setting,
            "error": None,
        }
        try:
            x, nfe, calls, wall, inside, rec["options"] = _solve(source, s, prob, cfg, x_T, setting)
            rec.update(
                nfe=float(nfe),
                calls=int(calls),
                wall_time=float(wall),
                score_time=float(inside),
                outside_share=float(max(0.0, 1.0 - inside / wall)) if wall > 0 else math.nan,
                quality=float(prob.quality(x)),
                mse=None if s.stochastic else float(((x.double() - ref.double()) ** 2).mean()),
            )
        except Exception as exc:  # noqa: BLE001 - a failing sampler is recorded, not fatal
            rec.update(nfe=math.nan, calls=0, wall_time=math.nan, score_time=math.nan, outside_share=math.nan)
            rec.update(quality=math.nan, mse=None, error=f"{type(exc).__name__}: {str(exc)[:200]}")
        out.append(rec)
        if s.budget_kind == "tol" and rec["error"] is None and rec["nfe"] > limit:
            break
    return out


def _fitted_grid(prob: Problem, s: Any, steps: int):
    """For a fitted-grid variant: the shipped grid of the problem's model at ``steps`` points, or
    False when none is shipped; None for every other sampler."""
    if getattr(s, "fixed", {}).get("grid") != FITTED:
        return None

    grid = shipped_grid(prob.model, s.solver, steps) if prob.model else None
    return grid if grid is not None else False


def _solve(source: str, s: Any, prob: Problem, cfg: BenchConfig, x_T: Tensor, setting: float):
    """One run from x_T: (samples, NFE, calls, wall, time inside the score, options as JSON)."""
    if source == "fastsde":
        timed = TimedScore(prob.score)
        opts = {**s.fixed, **s.options_for(setting, dict(SOLVERS[s.solver].options))}
        fitted = _fitted_grid(prob, s, int(setting)) if s.budget_kind == "nfe" else None
        if fitted:  # the times, checked against the run here (the timing wrapper hides the model)
            t_end = prob.sde.default_t_end
            opts["grid"] = fitted.times
            fitted.check_run(prob.sde, s.solver, SOLVERS[s.solver].resolve(prob.sde, dict(opts), t_end), t_end)
        res = sample(
            timed, prob.sde, tuple(x_T.shape), solver=s.solver, seed=cfg.seed, x_init=x_T, dtype=prob.dtype, **opts
        )
        options = json.dumps({k: _recordable(v) for k, v in res.options.items() if k != "sde"}, default=str)
        return res.samples, res.nfe, res.calls, res.wall_time, timed.seconds, options
    pr = s.run(prob.score, prob.sde, x_T, setting, prob.sde.default_t_end, seed=cfg.seed)
    return pr.samples, pr.nfe, pr.calls, pr.wall_time, pr.score_time, json.dumps(pr.setting, default=str)


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------

CSV_FIELDS = [
    "problem",
    "process",
    "sampler",
    "source",
    "stochastic",
    "budget",
    "setting",
    "nfe",
    "calls",
    "wall_time",
    "score_time",
    "outside_share",
    "quality",
    "mse",
    "error",
    "options",
]


#: Budgets shown as table columns (when run); finer budgets only sharpen "NFE to converge".
SHOWN_BUDGETS = (5, 10, 20, 50, 100, 200, 500, 1000)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _ms_per_sample(records: list[dict[str, Any]], nfe: float | None, n: int) -> float | None:
    """Wall time per sample (ms) of the run at ``nfe`` (a sampler's converged NFE; the run with the
    nearest NFE), so that a table shows what fewer evaluations buy in time; None without one."""
    runs = [r for r in records if math.isfinite(r.get("wall_time", math.nan))]
    if nfe is None or not runs:
        return None
    run = min(runs, key=lambda r: abs(r["nfe"] - nfe))
    return 1e3 * run["wall_time"] / n


def _said(best: tuple[float, str] | None, records: list[dict[str, Any]], n: int) -> str:
    """A family's best sampler: its converged NFE with the wall time per sample of that run."""
    if not best:
        return "none converged"
    ms = _ms_per_sample([r for r in records if r["sampler"] == best[1]], best[0], n)
    return f"{best[1]} at {_fmt(best[0], 4)} NFE ({_fmt(ms, 3)} ms per sample)"


def markdown_tables(result: dict[str, Any]) -> str:
    """Per process: converged NFE, quality at each budget, MSE, wall time per sample at the converged NFE
    (one run, same machine) and outside share."""
    cfg = result["config"]
    budgets = sorted(cfg["budgets"])
    shown = [b for b in budgets if b in SHOWN_BUDGETS] or budgets
    lines = []
    for proc, summ in result["summary"].items():
        recs = [r for r in result["records"] if r["process"] == proc and r["error"] is None]
        lines.append(f"### {summ['problem']} / {proc}")
        lines.append("")
        lines.append(
            f"Quality: {summ['quality_name']} (lower is better). Finite-sample floor {summ['floor']:.4g} ± "
            f"{summ['floor_sd']:.2g} (n = {cfg['n']}); PF-ODE reference {summ['reference_quality']:.4g}; "
            f"converged threshold τ = {summ['threshold']:.4g}; t_end = {summ['t_end']:g}."
        )
        lines.append("")
        head = "| sampler | source | kind | NFE to converge | (median of 3) | " + " | ".join(f"q@{b}" for b in shown)
        head += " | MSE@" + str(budgets[-1]) + " | ms/sample at converge | outside share |"
        lines.append(head)
        lines.append("|" + "---|" * (8 + len(shown)))
        conv = summ["converged"]
        order = sorted(conv, key=lambda k: (conv[k]["stochastic"], conv[k]["nfe"] is None, conv[k]["nfe"] or 0))
        for name in order:
            rs = [r for r in recs if r["sampler"] == name]
            qs = []
            for b in shown:
                at = [r["quality"] for r in rs if r["budget"] == b]
                within = [r["quality"] for r in rs if r["budget"] is None and r["nfe"] <= b + 1e-9]
                qs.append(_fmt(at[0]) if at else _fmt(min(within)) if within else "–")
            within = [r for r in rs if r["nfe"] <= budgets[-1] + 1e-9 and r["mse"] is not None]
            mse = _fmt(min(r["mse"] for r in within)) if within else "–"
            fs_rs = [r["outside_share"] for r in rs if math.isfinite(r["outside_share"])]
            share = f"{100 * sum(fs_rs) / len(fs_rs):.0f}%" if fs_rs else "–"
            c = conv[name]
            kind = "stochastic" if c["stochastic"] else "deterministic"
            cn = (
                _fmt(c["nfe"], 4) if c["nfe"] is not None else f"> {_fmt(max((r['nfe'] for r in rs), default=None), 4)}"
            )
            robust = converged_nfe(rs, summ["threshold"], median_of_3=True)
            cr = _fmt(robust, 4) if robust is not None else "–"
            at_conv = _ms_per_sample(rs, c["nfe"], cfg["n"])
            lines.append(
                f"| {name} | {c['source']} | {kind} | {cn} | {cr} | "
                + " | ".join(qs)
                + f" | {mse} | {_fmt(at_conv, 3)} | {share} |"
            )
        lines.append("")
        for fam in (False, True):
            best = {}
            for src in ("fastsde", "peer"):
                cands = [
                    (conv[k]["nfe"], k)
                    for k in conv
                    if conv[k]["stochastic"] == fam
                    and conv[k]["nfe"] is not None
                    and ((conv[k]["source"] == "fastsde") == (src == "fastsde"))
                ]
                best[src] = min(cands) if cands else None
            famname = "stochastic" if fam else "deterministic"
            f, p = best["fastsde"], best["peer"]

            lines.append(f"- best {famname}: fastsde {_said(f, recs, cfg['n'])}; peers {_said(p, recs, cfg['n'])}")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], out: Path) -> list[Path]:
    """Quality vs NFE and quality vs wall time, one pair of PNGs per process."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for proc, summ in result["summary"].items():
        recs = [r for r in result["records"] if r["process"] == proc and r["error"] is None and r["quality"] > 0]
        for xkey, xlabel in (("nfe", "NFE per sample"), ("wall_time", "wall time (s)")):
            fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
            for ax, stochastic in zip(axes, (False, True)):
                names = list(dict.fromkeys(r["sampler"] for r in recs if r["stochastic"] == stochastic))
                colors = plt.cm.tab20(torch.linspace(0, 1, max(len(names), 2)).numpy())
                for name, color in zip(names, colors):
                    rs = sorted((r for r in recs if r["sampler"] == name), key=lambda r: r["nfe"])
                    ls, mk = ("-", "o") if rs[0]["source"] == "fastsde" else ("--", "x")
                    ax.plot(
                        [r[xkey] for r in rs],
                        [r["quality"] for r in rs],
                        ls,
                        marker=mk,
                        ms=4,
                        lw=1.4,
                        color=color,
                        label=f"{name} ({rs[0]['source']})",
                    )
                ax.axhline(summ["floor"], color="k", lw=0.8, ls=":", label="finite-sample floor")
                ax.axhline(summ["threshold"], color="gray", lw=0.8, ls="-.", label="converged threshold τ")
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel(xlabel)
                ax.set_title(f"{summ['problem']} / {proc}: {'stochastic' if stochastic else 'deterministic'}")
                ax.legend(fontsize=7)
            axes[0].set_ylabel(summ["quality_name"] + " (solid o: fastsde, dashed x: peers)")
            fig.tight_layout()
            p = out / f"{summ['problem']}_{proc}_quality_vs_{'nfe' if xkey == 'nfe' else 'wall'}.png"
            write_atomic(p, lambda q, f=fig: f.savefig(q, dpi=100))
            plt.close(fig)
            paths.append(p)
        det = [r for r in recs if r["mse"] is not None and r["mse"] > 0]
        if det:
            fig, ax = plt.subplots(figsize=(7.5, 5.5))
            names = list(dict.fromkeys(r["sampler"] for r in det))
            colors = plt.cm.tab20(torch.linspace(0, 1, max(len(names), 2)).numpy())
            for name, color in zip(names, colors):
                rs = sorted((r for r in det if r["sampler"] == name), key=lambda r: r["nfe"])
                ls, mk = ("-", "o") if rs[0]["source"] == "fastsde" else ("--", "x")
                ax.plot([r["nfe"] for r in rs], [r["mse"] for r in rs], ls, marker=mk, ms=4, color=color, label=name)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("NFE per sample")
            ax.set_ylabel("MSE to the PF-ODE reference from the same x_T")
            ax.set_title(f"{summ['problem']} / {proc}: deterministic samplers")
            ax.legend(fontsize=7)
            fig.tight_layout()
            p = out / f"{summ['problem']}_{proc}_mse_vs_nfe.png"
            write_atomic(p, lambda q, f=fig: f.savefig(q, dpi=100))
            plt.close(fig)
            paths.append(p)
    return paths


def write_outputs(result: dict[str, Any], out: str | Path) -> list[Path]:
    """results.json, results.csv, table.md and the PNG plots under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.csv", out / "table.md"]
    write_text_atomic(paths[0], json.dumps(result, indent=1, default=str))

    def write_csv(path: Path) -> None:
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in result["records"]:
                w.writerow(r)

    write_atomic(paths[1], write_csv)
    notes = "".join(f"- {n}\n" for n in result["notes"])
    write_text_atomic(paths[2], markdown_tables(result) + ("\nNotes:\n" + notes if notes else ""))
    paths += plot(result, out)
    return paths

"""PF-ODE + Langevin corrector (``ode_corrector``): where the corrector helps at equal NFE, and how
the NFE to a fixed TV-like quality grows with the dimension (docs/benchmarks/corrector.md).

    .venv/bin/python benchmarks/ode_corrector.py                 # every part
    .venv/bin/python benchmarks/ode_corrector.py --part dim      # one part: equal | dim | digits

Results are cached per run in docs/bench/ode_corrector.json (delete it to recompute; an interrupted
run continues where it stopped); the tables are printed and the plots written to docs/bench/.

Parts:

- ``equal``: per-mode Fréchet distance (and the mode-weight term) at equal NFE on the exact 2-D and
  16-D mixtures under VP and EDM, 4096 samples: the plain predictor (DDIM on the log-SNR grid, i.e.
  ode_corrector with corrector_steps=0), dpmpp_2m, DPUM, DPOM, Song's pc and EM.
- ``dim``: the isotropic two-mode mixture in d dimensions, (N(−u/2, s²I) + N(u/2, s²I))/2 with
  u = (1, …, 1)/√d and s = 0.2, under VP (the paper's OU setting), 4096 samples. The modes differ
  only along u and share their covariance, so across u the exact score is −x⊥/(m²s² + σ²) and every
  sampler here (EM, DDIM, DPUM, DPOM with the σ rule) acts on those coordinates linearly and
  independently: the output law is [its law along u] ⊗ N(0, v⊥·I_{d−1}). TV-like quality = KS
  distance along u (to the exact 1-D mixture) + TV(N(0, v⊥ I_{d−1}), N(0, s² I_{d−1})) in closed form
  (χ² CDFs) from the measured v⊥. d = 4, 16, 64, 256 are sampled directly; d = 1024 uses the d = 256
  runs (v⊥ pooled over 4096·255 values, so its Monte Carlo error costs ≈ 0.01 of TV at d = 1024),
  and one direct d = 1024 run per sampler checks it. NFE needed = the smallest NFE on a ladder of
  grid sizes with TV-like ≤ 0.1, log-interpolated from the ladder point before; for DPUM and DPOM
  the best of a few corrector settings (K, duration or κ). The draws come from torch's generator
  through a NoiseSource subclass (iid, not keyed per sample, several times faster), the score from
  the mixture's closed form (checked against the generic exact score).
- ``digits``: the shipped VP digits model, digits Fréchet distance at NFE 20, 40 and 80 (500 samples,
  seeds 0 and 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import scipy.stats
import torch

import fastsde
from fastsde.metrics.mixture import mixture_frechet, mixture_frechet_floor

F64 = torch.float64
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "bench"
CACHE = OUT / "ode_corrector.json"
DIMS = [4, 16, 64, 256, 1024]
#: Dimensions sampled directly; d = 1024 is computed from the d = 256 runs (the decoupling, see the
#: docstring) and checked by one direct run per sampler.
DIMS_RUN = [4, 16, 64, 256]
SOURCE = {4: 4, 16: 16, 64: 64, 256: 256, 1024: 256}
VERIFY_MAX_STEPS = 256
THRESHOLD = 0.1
S_ISO = 0.2
LADDER = [3, 4, 5, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128, 181, 256, 362, 512, 724, 1024]


class FastNoise(fastsde.NoiseSource):
    """iid standard normals from one torch generator (for the large-d sweep: not keyed per sample)."""

    def __init__(self, n: int, seed: int) -> None:
        super().__init__(list(range(n)))
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, shape, stream, counter=0, rows=None, *, dtype=torch.float32, device="cpu"):
        m = len(self) if rows is None else rows.shape[0]
        return torch.randn((m, *shape), generator=self.generator, dtype=dtype).to(device)


class Cache:
    """Results keyed by a string, written after every run (temp name + rename)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str, fn):
        if key not in self.data:
            self.data[key] = fn()
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, self.path)
        return self.data[key]


def solver_nfe(solver: str, opts: dict, steps: int, sde: fastsde.SDE | None = None) -> int:
    """NFE per sample of a fixed-grid run, the denoise included (ode_corrector's placement may need the process)."""
    spec, o = fastsde.SOLVERS[solver], {**opts, "steps": steps}
    return int(
        spec.fixed_nfe(o, denoise=True, sde=sde) if solver == "ode_corrector" else spec.fixed_nfe(o, denoise=True)
    )


def steps_for(solver: str, opts: dict, budget: int, sde: fastsde.SDE | None = None) -> int:
    """The largest grid whose NFE (denoise included) is at most the budget."""
    n = 2
    while solver_nfe(solver, opts, n + 1, sde) <= budget:
        n += 1
    return n


# ---------------------------------------------------------------------------------------------
# Part equal: mixtures at equal NFE
# ---------------------------------------------------------------------------------------------

PREDICTOR = ("ode_corrector", {"corrector_steps": 0})
EQUAL_SAMPLERS = {
    "PF-ODE (DDIM, log-SNR grid)": PREDICTOR,
    "dpmpp_2m": ("dpmpp_2m", {}),
    "DPUM (K=1, duration 1)": ("ode_corrector", {}),
    "DPUM (K=1, duration 0.5)": ("ode_corrector", {"duration": 0.5}),
    "DPUM below σ 0.5": ("ode_corrector", {"sigma_max": 0.5}),
    "DPUM below σ 0.5, dpmpp_2m predictor": ("ode_corrector", {"sigma_max": 0.5, "predictor": "dpmpp_2m"}),
    "DPOM (κ=0.05)": ("ode_corrector", {"corrector": "overdamped"}),
    "pc (Song: reverse diffusion + Langevin)": ("pc", {}),
    "em": ("em", {}),
}
BUDGETS = [10, 20, 40, 80, 160]


def part_equal(cache: Cache) -> list[str]:
    lines = []
    n = 4096
    for proc in ("vp", "edm"):
        sde = fastsde.sde.process_by_name(proc)
        for label_p, gm in (
            ("2-D mixture", fastsde.problems.mixture_2d(sde)),
            ("16-D mixture", fastsde.problems.mixture_nd(sde, dim=16)),
        ):
            dims = tuple(gm.dims)
            floor = cache.get(f"equal/{proc}/{label_p}/floor", lambda gm=gm: mixture_frechet_floor(gm, n, draws=5)[0])
            lines += [
                f"\n**{label_p}, {proc.upper()}** (n = {n}; floor of exact samples {floor:.2e}). "
                "Per-mode FD (mode-weight term in brackets), at NFE ≤ the budget:\n",
                "| sampler | " + " | ".join(f"NFE {b}" for b in BUDGETS) + " |",
                "|---|" + "---|" * len(BUDGETS),
            ]
            for label, (solver, opts) in EQUAL_SAMPLERS.items():
                cells = []
                for b in BUDGETS:
                    steps = steps_for(solver, opts, b, sde)

                    def run(solver=solver, opts=opts, steps=steps, sde=sde, gm=gm, dims=dims):
                        res = fastsde.sample(gm, sde, (n, *dims), solver=solver, steps=steps, seed=0, dtype=F64, **opts)
                        q = mixture_frechet(res.samples, gm)
                        return {"fd": q.value, "w": q.weight_term, "nfe": res.nfe}

                    r = cache.get(f"equal/{proc}/{label_p}/{label}/{steps}", run)
                    cells.append(f"{r['fd']:.2e} ({r['w']:.0e})")
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


# ---------------------------------------------------------------------------------------------
# Part dim: NFE to TV-like <= 0.1 against d
# ---------------------------------------------------------------------------------------------


def iso_mixture(sde: fastsde.SDE, d: int) -> tuple[fastsde.GaussianMixture, torch.Tensor]:
    u = torch.ones(d, dtype=F64) / math.sqrt(d)
    return fastsde.GaussianMixture([0.5, 0.5], torch.stack([-0.5 * u, 0.5 * u]), [S_ISO, S_ISO], sde), u


class IsoScore:
    """The exact score of iso_mixture in closed form, ~25× faster than the generic mixture at
    d = 1024: q_t = ½N(−m·u/2, v·I) + ½N(m·u/2, v·I) with v = m²s² + σ², so with a = x·u the
    responsibility of the + mode is sigmoid(m·a/v) and s(x) = −(x − m·(r₊ − ½)·u)/v."""

    def __init__(self, sde: fastsde.SDE, u: torch.Tensor, check: fastsde.GaussianMixture | None = None) -> None:
        self.sde, self.u = sde, u
        if check is not None:  # agree with the generic exact score
            x = torch.randn(64, u.shape[0], generator=torch.Generator().manual_seed(0), dtype=F64)
            t = torch.linspace(sde.default_t_end, sde.T, 64, dtype=F64)
            torch.testing.assert_close(self(x, t), check(x, t), rtol=1e-9, atol=1e-9)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m, sig = self.sde.mean_coeff(t), self.sde.marginal_std(t)
        v = m * m * S_ISO**2 + sig * sig
        a = x @ self.u.to(x.dtype)
        r = torch.sigmoid(m * a / v)
        return -(x - (m * (r - 0.5))[:, None] * self.u.to(x.dtype)) / v[:, None]


def tv_isotropic(v_ratio: float, dim: int) -> float:
    """TV between N(0, a·I) and N(0, b·I) in `dim` dimensions with b/a = v_ratio (χ² CDFs)."""
    lo, hi = min(v_ratio, 1.0), max(v_ratio, 1.0)
    if not math.isfinite(v_ratio):
        return 1.0
    if hi - lo < 1e-15:
        return 0.0
    r2 = dim * lo * hi * math.log(hi / lo) / (hi - lo)
    return float(scipy.stats.chi2.cdf(r2 / lo, dim) - scipy.stats.chi2.cdf(r2 / hi, dim))


def along_and_across(x: torch.Tensor, u: torch.Tensor) -> tuple[float, float]:
    """(KS distance along u to the exact 1-D mixture, v⊥ / s²)."""
    n, d = x.shape
    a = x @ u
    perp = x - a[:, None] * u
    v = float((perp**2).sum() / (n * (d - 1))) / S_ISO**2
    if not bool(torch.isfinite(a).all()):
        return 1.0, math.inf
    srt = torch.sort(a).values.numpy()
    cdf = 0.5 * scipy.stats.norm.cdf(srt, -0.5, S_ISO) + 0.5 * scipy.stats.norm.cdf(srt, 0.5, S_ISO)
    i = torch.arange(1, n + 1).numpy()
    return float(max((i / n - cdf).max(), (cdf - (i - 1) / n).max())), v


DIM_SAMPLERS = {
    "EM (reverse SDE)": [("em", {})],
    "PF-ODE (DDIM)": [PREDICTOR],
    "DPUM": [("ode_corrector", {"corrector_steps": k, "duration": dur}) for k in (1, 2, 4) for dur in (0.5, 1.0)],
    "DPOM": [
        ("ode_corrector", {"corrector": "overdamped", "corrector_steps": k, "kappa": kap})
        for k in (1, 2)
        for kap in (0.05, 0.2)
    ],
}


def needed_nfe(points: list[tuple[float, float]]) -> float:
    """Smallest NFE with TV-like <= THRESHOLD on the ladder, log-interpolated from the point before."""
    for (n0, q0), (n1, q1) in zip([(math.nan, math.inf), *points], points):
        if q1 <= THRESHOLD:
            if not math.isfinite(q0) or q0 <= q1:
                return n1
            f = (math.log(q0) - math.log(THRESHOLD)) / (math.log(q0) - math.log(q1))
            return math.exp(math.log(n0) + f * (math.log(n1) - math.log(n0)))
    return math.inf


def part_dim(cache: Cache, proc: str = "vp", n: int = 4096) -> tuple[list[str], dict]:
    sde = fastsde.sde.process_by_name(proc)
    needed: dict[str, dict[int, tuple[float, str, int]]] = {}
    verify = []
    for label, configs in DIM_SAMPLERS.items():
        needed[label] = {d: (math.inf, "", 0) for d in DIMS}
        for d_run in DIMS_RUN:
            targets = [d for d in DIMS if SOURCE[d] == d_run]
            gm, u = iso_mixture(sde, d_run)
            score = IsoScore(sde, u, check=gm)
            for solver, opts in configs:
                curve = []
                for steps in LADDER:
                    if solver_nfe(solver, opts, steps) > 1100:
                        break
                    r = cache.get(
                        f"dim/{proc}/{d_run}/{solver}/{json.dumps(opts, sort_keys=True)}/{steps}",
                        lambda s=steps, so=solver, o=opts, sc=score, u=u, d=d_run: run_iso(sde, sc, u, d, n, so, o, s),
                    )
                    curve.append((steps, r))
                    tv = [[r["ks"] + tv_isotropic(r["v"], d - 1) for _, r in curve[-2:]] for d in targets]
                    if len(curve) >= 2 and all(q <= THRESHOLD for row in tv for q in row):
                        break  # reached twice in a row at every target d: larger grids add nothing
                for d in targets:
                    points = [(r["nfe"], r["ks"] + tv_isotropic(r["v"], d - 1)) for _, r in curve]
                    got = needed_nfe(points)
                    if got < needed[label][d][0]:
                        first = next(s for (s, _), (_, q) in zip(curve, points) if q <= THRESHOLD)
                        needed[label][d] = (got, json.dumps(opts, sort_keys=True), first)
        # the largest d from the decoupling, checked by one direct run at the first grid that reaches it
        got, opts_json, steps = needed[label][max(DIMS)]
        if math.isfinite(got) and steps <= VERIFY_MAX_STEPS:
            solver = DIM_SAMPLERS[label][0][0]
            opts = json.loads(opts_json)
            d = max(DIMS)
            gm, u = iso_mixture(sde, d)
            r = cache.get(
                f"dim-direct/{proc}/{d}/{solver}/{opts_json}/{steps}",
                lambda u=u, d=d, solver=solver, opts=opts, steps=steps: run_iso(
                    sde, IsoScore(sde, u), u, d, n, solver, opts, steps
                ),
            )
            src = cache.data[f"dim/{proc}/{SOURCE[d]}/{solver}/{opts_json}/{steps}"]
            verify.append((label, steps, src, r))
    lines = [
        f"\n**{proc.upper()}**: NFE to TV-like ≤ {THRESHOLD} (4096 samples; '> 1100': not reached on the ladder; "
        f"d = {max(DIMS)} from the d = {SOURCE[max(DIMS)]} runs, see below), and the fitted slope of log NFE "
        "against log d (d = 64 … 1024):\n",
        "| sampler | " + " | ".join(f"d = {d}" for d in DIMS) + " | slope | best setting at d = 1024 |",
        "|---|" + "---|" * (len(DIMS) + 2),
    ]
    slopes = {}
    for label, row in needed.items():
        xs = [math.log(d) for d in DIMS[2:] if math.isfinite(row[d][0])]
        ys = [math.log(row[d][0]) for d in DIMS[2:] if math.isfinite(row[d][0])]
        if len(xs) >= 2:
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            slopes[label] = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
        cells = [f"{row[d][0]:.0f}" if math.isfinite(row[d][0]) else "> 1100" for d in DIMS]
        slope = f"{slopes[label]:.2f}" if label in slopes else "–"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {slope} | {row[max(DIMS)][1] or '–'} |")
    d = max(DIMS)
    lines += [
        f"\nDirect runs at d = {d} (4096 samples) against the d = {SOURCE[d]} runs they are computed from, at "
        "the first grid that reaches the threshold (v⊥/s², KS along u, TV-like at d = 1024):\n",
        f"| sampler | steps | v⊥ (d = {SOURCE[d]}) | v⊥ (d = {d}) | KS ({SOURCE[d]}) | KS ({d}) | TV-like from {SOURCE[d]} "
        f"| TV-like direct |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, steps, src, r in verify:
        tv_src = src["ks"] + tv_isotropic(src["v"], d - 1)
        tv_dir = r["ks"] + tv_isotropic(r["v"], d - 1)
        lines.append(
            f"| {label} | {steps} | {src['v']:.4f} | {r['v']:.4f} | {src['ks']:.3f} | {r['ks']:.3f} | {tv_src:.3f} "
            f"| {tv_dir:.3f} |"
        )
    return lines, {"needed": needed, "slopes": slopes}


def run_iso(sde, score, u, d: int, n: int, solver: str, opts: dict, steps: int) -> dict:
    """One run on the isotropic mixture: KS along u, v⊥/s², NFE and seconds."""
    t0 = time.time()
    res = fastsde.sample(
        score, sde, (n, d), solver=solver, steps=steps, seed=FastNoise(n, seed=steps), dtype=F64, **opts
    )
    ks, v = along_and_across(res.samples, u)
    return {"ks": ks, "v": v, "nfe": res.nfe, "seconds": time.time() - t0}


# ---------------------------------------------------------------------------------------------
# Part digits
# ---------------------------------------------------------------------------------------------

DIGITS_SAMPLERS = {k: v for k, v in EQUAL_SAMPLERS.items() if "duration 0.5" not in k and "predictor" not in k}


def part_digits(cache: Cache, n: int = 500, seeds: tuple[int, ...] = (0, 1)) -> list[str]:
    from fastsde.metrics.digits import digits_quality, floor_sd_for

    model = fastsde.load_model("digits")
    budgets = [20, 40, 80]
    rows = []
    floor = None
    for label, (solver, opts) in DIGITS_SAMPLERS.items():
        cells = []
        for b in budgets:
            steps = steps_for(solver, opts, b, model.sde)
            fds = []
            for seed in seeds:

                def run(solver=solver, opts=opts, steps=steps, seed=seed):
                    t0 = time.time()
                    shape = (n, *model.shape)
                    res = fastsde.sample(model.score, model.sde, shape, solver=solver, steps=steps, seed=seed, **opts)
                    q = digits_quality(res.samples)
                    return {"fd": q["fd"], "floor": q["floor"], "nfe": res.nfe, "seconds": time.time() - t0}

                key = f"digits/{label}/{steps}" + (f"/seed{seed}" if seed else "")
                r = cache.get(key, run)
                floor = r["floor"]
                fds.append(r["fd"])
            cells.append(" / ".join(f"{v:.1f}" for v in fds))
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    head = (
        f"\n**digits (VP), {n} samples, seeds {', '.join(map(str, seeds))}**: digits Fréchet distance per seed "
        f"(real-data floor at this n: {floor:.1f} ± {floor_sd_for(n):.1f}):\n"
    )
    return [
        head,
        "| sampler | " + " | ".join(f"NFE {b}" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
        *rows,
    ]


def plot_dim(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, row in result["needed"].items():
        ds = [d for d in DIMS if math.isfinite(row[d][0])]
        slope = result["slopes"].get(label)
        ax.loglog(ds, [row[d][0] for d in ds], "o-", label=f"{label} (slope {slope:.2f})" if slope else label)
    ax.set_xlabel("dimension d")
    ax.set_ylabel(f"NFE to TV-like ≤ {THRESHOLD}")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def plot_equal(cache: Cache, path: Path) -> None:
    """Per-mode FD against NFE for each sampler, one panel per problem (from the cached runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    for ax, (proc, label_p) in zip(axes.flat, [(p, m) for p in ("vp", "edm") for m in ("2-D mixture", "16-D mixture")]):
        sde = fastsde.sde.process_by_name(proc)
        for label, (solver, opts) in EQUAL_SAMPLERS.items():
            pts = []
            for b in BUDGETS:
                r = cache.data.get(f"equal/{proc}/{label_p}/{label}/{steps_for(solver, opts, b, sde)}")
                if r is not None and math.isfinite(r["fd"]):
                    pts.append((r["nfe"], r["fd"]))
            if pts:
                ax.loglog(*zip(*pts), "o-", label=label, markersize=3)
        floor = cache.data.get(f"equal/{proc}/{label_p}/floor")
        if floor:
            ax.axhline(floor, color="k", ls=":", lw=1)
        ax.set_title(f"{label_p}, {proc.upper()}")
        ax.set_xlabel("NFE")
        ax.set_ylabel("per-mode FD")
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="all", choices=["all", "equal", "dim", "digits"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    cache = Cache(CACHE)
    if args.part in ("all", "equal"):
        print("\n".join(part_equal(cache)))
        plot_equal(cache, OUT / "ode_corrector_equal.png")
    if args.part in ("all", "dim"):
        for proc in ("vp",):  # the paper's setting: the OU process, i.e. VP
            lines, result = part_dim(cache, proc)
            print("\n".join(lines))
            plot_dim(result, OUT / f"ode_corrector_dim_{proc}.png")
    if args.part in ("all", "digits"):
        print("\n".join(part_digits(cache)))


if __name__ == "__main__":
    main()

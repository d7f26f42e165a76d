"""ML-EM on a real network hierarchy: the paper's protocol (Jacot 2026) on digits models
(docs/benchmarks/multilevel.md, "On a network hierarchy").

    .venv/bin/python benchmarks/mlem_digits.py --levels digits-h-small,digits-h-medium,digits-h-large \\
        --n 128 --cache docs/bench/mlem_digits_h.json --page docs/bench/mlem_digits_h.md     # the page's tables

    .venv/bin/python benchmarks/mlem_digits.py --levels runs/h-small,runs/h-medium,runs/h-large
    .venv/bin/python benchmarks/mlem_digits.py --levels digits-small,digits,digits-large --n 64 --quick

Every run starts from the same x_T and follows the same Brownian path as the coupled reference (EM
with the finest level, 1024 moves; a coarser uniform grid gets the normalised sums of the fine
increments), ML-EM's Bernoulli draws come from their own stream. Error: pathwise MSE per pixel to
the reference after the final denoise. Compute: Σ evaluations × cost, the cost of a level being its
FLOPs per evaluation relative to the coarsest (Levels.from_models). Curves: EM with each network
alone over step counts, ML-EM with p="auto" over variance budgets and step counts. Also: γ, the
slope of log cost against log error of the levels (each level's error: its EM MSE on the finest
grid), the compute ratio EM / ML-EM at equal MSE, wall times, and the digits FD of each run.

Resumable: every finished run is cached in the JSON (delete it to start over); the page and plot are
rewritten from the cache at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import fastsde
from fastsde.files import write_json_atomic
from fastsde.metrics.digits import digits_quality
from fastsde.noise import NoiseSource

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mlem import CoupledNoise, fine_increments, pareto, slope  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEED = 0


def run_all(args) -> dict:
    names = args.levels.split(",")
    cache_path = Path(args.cache)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    if cache.get("levels") not in (None, names) or cache.get("n") not in (None, args.n):
        raise SystemExit(f"{cache_path} holds runs of {cache.get('levels')} at n={cache.get('n')}: delete it first")
    cache.update(levels=names, n=args.n, fine_moves=args.fine_moves)
    runs = cache.setdefault("runs", {})
    levels = fastsde.Levels.from_models(names)
    cache["costs"] = levels.costs
    sde, shape = levels.models[0].sde, tuple(levels.models[0].shape)
    n, fm = args.n, args.fine_moves
    fine = NoiseSource.from_seed(SEED, n)
    table = fine_increments(fine, fm, shape)

    def save() -> None:
        write_json_atomic(cache_path, cache)

    def record(label: str, res, compute: float, ref: torch.Tensor | None) -> dict:
        q = digits_quality(res.samples)
        got = getattr(res, "nfe_per_level", None)
        per_level = [res.nfe] if got is None else [float(v) for v in got]
        row = {
            "compute": compute,
            "mse": math.nan if ref is None else float((res.samples.double() - ref).pow(2).mean()),
            "wall": res.wall_time,
            "fd": q["fd"],
            "nfe_per_level": per_level,
        }
        runs[label] = row
        save()
        print(f"{label}: compute {compute:.4g}  mse {row['mse']:.4g}  fd {row['fd']:.1f}  wall {row['wall']:.1f} s")
        return row

    ref_path = cache_path.with_suffix(".ref.safetensors")
    if ref_path.exists():
        from safetensors.torch import load_file

        ref = load_file(str(ref_path))["x"]
    else:
        res = fastsde.sample(levels.scores[-1], sde, (n, *shape), solver="em", steps=fm + 1, seed=fine)
        ref = res.samples.double()
        from safetensors.torch import save_file

        save_file({"x": ref.contiguous()}, str(ref_path))
        record("reference", res, res.nfe * levels.costs[-1], None)
    for k, name in enumerate(names):
        for m in args.em_moves:
            label = f"em {name} {m}"
            if label in runs:
                continue
            noise = CoupledNoise(fine, table, fm // m)
            res = fastsde.sample(levels.scores[k], sde, (n, *shape), solver="em", steps=m + 1, seed=noise)
            record(label, res, res.nfe * levels.costs[k], ref)
    finest_floor = runs[f"em {names[-1]} {max(args.em_moves)}"]["mse"] if fm in args.em_moves else None
    for m in args.ml_moves:
        for budget in args.budgets:
            label = f"mlem auto {m} {budget:g}"
            if label in runs:
                continue
            noise = CoupledNoise(fine, table, fm // m)
            res = fastsde.sample(levels, sde, (n, *shape), solver="mlem", steps=m + 1, budget=budget, seed=noise)
            record(label, res, res.cost, ref)
    cache["finest_floor"] = finest_floor
    return cache


def analyse(cache: dict) -> dict:
    names, costs, runs = cache["levels"], cache["costs"], cache["runs"]
    em = [(r["compute"], r["mse"]) for k, r in runs.items() if k.startswith("em ")]
    ml = [(r["compute"], r["mse"]) for k, r in runs.items() if k.startswith("mlem ")]
    em_front, ml_front = pareto(em), pareto(ml)
    floors = [min(r["mse"] for k, r in runs.items() if k.startswith(f"em {name} ")) for name in names]
    # γ: cost against accuracy of the levels; the finest level's own floor is 0 against itself, so
    # γ uses the coarser levels' errors against the reference (the finest level's)
    pts = [(costs[k], floors[k]) for k in range(len(names) - 1) if floors[k] > 0]
    gamma = -slope(pts) if len(pts) >= 2 else math.nan
    ratios = []
    for c_ml, e_ml in ml_front:
        cands = [c for c, e in em_front if e <= e_ml]
        if cands:
            ratios.append({"mse": e_ml, "mlem": c_ml, "em": min(cands), "ratio": min(cands) / c_ml})
    return {"em_front": em_front, "ml_front": ml_front, "floors": floors, "gamma": gamma, "ratios": ratios}


def plot(cache: dict, res: dict, path: Path) -> None:
    """MSE against compute and against wall time: EM per network, ML-EM per move count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, names = cache["runs"], cache["levels"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, xkey, xlabel in (
        (axes[0], "compute", "compute per sample (coarsest evaluations)"),
        (axes[1], "wall", "wall time (s)"),
    ):
        for name in names:
            rows = sorted((r[xkey], r["mse"]) for k, r in runs.items() if k.startswith(f"em {name} "))
            ax.plot(*zip(*rows), "o-", label=f"EM {Path(name).name}")
        for m in sorted({int(k.split()[2]) for k in runs if k.startswith("mlem ")}):
            rows = sorted((r[xkey], r["mse"]) for k, r in runs.items() if k.startswith(f"mlem auto {m} "))
            ax.plot(*zip(*rows), "s--", label=f"ML-EM auto, {m} moves")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("MSE per pixel to the coupled reference")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[0].set_title(f"against compute (γ = {res['gamma']:.2f})")
    axes[1].set_title("against wall time (one core)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_page(cache: dict, res: dict, path: Path, png: Path, command: str, cache_name: str) -> None:
    """A markdown page (docs/bench/mlem_digits_h.md for the shipped hierarchy): every run, γ, the compute
    ratios at equal MSE."""
    names, costs, runs = cache["levels"], cache["costs"], cache["runs"]
    lines = [
        "# Multilevel EM on a network hierarchy",
        "",
        f"Made by `{command}` (resumable; every run is cached in `docs/bench/{cache_name}`).",
        "",
        "Levels (coarse to fine) and their costs (forward FLOPs relative to the coarsest): "
        + ", ".join(f"`{n}` {c:.3f}" for n, c in zip(names, costs))
        + f". n = {cache['n']} samples, the same x_T and Brownian path as the reference (EM with the finest "
        f"network, {cache['fine_moves']} moves); MSE per pixel after the final denoise; FD: the digits "
        "classifier-feature Fréchet distance (lower is better).",
        "",
        "| run | compute / sample | MSE | FD | wall s | evaluations per level |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in runs.items():
        evals = ", ".join(f"{v:.1f}" for v in r["nfe_per_level"])
        mse = "—" if not math.isfinite(r["mse"]) else f"{r['mse']:.4g}"
        lines.append(f"| {label} | {r['compute']:.4g} | {mse} | {r['fd']:.1f} | {r['wall']:.1f} | {evals} |")
    lines += [
        "",
        f"γ (slope of log cost against log error over the coarser levels' EM floors): {res['gamma']:.2f}; "
        "floors (MSE of each network's finest EM run against the reference): "
        + ", ".join(f"{f:.4g}" for f in res["floors"]),
        "",
        "Compute ratio at equal MSE (for each point on ML-EM's Pareto front, the least compute of an EM "
        "run of any single network that is at least as accurate):",
        "",
        "| MSE | ML-EM compute | EM compute | ratio |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['mse']:.4g} | {r['mlem']:.4g} | {r['em']:.4g} | {r['ratio']:.2f}× |" for r in res["ratios"]]
    if not res["ratios"]:
        lines.append("| — | no ML-EM run is at least as accurate as some EM run | | |")
    image = Path(os.path.relpath(png, path.parent)).as_posix()
    lines += ["", f"![MSE against compute and wall time]({image})", ""]
    write_atomic_text(path, "\n".join(lines))


def write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--levels", default="digits-small,digits,digits-large")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--fine-moves", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="fewer step counts (checks the script)")
    ap.add_argument("--cache", default=str(ROOT / "docs" / "bench" / "mlem_digits.json"))
    ap.add_argument("--page", default=None, help="write this markdown page and a PNG beside the cache")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.fine_moves = 64
        args.em_moves, args.ml_moves, args.budgets = [16, 64], [64], [1e-3]
    else:
        args.em_moves = [32, 64, 128, 256, 512, 1024]
        args.ml_moves = [256, 1024]
        args.budgets = [3e-4, 1e-3, 3e-3, 1e-2]
    t0 = time.perf_counter()
    cache = run_all(args)
    res = analyse(cache)
    cache["analysis"] = res
    write_json_atomic(Path(args.cache), cache)
    print(f"γ (levels' error against cost): {res['gamma']:.2f}")
    for r in res["ratios"]:
        print(f"MSE {r['mse']:.3g}: ML-EM compute {r['mlem']:.4g}, EM {r['em']:.4g}, ratio {r['ratio']:.2f}x")
    if args.page:
        png = Path(args.cache).with_suffix(".png")
        plot(cache, res, png)
        command = "python benchmarks/mlem_digits.py " + " ".join(sys.argv[1:])
        write_page(cache, res, Path(args.page), png, command, Path(args.cache).name)
        print(f"wrote {args.page} and {png}")
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

"""ML-EM on a real network hierarchy: the paper's protocol (Jacot 2026) on digits models (issue 15).

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--levels", default="digits-small,digits,digits-large")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--fine-moves", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="fewer step counts (checks the script)")
    ap.add_argument("--cache", default=str(ROOT / "docs" / "bench" / "mlem_digits.json"))
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
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

"""ML-EM: the learned schedule (fastsde.fit_mlem) against the theory rule (p="auto") it starts from,
on the synthetic hierarchy of benchmarks/mlem.py (docs/benchmarks/multilevel.md, "A learned schedule against the
theory rule"; the table is copied there from docs/bench/mlem_learned.md).

    .venv/bin/python benchmarks/mlem_learned.py      # writes docs/bench/mlem_learned.md and docs/bench/mlem_learned.json

Same problem, levels, costs (γ = 3), coupled reference (EM with the exact score, 4096 moves, seed 0)
and error (pathwise MSE per dimension after the denoise, n = 512) as benchmarks/mlem.py. For levels
1..5 at 256 moves and each variance budget, p="auto" and a schedule fitted with fit_mlem on held-out
draws (seed 1: its own x_T, Brownian path and reference) from that rule, with λ the rule's shadow
price, then both evaluated on the benchmark's samples. The objective is MSE + λ·compute/compute_EM
(compute_EM: EM with the finest level on the same grid).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import fastsde
from fastsde.noise import NoiseSource

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mlem import GAMMA, SEED, CoupledNoise, fine_increments, make_level, mixture, mse  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default="1.4e-4,5.6e-4,2.2e-3", help="variance budgets of p='auto'")
    ap.add_argument("--moves", type=int, default=256)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--fit-n", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n, K, fine_moves, m = 512, 5, 4096, args.moves
    sde = fastsde.VPSDE()
    gm = mixture(sde)
    levels = fastsde.Levels(
        [make_level(sde, gm, k) for k in range(1, K + 1)], costs=[2.0 ** (GAMMA * k) for k in range(K)]
    )
    fine = NoiseSource.from_seed(SEED, n)
    table = fine_increments(fine, fine_moves, (2,))
    kw = dict(dtype=torch.float64)
    t0 = time.perf_counter()
    ref = fastsde.sample(gm, sde, (n, 2), solver="em", steps=fine_moves + 1, seed=fine, **kw).samples
    em_cost = levels.costs[-1] * (m + 1)
    rows = []
    for budget in (float(b) for b in args.budgets.split(",")):
        noise = CoupledNoise(fine, table, fine_moves // m)
        auto = fastsde.sample(levels, sde, (n, 2), solver="mlem", steps=m + 1, budget=budget, seed=noise, **kw)
        f0 = time.perf_counter()
        sched = fastsde.fit_mlem(
            levels, sde, (2,), steps=m + 1, n=args.fit_n, seed=1, iters=args.iters, budget=budget, **kw
        )
        fit_s = time.perf_counter() - f0
        noise = CoupledNoise(fine, table, fine_moves // m)
        learned = fastsde.sample(levels, sde, (n, 2), solver="mlem", steps=m + 1, p=sched, seed=noise, **kw)
        lam = sched.fit["lambda"]
        row = {"budget": budget, "lambda": lam, "fit_seconds": round(fit_s, 1), "fit": sched.fit}
        for name, res in (("auto", auto), ("learned", learned)):
            err = mse(res.samples, ref)
            row[name] = {
                "compute": res.cost,
                "mse": err,
                "objective": err + lam * res.cost / em_cost,
                "nfe_per_level": [float(v) for v in res.nfe_per_level],
            }
        row["theta"] = sched.config()["theta"]
        rows.append(row)
        a, b = row["auto"], row["learned"]
        print(
            f"budget {budget:.3g}: auto compute {a['compute']:.4g} mse {a['mse']:.3g} obj {a['objective']:.4g} | "
            f"learned compute {b['compute']:.4g} mse {b['mse']:.3g} obj {b['objective']:.4g} (fit {fit_s:.0f} s)",
            flush=True,
        )
    wall = time.perf_counter() - t0
    out = {"n": n, "K": K, "moves": m, "em_finest_compute": em_cost, "rows": rows, "wall_s": wall}
    (ROOT / "docs" / "bench").mkdir(parents=True, exist_ok=True)
    (ROOT / "docs" / "bench" / "mlem_learned.json").write_text(json.dumps(out, indent=1))
    lines = [
        "# ML-EM: the learned schedule against the theory rule",
        "",
        "```sh",
        ".venv/bin/python benchmarks/mlem_learned.py",
        "```",
        "",
        f"writes this file and `docs/bench/mlem_learned.json`; {wall:.0f} s on one core (a shared machine). "
        "Problem, levels (5, costs 1, 8, 64, 512, 4096), coupled reference and error as in "
        f"[mlem.md](mlem.md); {m} moves, n = {n}. Each schedule is fitted by "
        f"`fastsde.fit_mlem(levels, sde, (2,), steps={m + 1}, n={args.fit_n}, seed=1, iters={args.iters}, "
        "budget=...)` on held-out draws (its own x_T, Brownian path and reference), starting from "
        '`p="auto"` at that budget with λ its shadow price; both are then run on the benchmark\'s samples. '
        f"Objective = MSE + λ·compute/{em_cost:g} (EM with the finest level on the same grid).",
        "",
        "| budget | λ | auto: compute | auto: MSE | auto: objective | learned: compute | learned: MSE "
        "| learned: objective | change | fit s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r["auto"], r["learned"]
        lines.append(
            f"| {r['budget']:.3g} | {r['lambda']:.3g} | {a['compute']:.4g} | {a['mse']:.3g} | {a['objective']:.4g} | "
            f"{b['compute']:.4g} | {b['mse']:.3g} | {b['objective']:.4g} | "
            f"{100 * (b['objective'] / a['objective'] - 1):+.1f}% | {r['fit_seconds']:.0f} |"
        )
    lines += [
        "",
        "EM with the finest level alone on the same grid costs "
        f"{em_cost:g} per sample (its MSE is level 5's bias floor, see mlem.md).",
        "",
    ]
    (ROOT / "docs" / "bench" / "mlem_learned.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()

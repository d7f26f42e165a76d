"""The recipe against the best single fixed choice, on held-out seeds (docs/benchmarks/few-step.md, "Tuned
recipes").

For each problem — the shipped digits model, and the exact 64-D Gaussian mixture under VP and EDM —
``fastsde.tune`` (defaults; fitting seeds 0, its own scoring seeds 10 000) picks a sampler per budget.
Then every configuration it tried at every budget (each solver on its default grid, each IIA solver with
its table, each solver with a fitted grid where one was fitted at every budget) is run on two further
held-out seed sets (20 000 and 30 000, n each) against a fine reference from the same noise. The best
single fixed choice is the configuration with the lowest mean log-MSE over the budgets on these sets
(chosen with hindsight: the strongest fixed baseline). The recipe passes at a budget when its MSE is at
most the fixed choice's plus the seed spread (half the difference between the two sets, summed for the
two), and wins where it is lower by more than that spread.

    python benchmarks/tune.py --out docs/bench/tune.json     # about 15 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

import fastsde
from fastsde.metrics.mixture import mse

BUDGETS = (4, 6, 8, 10)
SEEDS = (20_000, 30_000)


def problems(which: list[str]):
    if "digits" in which:
        m = fastsde.load_model("digits")
        yield "digits", m.score, m.sde, tuple(m.shape), torch.float32
    for name, sde in (("mixture64-vp", fastsde.VPSDE()), ("mixture64-edm", fastsde.EDM())):
        if name in which:
            gm = fastsde.problems.mixture_nd(sde, dim=64)
            yield name, gm.score, sde, tuple(gm.shape), torch.float64


def configurations(recipe) -> dict[str, dict[int, tuple[str, dict]]]:
    """name → budget → (solver, options) for every configuration tried (some only at some budgets)."""
    out: dict[str, dict[int, tuple[str, dict]]] = {}
    for row in recipe.candidates:
        b, solver, variant = row["budget"], row["solver"], row["variant"]
        options: dict = {"steps": b}
        if variant == "fitted grid":
            options["grid"] = recipe.files[row["file"]]
        elif variant == "IIA table":
            options["table"] = recipe.files[row["file"]]
        if not math.isfinite(float(row["mse"])):
            continue
        out.setdefault(f"{solver} ({variant})", {})[b] = (solver, options)
    return out


def mean_log(per_budget: dict[int, list[float]]) -> float:
    """Mean over budgets of log(MSE averaged over the seed sets)."""
    return sum(math.log(sum(e) / len(e)) for e in per_budget.values()) / len(per_budget)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", default="digits,mixture64-vp,mixture64-edm")
    ap.add_argument("--n", type=int, default=512, help="samples per held-out seed set")
    ap.add_argument("--cache", default="/tmp/fastsde-tune-bench-cache")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    report = {"command": "python benchmarks/tune.py", "n": args.n, "seeds": SEEDS, "budgets": BUDGETS, "problems": {}}
    for name, score, sde, shape, dtype in problems(args.problems.split(",")):
        t0 = time.perf_counter()
        recipe = fastsde.tune(score, sde, shape, BUDGETS, dtype=dtype, cache=f"{args.cache}/{name}", keep_all_files=True,
                              log=None)  # fmt: skip
        tune_seconds = time.perf_counter() - t0
        configs = configurations(recipe)
        refs = [fastsde.sample(score, sde, (args.n, *shape), "dpmpp_3m", seed=s, steps=200, dtype=dtype,
                               grid="logsnr").samples for s in SEEDS]  # fmt: skip
        errors: dict[str, dict[int, list[float]]] = {}
        for label, per_budget in configs.items():
            for b, (solver, options) in per_budget.items():
                errs = []
                for s, ref in zip(SEEDS, refs):
                    x = fastsde.sample(score, sde, (args.n, *shape), solver, seed=s, dtype=dtype, **options).samples
                    errs.append(mse(x, ref))
                errors.setdefault(label, {})[b] = errs

        complete = [k for k, d in errors.items() if set(d) == set(BUDGETS)]  # fixed choices: every budget
        fixed = min(complete, key=lambda k: mean_log(errors[k]))
        rows = []
        for b in BUDGETS:
            c = recipe.choices[b]
            variant = "fitted grid" if c.grid_file else ("IIA table" if c.table_file else "default")
            label = f"{c.solver} ({variant})"
            mine, theirs = errors[label][b], errors[fixed][b]
            spread = abs(mine[0] - mine[1]) / 2 + abs(theirs[0] - theirs[1]) / 2
            m_mean, f_mean = sum(mine) / 2, sum(theirs) / 2
            rows.append({
                "budget": b, "recipe": label, "recipe_mse": m_mean, "fixed": fixed, "fixed_mse": f_mean,
                "spread": spread, "passes": m_mean <= f_mean + spread, "wins": m_mean < f_mean - spread,
            })  # fmt: skip
            print(f"{name:14s} NFE {b:2d}  recipe {label:28s} {m_mean:.4g}   best fixed {fixed:28s} {f_mean:.4g}"
                  f"   spread {spread:.2g}   {'win' if rows[-1]['wins'] else ('tie' if rows[-1]['passes'] else 'LOSS')}")  # fmt: skip
        report["problems"][name] = {
            "tune_seconds": tune_seconds, "tune_record_seconds": recipe.record["seconds"],
            "fitting_seconds": recipe.record["fitting_seconds"], "rows": rows,
            "all": {k: {str(b): v for b, v in d.items()} for k, d in errors.items()},
        }  # fmt: skip
        print(f"{name}: tuned in {recipe.record['seconds']:.0f} s (this run {tune_seconds:.0f} s, cache {args.cache})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

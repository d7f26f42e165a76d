"""The few-NFE frontier on flow models: fastsde's solvers (grids "uniform" and "quadratic")
against diffusers' flow-matching schedulers, side by side from the same x_T (pure noise at u = 1).

Problems: (a) the exact 64-D Gaussian mixture (``fastsde.problems.mixture_nd(sde, dim=64)``, the one of
benchmarks/frontier_deterministic.py) under RectifiedFlow(shift=1) and RectifiedFlow(shift=3), quality
= per-mode Fréchet distance to the exact mixture divided by its finite-sample floor; (b) the shipped
``digits-flow`` model, quality = the digits classifier-feature FD (floor: real-data FD at the same n).
Converged (mixture): FD ≤ τ = max(1.1·floor, floor + 2·sd, 1.1·FD of a fine reference from the same
x_T), the runner's rule (``fastsde.bench.runner.converged_threshold``); the reference is dpmpp_2m on
the quadratic grid with 400 steps.

    .venv/bin/python benchmarks/frontier_flow.py        # writes docs/bench/flow_frontier.json and
                                                        # docs/bench/flow_frontier.md (~30 min on one core)

The tables are those of docs/benchmarks/model-kinds.md, "Flow matching and rectified flows" (copied there
from docs/bench/flow_frontier.md).
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
from fastsde.bench.peers import FLOW_PEERS
from fastsde.bench.runner import converged_threshold
from fastsde.metrics.mixture import mixture_frechet, mixture_frechet_floor
from fastsde.problems import mixture_nd

DETERMINISTIC = ["euler", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "deis", "heun"]
STOCHASTIC = ["dpmpp_2m_sde", "er_sde", "sa_solver"]
GRIDS = ["uniform", "quadratic"]  # "logsnr" is refused from u = 1 (λ = −∞)
#: each grid run to the process's default_t_end, 1e-3 (then the denoise there), and with t_end = 0 ("→0":
#: the grid of N + 1 points runs to σ = 0 and the denoise at its last interior point is the last move;
#: the default below 15 points)
VARIANTS = [(g, None) for g in GRIDS] + [(g, 0.0) for g in GRIDS]
ROOT = Path(__file__).resolve().parent.parent


def _steps(solver: str, sde, budget: int, grid: str) -> int | None:
    from fastsde.bench.runner import steps_for_budget

    return steps_for_budget(solver, sde, budget, {"grid": grid})


def run_problem(name, score, sde, x_T, budgets, quality, dtype, seed=0):
    """Every fastsde candidate and every flow peer at each budget: records with quality, NFE, wall time."""
    recs = []
    for solver in DETERMINISTIC + STOCHASTIC:
        for grid, t_end in VARIANTS:
            label = grid if t_end is None else f"{grid}→0"
            for b in budgets:
                rec = {"problem": name, "sampler": f"{solver}/{label}", "source": "fastsde", "solver": solver,
                       "grid": label, "stochastic": solver in STOCHASTIC, "budget": b}  # fmt: skip
                steps = _steps(solver, sde, b, grid)
                if steps is None:
                    recs.append({**rec, "error": "budget below two grid points"})
                    continue
                try:
                    res = fastsde.sample(
                        score, sde, tuple(x_T.shape), solver=solver, seed=seed, x_init=x_T, dtype=dtype,
                        steps=steps, grid=grid, t_end=sde.default_t_end if t_end is None else t_end,
                    )  # fmt: skip
                except Exception as exc:  # noqa: BLE001 - recorded, not fatal
                    recs.append({**rec, "error": f"{type(exc).__name__}: {exc}"})
                    continue
                recs.append({**rec, "steps": steps, "nfe": res.nfe, "wall": res.wall_time,
                             "samples": res.samples, "error": None})  # fmt: skip
    for peer in FLOW_PEERS.values():
        for b in budgets:
            rec = {"problem": name, "sampler": peer.name, "source": "diffusers", "solver": peer.name, "grid": "diffusers",
                   "stochastic": peer.stochastic, "budget": b}  # fmt: skip
            try:
                run = peer.run(score, sde, x_T, b, sde.default_t_end, seed=seed)
            except Exception as exc:  # noqa: BLE001
                recs.append({**rec, "error": f"{type(exc).__name__}: {exc}"})
                continue
            recs.append({**rec, "steps": run.setting.get("steps"), "nfe": run.nfe, "wall": run.wall_time,
                         "samples": run.samples, "error": None})  # fmt: skip
    for r in recs:
        if r["error"] is None:
            x = r.pop("samples")
            r["quality"] = quality(x)
            r["_x"] = x
    return recs


def mixture(shift: float, n: int, budgets: list[int], log) -> dict:
    sde = fastsde.RectifiedFlow(shift=shift)
    gm = mixture_nd(sde, dim=64)
    floor = mixture_frechet_floor(gm, n, draws=30, seed=12345)
    x_T = sde.prior_sample(torch.randn(n, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    ref = fastsde.sample(gm.score, sde, x_T.shape, solver="dpmpp_2m", steps=400, grid="quadratic", x_init=x_T)
    ref2 = fastsde.sample(gm.score, sde, x_T.shape, solver="dpmpp_2m", steps=800, grid="quadratic", x_init=x_T)
    q_ref = mixture_frechet(ref.samples, gm).value
    tau = converged_threshold(floor, q_ref)
    ref_mse = float(((ref.samples - ref2.samples) ** 2).mean())
    log(f"\n## 64-D mixture, RectifiedFlow(shift={shift:g}), n = {n}")
    log(f"floor {floor[0]:.4g} ± {floor[1]:.2g}; reference FD {q_ref:.4g} (MSE to 800 steps {ref_mse:.2g}); "
        f"τ = {tau:.4g} (= {tau / floor[0]:.3f} × floor)")  # fmt: skip
    recs = run_problem(f"mixture64_shift{shift:g}", gm.score, sde, x_T, budgets,
                       lambda x: mixture_frechet(x, gm).value / floor[0], torch.float64)  # fmt: skip
    for r in recs:
        x = r.pop("_x", None)
        if x is not None:
            r["mse_to_reference"] = float(((x - ref.samples) ** 2).mean()) if not r["stochastic"] else None
            r["converged"] = r["quality"] * floor[0] <= tau
    return {"problem": f"mixture64_shift{shift:g}", "shift": shift, "n": n, "floor": floor[0], "floor_sd": floor[1],
            "reference_fd": q_ref, "reference_mse_400_vs_800": ref_mse, "tau": tau, "tau_ratio": tau / floor[0],
            "quality": "FD / floor", "records": recs}  # fmt: skip


def digits(n: int, budgets: list[int], log, seeds: int = 1) -> dict:
    """digits-flow over ``seeds`` independent x_T sets of n (seeds 0, 1, ...): the quality of a row is the
    mean FD over the sets (``quality_per_seed`` keeps each), so that one draw's noise does not decide."""
    from fastsde.metrics.digits import digits_quality, floor_for, floor_sd_for

    model = fastsde.load_model("digits-flow")
    sde = model.sde
    floor = (floor_for(n), floor_sd_for(n))
    log(f"\n## digits-flow ({sde!r}), n = {n} × {seeds} seeds: floor {floor[0]:.4g} ± {floor[1]:.2g} per seed, "
        f"± {floor[1] / math.sqrt(seeds):.2g} for the mean")  # fmt: skip
    runs = []
    for seed in range(seeds):
        x_T = torch.randn(n, *model.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        runs.append(run_problem("digits-flow", model.score, sde, x_T, budgets,
                                lambda x: float(digits_quality(x)["fd"]), torch.float32, seed=seed))  # fmt: skip
    recs = runs[0]
    for i, r in enumerate(recs):
        r.pop("_x", None)
        if r["error"] is None:
            per = [run[i]["quality"] for run in runs]
            r["quality_per_seed"] = per
            r["quality"] = sum(per) / len(per)
            r["wall"] = sum(run[i]["wall"] for run in runs) / len(runs)
    return {"problem": "digits-flow", "n": n, "seeds": seeds, "floor": floor[0], "floor_sd": floor[1] / math.sqrt(seeds),
            "quality": "digits FD", "records": recs}  # fmt: skip


def _cell(r: dict | None, fmt: str) -> str:
    if r is None:
        return "–"
    if r["error"] is not None:
        return "err" if "budget below" not in r["error"] else "–"
    s = format(r["quality"], fmt)
    if r["nfe"] != r["budget"]:
        s += f" ({r['nfe']:g})"
    return s


def table(prob: dict, budgets: list[int]) -> list[str]:
    recs = prob["records"]
    fmt = ".3g" if prob["quality"] == "FD / floor" else ".1f"
    names = list(dict.fromkeys(r["sampler"] for r in recs))
    out = ["| sampler | " + " | ".join(f"NFE {b}" for b in budgets) + " | wall ms / NFE |",
           "|---|" + "---|" * (len(budgets) + 1)]  # fmt: skip
    for name in names:
        by_b = {r["budget"]: r for r in recs if r["sampler"] == name}
        ok = [r for r in by_b.values() if r["error"] is None]
        ms = 1000 * sum(r["wall"] for r in ok) / max(sum(r["nfe"] for r in ok), 1)
        src = "" if by_b[budgets[0]]["source"] == "fastsde" else " (peer)"
        out.append(f"| `{name}`{src} | " + " | ".join(_cell(by_b.get(b), fmt) for b in budgets) + f" | {ms:.2f} |")
    return out


def best(recs: list[dict], source: str, b: int, deterministic_only: bool = False) -> dict | None:
    rows = [
        r
        for r in recs
        if r["budget"] == b and r["error"] is None and (r["source"] == "fastsde") == (source == "fastsde")
    ]
    if deterministic_only:
        rows = [r for r in rows if not r["stochastic"]]
    return min(rows, key=lambda r: r["quality"]) if rows else None


def verdicts(probs: list[dict], budgets_mix: list[int], budgets_dig: list[int]) -> list[str]:
    out = []
    for prob in probs:
        recs = prob["records"]
        bud = budgets_dig if prob["problem"] == "digits-flow" else budgets_mix
        out += [f"\n### {prob['problem']}: best fastsde vs best peer per budget\n",
                "| NFE | best fastsde | best peer | fastsde better? |", "|---|---|---|---|"]  # fmt: skip
        fmt = ".1f" if prob["problem"] == "digits-flow" else ".3g"
        for b in bud:
            f, p = best(recs, "fastsde", b), best(recs, "peer", b)
            yes = "yes" if f["quality"] < p["quality"] else "**no**"
            out.append(
                f"| {b} | `{f['sampler']}` {f['quality']:{fmt}} | `{p['sampler']}` {p['quality']:{fmt}} | {yes} |"
            )
        if prob["problem"] != "digits-flow":
            conv = {}
            for r in recs:
                if r["error"] is None and r["converged"]:
                    conv[r["sampler"]] = min(conv.get(r["sampler"], math.inf), r["nfe"])
            fs = {k: v for k, v in conv.items() if not k.startswith("diffusers_")}
            pe = {k: v for k, v in conv.items() if k.startswith("diffusers_")}
            first_f = min(fs.items(), key=lambda kv: kv[1]) if fs else None
            first_p = min(pe.items(), key=lambda kv: kv[1]) if pe else None
            out.append(f"\nConverged (FD ≤ τ = {prob['tau_ratio']:.3f} × floor) at the fewest NFE: fastsde "
                       + (f"`{first_f[0]}` at NFE {first_f[1]:g}" if first_f else "none within the budgets")
                       + "; peers " + (f"`{first_p[0]}` at NFE {first_p[1]:g}" if first_p else "none within the budgets")
                       + ". Target \"fastsde converged on the mixture in ≤ 12 NFE\": "
                       + ("**met**." if first_f and first_f[1] <= 12 else "**missed**."))  # fmt: skip
        else:
            wins = [b for b in bud if best(recs, "fastsde", b)["quality"] < best(recs, "peer", b)["quality"]]
            out.append("\nTarget \"a lower FD than every peer at every budget on digits-flow\": "
                       + ("**met**" if len(wins) == len(bud) else f"**missed** (won at NFE {wins or 'none'})")
                       + f"; FD noise at n = {prob['n']}: floor sd {prob['floor_sd']:.2g}.")  # fmt: skip
    return out


def grid_table(probs: list[dict]) -> list[str]:
    """Per solver and problem: budgets won by each grid and the geometric-mean quality ratio quadratic/uniform."""
    out = ["| solver | " + " | ".join(f"{p['problem']}: quadratic wins / geo-mean q(quad)/q(unif)" for p in probs)
           + " | overall |", "|---|" + "---|" * (len(probs) + 1)]  # fmt: skip
    for solver in DETERMINISTIC + STOCHASTIC:
        cells, logs = [], []
        for p in probs:
            q = {(r["grid"], r["budget"]): r["quality"] for r in p["records"]
                 if r["solver"] == solver and r["error"] is None}  # fmt: skip
            pairs = [
                (q[("uniform", b)], q[("quadratic", b)]) for (g, b) in q if g == "uniform" and ("quadratic", b) in q
            ]
            if not pairs:
                cells.append("–")
                continue
            won = sum(qq < qu for qu, qq in pairs)
            lr = [math.log(qq / qu) for qu, qq in pairs]
            logs += lr
            cells.append(f"{won}/{len(pairs)}, {math.exp(sum(lr) / len(lr)):.2f}")
        overall = math.exp(sum(logs) / len(logs)) if logs else math.nan
        out.append(f"| `{solver}` | " + " | ".join(cells) + f" | {'quadratic' if overall < 1 else 'uniform'} "
                   f"({overall:.2f}) |")  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-mixture", type=int, default=4096)
    ap.add_argument("--n-digits", type=int, default=500)
    ap.add_argument("--digits-seeds", type=int, default=3, help="independent x_T sets of n-digits (the FD is averaged)")
    ap.add_argument("--budgets", default="4,5,6,8,10,12")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    budgets = [int(b) for b in args.budgets.split(",")]
    lines: list[str] = []

    def log(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    start = time.perf_counter()
    probs = [mixture(1.0, args.n_mixture, budgets, log), mixture(3.0, args.n_mixture, budgets, log)]
    for p in probs:
        log(f"\n### {p['problem']} (FD / floor; floor {p['floor']:.4g}, τ = {p['tau_ratio']:.3f} × floor)\n")
        for s in table(p, budgets):
            log(s)
    dig = digits(args.n_digits, budgets, log, args.digits_seeds)
    probs.append(dig)
    log(f"\n### digits-flow (digits FD, mean of {dig['seeds']} seeds; floor {dig['floor']:.2f} ± {dig['floor_sd']:.2f} "
        f"for the mean at n = {dig['n']})\n")  # fmt: skip
    for s in table(dig, budgets):
        log(s)
    for s in verdicts(probs, budgets, budgets):
        log(s)
    log("\n### Grid: quadratic against uniform per fastsde solver (budgets won; geometric-mean quality ratio)\n")
    for s in grid_table(probs):
        log(s)
    elapsed = time.perf_counter() - start
    log(f"\nTotal time: {elapsed:.0f} s (one thread).")
    if args.no_write:
        return
    cmd = "python benchmarks/frontier_flow.py " + " ".join(sys.argv[1:])
    out = {"command": cmd.strip(), "budgets": budgets, "elapsed_s": elapsed, "torch": torch.__version__,
           "problems": probs}  # fmt: skip
    (ROOT / "docs/bench").mkdir(parents=True, exist_ok=True)
    (ROOT / "docs/bench/flow_frontier.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    body = "\n".join(lines).replace("\n## ", "\n#### ")
    (ROOT / "docs/bench/flow_frontier.md").write_text(
        "# Flow-matching frontier\n\nGenerated by `" + cmd.strip().replace("python", ".venv/bin/python", 1)
        + "` (JSON: docs/bench/flow_frontier.json).\n" + body + "\n"
    )  # fmt: skip


if __name__ == "__main__":
    main()

"""Is a set of models a cost hierarchy? Held-out denoising error per time bucket (docs/benchmarks/multilevel.md,
"Is a set of models a cost hierarchy?").

For each model (a shipped name or a `fastsde train` folder) and each of B time buckets, uniform in
log-SNR between t_end and T, the mean held-out noise-prediction error E‖ε̂(x_t, t) − ε‖² per pixel over
the 300 held-out digits, with R draws of (t, ε) per image. Every model sees the same (x0, t, ε), so
the difference between two models has a small paired standard error. A hierarchy (for ML-EM) needs the
error to fall strictly with cost in every bucket: the table marks each consecutive pair whose paired
difference is not below −2 standard errors. Also printed: the RMS size of the level differences
‖ε̂_{k+1} − ε̂_k‖ per bucket, which is what ML-EM's probabilities are set from.

    .venv/bin/python benchmarks/hierarchy.py --models digits-small,digits,digits-large \
        --out docs/bench/hierarchy_shipped.json
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import fastsde
from fastsde.data import load_digits
from fastsde.files import write_json_atomic


def bucket_edges(sde, buckets: int, t_end: float) -> torch.Tensor:
    """Times at B + 1 edges uniform in log-SNR from T down to t_end (increasing λ)."""
    t = torch.tensor([sde.T, t_end], dtype=torch.float64)
    lam = sde.log_snr(t)
    grid = torch.linspace(float(lam[0]), float(lam[1]), buckets + 1, dtype=torch.float64)
    return sde.t_from_lambda(grid)


@torch.no_grad()
def measure(models: list[str], buckets: int, repeats: int, seed: int, batch: int) -> dict:
    loaded = [fastsde.load_model(m) for m in models]
    sde = loaded[0].sde
    for name, mod in zip(models, loaded):
        if mod.sde.config() != sde.config():
            raise SystemExit(f"{name}: process {mod.sde!r} differs from {models[0]}'s {sde!r}")
    x0 = load_digits("heldout").double()
    n = x0.shape[0]
    edges = bucket_edges(sde, buckets, 1e-3)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(buckets):
        lam_lo, lam_hi = sde.log_snr(edges[b : b + 1]), sde.log_snr(edges[b + 1 : b + 2])
        u = torch.rand(n * repeats, generator=g, dtype=torch.float64)
        t = sde.t_from_lambda(lam_lo + (lam_hi - lam_lo) * u)
        z = torch.randn((n * repeats, *x0.shape[1:]), generator=g, dtype=torch.float64)
        x = x0.repeat(repeats, 1, 1, 1)
        m = sde.mean_coeff(t).reshape(-1, 1, 1, 1)
        s = sde.marginal_std(t).reshape(-1, 1, 1, 1)
        xt = (m * x + s * z).float()
        preds = []
        for mod in loaded:
            net = mod.network.eval()
            out = [
                net(xt[i : i + batch], net.time_input(t[i : i + batch].float())).double()
                for i in range(0, xt.shape[0], batch)
            ]
            preds.append(torch.cat(out))
        err = torch.stack([(p - z).pow(2).flatten(1).mean(1) for p in preds])  # (K, n·R)
        row = {
            "bucket": b,
            "t_range": [float(edges[b]), float(edges[b + 1])],
            "lambda_range": [float(lam_lo), float(lam_hi)],
            "error": err.mean(1).tolist(),
            "pair_diff": [],
            "pair_se": [],
            "level_diff_rms": [],
        }
        for k in range(len(models) - 1):
            d = err[k + 1] - err[k]
            row["pair_diff"].append(float(d.mean()))
            row["pair_se"].append(float(d.std() / math.sqrt(d.numel())))
            gap = (preds[k + 1] - preds[k]).pow(2).flatten(1).mean(1)
            row["level_diff_rms"].append(float(gap.mean().sqrt()))
        rows.append(row)
    strict = all(d < -2 * se for r in rows for d, se in zip(r["pair_diff"], r["pair_se"]))
    return {
        "models": models,
        "steps": [mod.config.get("training", {}).get("steps") for mod in loaded],
        "costs": [float(c) for c in fastsde.Levels.from_models(models).costs],
        "buckets": rows,
        "strict_hierarchy": strict,
        "heldout_images": n,
        "repeats": repeats,
        "seed": seed,
    }


def print_table(res: dict) -> None:
    names = res["models"]
    print(f"models {names}  steps {res['steps']}  costs {[round(c, 2) for c in res['costs']]}")
    head = ["bucket", "t range"] + [f"err {m}" for m in names]
    head += [f"Δ {names[k + 1]}−{names[k]} (±2se)" for k in range(len(names) - 1)]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in res["buckets"]:
        cells = [str(r["bucket"]), f"{r['t_range'][0]:.3g}–{r['t_range'][1]:.3g}"]
        cells += [f"{e:.4f}" for e in r["error"]]
        for d, se in zip(r["pair_diff"], r["pair_se"]):
            mark = "" if d < -2 * se else " ✗"
            cells.append(f"{d:+.4f} ± {2 * se:.4f}{mark}")
        print("| " + " | ".join(cells) + " |")
    means = [sum(r["error"][k] for r in res["buckets"]) / len(res["buckets"]) for k in range(len(names))]
    print("mean error over buckets: " + ", ".join(f"{m} {e:.4f}" for m, e in zip(names, means)))
    print(f"strict hierarchy in every bucket: {res['strict_hierarchy']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="digits-small,digits,digits-large")
    p.add_argument("--buckets", type=int, default=10)
    p.add_argument("--repeats", type=int, default=8, help="draws of (t, ε) per held-out image and bucket")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=600)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    res = measure(args.models.split(","), args.buckets, args.repeats, args.seed, args.batch)
    res["wall_s"] = round(time.time() - start, 1)
    print_table(res)
    print(f"wall {res['wall_s']} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(args.out), res)


if __name__ == "__main__":
    main()

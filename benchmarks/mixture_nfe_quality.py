"""Print, for every fastsde sampler on an exact mixture, NFE against quality (the per-mode Fréchet
distance, with its finite-sample floor) and the share of wall time spent outside score calls.

    .venv/bin/python benchmarks/mixture_nfe_quality.py --process vp --n 2000 --dim 16

The same numbers (and the peers) come from ``fastsde bench --problem mixture``; this script is the
short, fastsde-only view asked for by the core issue.
"""

from __future__ import annotations

import argparse

import torch

from fastsde.bench.runner import BenchConfig, run_bench


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--process", default="vp", choices=["vp", "subvp", "ve", "edm"])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--budgets", default="5,10,20,50,100,200,500,1000")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = BenchConfig(
        budgets=[int(b) for b in args.budgets.split(",")],
        processes=[args.process],
        n=args.n,
        dim=args.dim,
        seed=args.seed,
        peers=False,
        progress=False,
    )
    res = run_bench(cfg, log=lambda s: None)
    summ = res["summary"][args.process]
    print(
        f"{summ['problem']} / {args.process}, n = {args.n}: floor {summ['floor']:.4g} ± {summ['floor_sd']:.2g}, "
        f"PF-ODE reference {summ['reference_quality']:.4g}, converged threshold {summ['threshold']:.4g}"
    )
    print(f"{'sampler':<18} {'setting':>9} {'NFE':>8} {'quality':>10} {'q/floor':>8} {'outside':>8}")
    for r in res["records"]:
        if r["error"] is not None:
            print(f"{r['sampler']:<18} {r['setting']!s:>9} error: {r['error']}")
            continue
        print(
            f"{r['sampler']:<18} {r['setting']!s:>9} {r['nfe']:8.1f} {r['quality']:10.4g} "
            f"{r['quality'] / summ['floor']:8.2f} {100 * r['outside_share']:7.0f}%"
        )
    print("NFE to converged quality:")
    for name, c in summ["converged"].items():
        print(f"  {name:<18} {c['nfe'] if c['nfe'] is not None else 'not reached'}")


if __name__ == "__main__":
    main()

"""Per-mode Fréchet distance of the deterministic few-NFE steppers against NFE on the exact 64-D
mixture (4096 samples, the same x_T for all), in the EDM or VP form: the figures behind the defaults
of ``ipndm`` (max_order 3) and ``unipc`` (order 2, log-SNR grid).

    python benchmarks/frontier_deterministic.py --process vp     # ~1.5 min on one busy core
"""

from __future__ import annotations

import argparse

import torch

import fastsde
from fastsde.metrics.mixture import mixture_frechet, mixture_frechet_floor
from fastsde.problems import mixture_nd

CONFIGS = [
    ("ipndm", {}),
    ("ipndm", {"max_order": 4}),
    ("unipc", {}),
    ("unipc", {"order": 3}),
    ("unipc", {"grid": "edm"}),
    ("lms", {}),
    ("deis", {}),
    ("dpmpp_2m", {}),
]
BUDGETS = [5, 6, 8, 10, 12, 16, 20, 24]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--process", choices=["edm", "vp"], default="edm")
    ap.add_argument("--n", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sde = fastsde.EDM() if args.process == "edm" else fastsde.VPSDE()
    gm = mixture_nd(sde, dim=64)
    floor = mixture_frechet_floor(gm, args.n, draws=30, seed=12345)
    g = torch.Generator().manual_seed(0)
    x_T = sde.prior_sample(torch.randn(args.n, 64, generator=g, dtype=torch.float64))
    print(f"64-D mixture, {args.process}, n = {args.n}: floor {floor[0]:.4g} ± {floor[1]:.2g}")
    print("| solver | options | " + " | ".join(f"NFE {b}" for b in BUDGETS) + " |")
    print("|---|---|" + "---|" * len(BUDGETS))
    for name, opts in CONFIGS:
        row = []
        for b in BUDGETS:
            res = fastsde.sample(gm, sde, x_T.shape, solver=name, x_init=x_T, dtype=torch.float64, steps=b, **opts)
            assert res.nfe == b
            row.append(f"{mixture_frechet(res.samples, gm).value:.3g}")
        print(f"| `{name}` | {opts or 'defaults'} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()

"""Which solver should ``fastsde.sample`` use by default? Bias and NFE of the candidates, measured.

Exact problems (no network error, so any bias is the sampler's): N(0, I) in 4-D (sample std, true
1.0) and the 16-D four-mode mixture (Fréchet distance to the exact data law, against the floor of
exact draws at the same n), each under VP and EDM; optionally the shipped digits model (FD against the
held-out digits, with the real-data floor at that n). Every candidate runs at its registered defaults
(what a user gets) and, where it has one, at a tighter setting.

    .venv/bin/python benchmarks/default_solver.py                      # exact problems, ~15 min
    .venv/bin/python benchmarks/default_solver.py --digits 256         # + digits at n = 256
"""

from __future__ import annotations

import argparse
import time

import torch

import fastsde
from fastsde.metrics.mixture import mixture_frechet, mixture_frechet_floor

#: (label, solver, options): the candidates for the default, then the references.
CANDIDATES: list[tuple[str, str, dict]] = [
    ("adaptive (GGF, fresh)", "adaptive", {}),
    ("adaptive, tree", "adaptive", {"brownian": "tree"}),
    ("adaptive_sde_dpm", "adaptive_sde_dpm", {}),
    ("adaptive_sde_dpm_2m", "adaptive_sde_dpm_2m", {}),
    ("adaptive_sde_dpm_2m 0.01", "adaptive_sde_dpm_2m", {"eps_rel": 0.01}),
    ("dpmpp_2m_sde 20", "dpmpp_2m_sde", {"steps": 20}),
    ("dpmpp_2m_sde 50", "dpmpp_2m_sde", {"steps": 50}),
    ("dpmpp_2m 20", "dpmpp_2m", {"steps": 20}),
    ("dpmpp_2m 50", "dpmpp_2m", {"steps": 50}),
    ("em 1000", "em", {"steps": 1000}),
]


def _gaussian(sde: fastsde.SDE, dim: int) -> fastsde.GaussianMixture:
    return fastsde.GaussianMixture([1.0], torch.zeros(1, dim, dtype=torch.float64), [1.0], sde)


def exact_rows(n: int, seeds: list[int], labels: list[str] | None, processes: list[str]) -> None:
    print("| process | problem | sampler | NFE | std (true 1.0) / FD (floor) | wall (s) |")
    print("|---|---|---|---|---|---|")
    for pname, sde in (("VP", fastsde.VPSDE()), ("EDM", fastsde.EDM())):
        if pname not in processes:
            continue
        gauss = _gaussian(sde, 4)
        mix = fastsde.problems.mixture_nd(sde, dim=16)
        floor = mixture_frechet_floor(mix, n, draws=5)
        for label, solver, opts in CANDIDATES:
            if labels and label not in labels:
                continue
            stds, nfes, walls = [], [], []
            for seed in seeds:
                res = fastsde.sample(gauss, sde, (n, 4), solver=solver, seed=seed, dtype=torch.float64, **opts)
                stds.append(float(res.samples.std(dim=0).mean()))
                nfes.append(res.nfe)
                walls.append(res.wall_time)
            std = " / ".join(f"{s:.3f}" for s in stds)
            print(f"| {pname} | N(0, I) 4-D | {label} | {sum(nfes) / len(nfes):.1f} | {std} | {sum(walls):.1f} |")
            fds, nfes, walls = [], [], []
            for seed in seeds:
                res = fastsde.sample(mix, sde, (n, 16), solver=solver, seed=seed, dtype=torch.float64, **opts)
                fds.append(float(mixture_frechet(res.samples, mix).value))
                nfes.append(res.nfe)
                walls.append(res.wall_time)
            fd = " / ".join(f"{v:.4f}" for v in fds)
            print(
                f"| {pname} | mixture 16-D | {label} | {sum(nfes) / len(nfes):.1f} | {fd} "
                f"({floor[0]:.4f} ± {floor[1]:.4f}) | {sum(walls):.1f} |",
                flush=True,
            )


def digits_rows(n: int, labels: list[str], seeds: list[int]) -> None:
    from fastsde.metrics.digits import digits_quality

    model = fastsde.load_model("digits")
    print("| model | sampler | NFE | FD per seed | floor ± sd (n) | confidence | wall (s) |")
    print("|---|---|---|---|---|---|---|")
    for label, solver, opts in CANDIDATES:
        if label not in labels:
            continue
        fds, conf, nfes, walls = [], [], [], []
        for seed in seeds:
            start = time.perf_counter()
            res = fastsde.sample(model.score, model.sde, (n, *model.shape), solver=solver, seed=seed, **opts)
            walls.append(time.perf_counter() - start)
            q = digits_quality(res.samples)
            fds.append(q["fd"])
            conf.append(q["confidence"])
            nfes.append(res.nfe)
        print(
            f"| digits | {label} | {sum(nfes) / len(nfes):.1f} | {' / '.join(f'{v:.1f}' for v in fds)} | "
            f"{q['floor']:.2f} ± {q['floor_sd']:.2f} ({n}) | {sum(conf) / len(conf):.3f} | {sum(walls):.0f} |",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="samples per exact run")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--digits", type=int, default=0, help="also sample the digits model with this n (0: skip)")
    p.add_argument("--digits-seeds", default="0,1")
    p.add_argument(
        "--digits-runs",
        default="adaptive (GGF, fresh),adaptive_sde_dpm_2m,dpmpp_2m_sde 20,dpmpp_2m_sde 50,dpmpp_2m 20",
        help="labels of CANDIDATES to run on digits",
    )
    p.add_argument("--no-exact", action="store_true")
    p.add_argument("--runs", default="", help="labels of CANDIDATES for the exact problems (default: all)")
    p.add_argument("--processes", default="VP,EDM")
    args = p.parse_args()
    torch.set_num_threads(1)
    if not args.no_exact:
        labels = [r for r in args.runs.split(",") if r]
        exact_rows(args.n, [int(s) for s in args.seeds.split(",")], labels, args.processes.split(","))
    if args.digits:
        digits_rows(args.digits, args.digits_runs.split(","), [int(s) for s in args.digits_seeds.split(",")])


if __name__ == "__main__":
    main()

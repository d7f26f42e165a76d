"""NFE against quality for the adaptive SDE solvers on exact mixtures (not a test).

Quality is the per-mode Fréchet distance FD (fastsde.metrics.mixture.mixture_frechet) of the final
samples to the exact data distribution; ``floor`` is the same statistic on fresh exact samples of
the same size (mean ± sd over 5 draws). A run is *converged* when FD ≤ τ = max(1.1·floor,
floor + 2·sd); "NFE to converge" is the smallest mean NFE among a sampler's runs from which on every
run of that sampler (in increasing NFE) is converged.

    .venv/bin/python benchmarks/adaptive_quick.py --problems 2d,nd16 --processes vp,subvp,ve

Samplers: EM (uniform grid, N grid points = N NFE with the denoise), PC (reverse diffusion +
1 Langevin step, NFE = 2(N−1)+1), ``adaptive`` (Gotta Go Fast, faithful: fresh noise after a
rejection) at ε_rel 0.01/0.02/0.05/0.1, ``adaptive`` with ``brownian="tree"``, and
``adaptive_sde_dpm`` at ε_rel 0.005/0.01/0.02/0.05/0.1 (its default ``brownian="memory"``) and with
``brownian="tree"``, and ``dpmpp_2m_sde`` at 15/20/30/50 grid points. All in float64, t_end the process default,
Tweedie denoise on (counted), seed 0. NFE is the mean per-sample NFE.
"""

from __future__ import annotations

import argparse
import time

import torch

import fastsde
from fastsde.metrics.mixture import mixture_frechet, mixture_frechet_floor
from fastsde.problems import mixture_2d, mixture_nd
from fastsde.sde import process_by_name


def problem(name: str, sde: fastsde.SDE) -> fastsde.GaussianMixture:
    if name == "2d":
        return mixture_2d(sde)
    if name.startswith("nd"):
        return mixture_nd(sde, dim=int(name[2:]))
    raise ValueError(f"problem must be 2d or ndD (e.g. nd16), got {name!r}")


def runs(em_steps: list[int], pc_steps: list[int]) -> list[tuple[str, str, dict]]:
    out: list[tuple[str, str, dict]] = [("em", "em", dict(steps=s)) for s in em_steps]
    out += [("pc", "pc", dict(steps=s, corrector_steps=1)) for s in pc_steps]
    out += [("adaptive", "adaptive", dict(eps_rel=e)) for e in (0.1, 0.05, 0.02, 0.01)]
    out += [("adaptive[tree]", "adaptive", dict(eps_rel=e, brownian="tree")) for e in (0.05, 0.01)]
    out += [("adaptive_sde_dpm", "adaptive_sde_dpm", dict(eps_rel=e)) for e in (0.1, 0.05, 0.02, 0.01, 0.005)]
    out += [("adaptive_sde_dpm[tree]", "adaptive_sde_dpm", dict(eps_rel=e, brownian="tree")) for e in (0.1, 0.05, 0.02)]
    out += [("dpmpp_2m_sde", "dpmpp_2m_sde", dict(steps=s)) for s in (15, 20, 30, 50)]
    return out


def nfe_to_converge(rows: list[tuple[float, float]], tau: float) -> float | None:
    """Smallest NFE from which on (sorted by NFE) every run is converged."""
    rows = sorted(rows)
    best = None
    for nfe, fd in reversed(rows):
        if fd > tau:
            break
        best = nfe
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", default="2d,nd16")
    p.add_argument("--processes", default="vp,subvp,ve")
    p.add_argument("--n", type=int, default=2000, help="samples per run")
    p.add_argument("--em-steps", default="50,100,200,500,1000,2000")
    p.add_argument("--pc-steps", default="100,250,500,1000")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated sampler labels to run (default: all)")
    args = p.parse_args()
    only = set(filter(None, args.only.split(",")))
    torch.set_num_threads(1)
    available = set(fastsde.SOLVERS)
    summary = []
    for prob in args.problems.split(","):
        for proc in args.processes.split(","):
            sde = process_by_name(proc)
            gm = problem(prob, sde)
            shape = (args.n, *gm.dims)
            floor, floor_sd = mixture_frechet_floor(gm, args.n, draws=5, seed=123)
            tau = max(1.1 * floor, floor + 2 * floor_sd)
            print(f"\n## {prob} under {proc} (n = {args.n}): floor {floor:.3e} ± {floor_sd:.1e}, τ = {tau:.3e}")
            print(
                f"{'sampler':18s} {'options':28s} {'NFE':>8s} {'NFE min/max':>12s} {'rej/att':>8s} {'FD':>10s} "
                f"{'FD/floor':>9s} {'s':>6s}"
            )
            by: dict[str, list[tuple[float, float]]] = {}
            em_steps = [int(s) for s in args.em_steps.split(",")]
            pc_steps = [int(s) for s in args.pc_steps.split(",")]
            for label, solver, opts in runs(em_steps, pc_steps):
                if solver not in available or (only and label not in only):
                    continue
                t0 = time.perf_counter()
                res = fastsde.sample(gm, sde, shape, solver=solver, seed=args.seed, dtype=torch.float64, **opts)
                wall = time.perf_counter() - t0
                fd = mixture_frechet(res.samples, gm).value
                rej = ""
                if "rejected" in res.stats:
                    r, a = float(res.stats["rejected"].sum()), float(res.stats["accepted"].sum())
                    rej = f"{r / (r + a):.2f}"
                opt = ", ".join(f"{k}={v}" for k, v in opts.items())
                mm = f"{res.nfe_per_sample.min():.0f}/{res.nfe_per_sample.max():.0f}"
                print(
                    f"{label:18s} {opt:28s} {res.nfe:8.1f} {mm:>12s} {rej:>8s} {fd:10.3e} {fd / floor:9.2f} "
                    f"{wall:6.1f}",
                    flush=True,
                )
                by.setdefault(label, []).append((res.nfe, fd))
            conv = {k: nfe_to_converge(v, tau) for k, v in by.items()}
            print("NFE to converge: " + ", ".join(f"{k} {'—' if v is None else f'{v:.0f}'}" for k, v in conv.items()))
            summary.append((prob, proc, conv))
    print("\n## NFE to converged quality (— = not reached by the runs above)")
    labels = sorted({k for _, _, c in summary for k in c}, key=lambda s: [r[0] for r in runs([1], [1])].index(s))
    print("| problem | process | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for prob, proc, conv in summary:
        cells = [("—" if conv.get(k) is None else f"{conv[k]:.0f}") for k in labels]
        print(f"| {prob} | {proc} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

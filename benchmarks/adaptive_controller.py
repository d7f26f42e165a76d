"""Where does ``adaptive_sde_dpm`` (or ``--solver adaptive_sde_dpm_2m``) spend its evaluations?
Controller settings on the bench mixture.

A measurement, not a test. Runs the adaptive SDE-DPM-Solver++ solver on exactly the problem of
``fastsde bench --problem mixture --dim 16`` (same mixture, same x_T for a given seed, tolerance
swept as the bench sweeps it: eps_abs = 0.78·eps_rel) once per combination of the settings given,
and prints per run: mean NFE per sample, mean accepted and rejected attempts per sample (a rejected
attempt costs 1 NFE for both solvers: the score at the unchanged start is reused), the per-mode Fréchet distance
over τ (the bench's threshold without the reference term), the share of it from the mode weights,
and the accepted steps per sample in six equal bins of λ = log(m/σ) from high noise (left) to low
noise (right). Extra solver options go in ``--options`` as JSON, e.g. '{"max_growth": 2}'.

    .venv/bin/python benchmarks/adaptive_controller.py --process ve --eps 0.05,0.025 --pi 0,0.35
    .venv/bin/python benchmarks/adaptive_controller.py --solver adaptive_sde_dpm_2m --process ve \
        --eps 0.1,0.035 --pi 0.35 --options '{"h_max": Infinity}'

Measured 2026-11-23, docs/benchmarks/adaptive.md, "PI step control" and "`adaptive_sde_dpm_2m`, the default:
one evaluation per step, with a corrector".
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import torch

import fastsde
from fastsde.bench.runner import BenchConfig, converged_threshold, mixture_problem
from fastsde.metrics.mixture import mixture_frechet
from fastsde.noise import Stream, as_noise_source
from fastsde.problems import mixture_nd
from fastsde.sde import PROCESSES
from fastsde.solvers.core.context import StepInfo


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--solver", default="adaptive_sde_dpm", choices=["adaptive_sde_dpm", "adaptive_sde_dpm_2m"])
    p.add_argument("--process", default="vp", choices=sorted(PROCESSES))
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eps", type=floats, default=floats("0.05,0.025"), help="eps_rel values (eps_abs = 0.78·eps_rel)")
    p.add_argument("--pi", type=floats, default=floats("0,0.35"), help="pi_beta values")
    p.add_argument("--options", type=json.loads, default={}, help="further solver options as JSON")
    args = p.parse_args()
    torch.set_num_threads(1)

    prob = mixture_problem(args.process, BenchConfig(n=args.n, processes=[args.process], seed=args.seed))
    sde, gm = prob.sde, mixture_nd(prob.sde, dim=16)
    x_T = sde.prior_sample(as_noise_source(args.seed, args.n).normal(prob.dims, Stream.PRIOR, 0, dtype=prob.dtype))
    tau = converged_threshold(prob.floor, math.nan)  # the bench's τ without the reference term
    ends = sde.log_snr(torch.tensor([sde.T, sde.default_t_end], dtype=torch.float64))
    edges = torch.linspace(float(ends[0]), float(ends[1]), 7, dtype=torch.float64)
    bins = " ".join(f"[{a:.1f},{b:.1f})" for a, b in zip(edges[:-1].tolist(), edges[1:].tolist()))
    print(
        f"{args.process}, n = {args.n}, seed {args.seed}: floor {prob.floor[0]:.4g} ± {prob.floor[1]:.2g}, τ = {tau:.4g}"
    )
    print(f"{args.solver}; λ bins {bins}; options {args.options}")
    print("| eps_rel | pi_beta | NFE | accepted | rejected | FD/τ | weights/τ | accepted steps per λ bin |")
    print("|---|---|---|---|---|---|---|---|")
    for eps, beta in itertools.product(args.eps, args.pi):
        per_bin = torch.zeros(6, dtype=torch.float64)

        def count(info: StepInfo, _per_bin: torch.Tensor = per_bin) -> None:
            lam = sde.log_snr(info.t.to(torch.float64))[info.accepted]
            _per_bin.index_add_(0, torch.bucketize(lam, edges[1:-1]), torch.ones_like(lam))

        opts = {"eps_rel": eps, "eps_abs": 0.78 * eps, "pi_beta": beta, **args.options}
        res = fastsde.sample(
            prob.score, sde, tuple(x_T.shape), solver=args.solver, seed=args.seed, x_init=x_T,
            dtype=torch.float64, callback=count, **opts,
        )  # fmt: skip
        fd = mixture_frechet(res.samples, gm)
        acc, rej = (res.stats[k].double().mean().item() for k in ("accepted", "rejected"))
        steps = " ".join(f"{v:.1f}" for v in (per_bin / args.n).tolist())
        print(
            f"| {eps:g} | {beta:g} | {res.nfe:.1f} | {acc:.1f} | {rej:.2f} | {fd.value / tau:.2f} | "
            f"{fd.weight_term / tau:.2f} | {steps} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

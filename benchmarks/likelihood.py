"""Likelihood benchmark: fastsde's per-sample RK45 against scipy's solve_ivp RK45 (the Score-SDE
reference procedure: the batch flattened into one float64 vector) at the same tolerance.

On an exact mixture (fastsde.problems.mixture_nd) the true log-density is known, so the table shows
the error of each method as well as its NFE and time; on the held-out digits (when a shipped model
exists) it shows bits/dim. Not a test: timings depend on the machine. Times are CPU seconds of this (single-threaded)
process, less sensitive than wall time to other jobs on a shared machine.

    .venv/bin/python benchmarks/likelihood.py [--n 256] [--dim 16] [--tol 1e-5] [--digits-n 128] [--digits-ref 32]
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch

import fastsde
from fastsde.data import load_digits
from fastsde.likelihood.dataset import prepare_data
from fastsde.likelihood.pf_ode import default_likelihood_t_end
from fastsde.sde import process_by_name


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def run_mixture(args: argparse.Namespace) -> list[str]:
    lines = [
        f"Exact mixture: fastsde.problems.mixture_nd(dim={args.dim}, modes=4), n = {args.n} points drawn from "
        f"the marginal at the likelihood's t_end, float64, rtol = atol = {args.tol:g}. "
        "err = mean over points of |log p − log p_true| per dimension (nats); bias = |mean(log p − log p_true)| "
        "per dimension (for Hutchinson the per-point error is probe noise, the bias is what must vanish); "
        "bpd with offset 7.",
        "",
        _row(["process", "trace", "method", "bits/dim", "true bits/dim", "err (nats/dim)", "bias (nats/dim)",
              "NFE / sample", "calls", "CPU time (s)"]),
        _row(["---"] * 10),
    ]  # fmt: skip
    for name in args.processes:
        sde = process_by_name(name)
        gm = fastsde.problems.mixture_nd(sde, dim=args.dim, modes=4, seed=0)
        t_end = default_likelihood_t_end(sde)
        x = gm.sample(args.n, t=t_end, generator=torch.Generator().manual_seed(1))
        true = gm.log_prob(x, t_end)
        true_bpd = float(fastsde.bits_per_dim(true, args.dim).mean())
        for trace in ("exact", "hutchinson"):
            for method in ("rk45", "scipy"):
                start = time.process_time()
                out = fastsde.log_likelihood(gm, sde, x, trace=trace, rtol=args.tol, atol=args.tol, method=method)
                wall = time.process_time() - start
                err = float((out.logp - true).abs().mean()) / args.dim
                bias = abs(float((out.logp - true).mean())) / args.dim
                label = "fastsde rk45 (per sample)" if method == "rk45" else "scipy solve_ivp RK45 (batch)"
                lines.append(
                    _row(
                        [
                            name,
                            trace,
                            label,
                            f"{float(out.bits_per_dim().mean()):.4f}",
                            f"{true_bpd:.4f}",
                            f"{err:.2e}",
                            f"{bias:.2e}",
                            f"{out.nfe:.1f}",
                            str(out.calls),
                            f"{wall:.2f}",
                        ]
                    )
                )
                print(lines[-1], flush=True)
    return lines


def run_ode_sampler(args: argparse.Namespace) -> list[str]:
    """The `ode` solver (sampling, T → t_end) with per-sample steps against scipy on the same noise."""
    lines = [
        "",
        f'ODE sampler (`solver="ode"`, no denoise) on the same mixture, n = {args.n}, same prior draws, '
        f"rtol = atol = {args.tol:g}; max abs Δx = max difference between the two methods' samples.",
        "",
        _row(
            [
                "process",
                "method",
                "NFE / sample",
                "min",
                "max",
                "calls",
                "rejected / sample",
                "max abs Δx",
                "CPU time (s)",
            ]
        ),
        _row(["---"] * 9),
    ]
    for name in args.processes:
        sde = process_by_name(name)
        gm = fastsde.problems.mixture_nd(sde, dim=args.dim, modes=4, seed=0)
        res, cpu = {}, {}
        for method in ("rk45", "scipy"):
            start = time.process_time()
            res[method] = fastsde.sample(
                gm, sde, (args.n, args.dim), solver="ode", seed=0, dtype=torch.float64, denoise=False,
                rtol=args.tol, atol=args.tol, method=method,
            )  # fmt: skip
            cpu[method] = time.process_time() - start
        diff = float((res["rk45"].samples - res["scipy"].samples).abs().max())
        for method, r in res.items():
            rej = f"{float(r.stats['rejected'].double().mean()):.2f}" if method == "rk45" else "–"
            label = "fastsde rk45 (per sample)" if method == "rk45" else "scipy solve_ivp RK45 (batch)"
            nps = r.nfe_per_sample
            lines.append(
                _row(
                    [
                        name,
                        label,
                        f"{r.nfe:.1f}",
                        f"{float(nps.min()):.0f}",
                        f"{float(nps.max()):.0f}",
                        str(r.calls),
                        rej,
                        f"{diff:.1e}",
                        f"{cpu[method]:.2f}",
                    ]
                )
            )
            print(lines[-1], flush=True)
    return lines


def _digits_reference(score, sde, x: torch.Tensor, k: int, tol: float) -> torch.Tensor:
    """log p of the first k rows at a tight tolerance with the network in float64: the yardstick
    for the accuracy of the methods compared (same Hutchinson probes: sample i keeps its keys)."""
    ref_score = copy.deepcopy(score)
    ref_score.model.double()
    seed = fastsde.NoiseSource.from_seed(0, x.shape[0]).subset(list(range(k)))
    out = fastsde.log_likelihood(
        ref_score, sde, x[:k].double(), trace="hutchinson", seed=seed, rtol=tol, atol=tol, max_steps=100_000
    )
    return out.logp


def run_digits(args: argparse.Namespace) -> list[str]:
    model = fastsde.load_model(args.model)
    score = fastsde.differentiable_score(model)
    arr = load_digits("heldout").numpy()[: args.digits_n]
    data = prepare_data(arr, tuple(model.shape), args.levels, 0, torch.float32)
    x, offset, note = data.x, data.offset, data.note
    d = math.prod(model.shape)
    k = min(args.digits_ref, x.shape[0])
    ref_bpd = None
    if k > 0:
        start = time.process_time()
        ref_bpd = fastsde.bits_per_dim(_digits_reference(score, model.sde, x, k, args.ref_tol), d, offset)
        print(f"reference (first {k}, float64, tol {args.ref_tol:g}): {time.process_time() - start:.1f} s", flush=True)
    lines = [
        "",
        f"Held-out digits under the shipped model {args.model!r} ({model.sde!r}, "
        f"{getattr(model, 'config', {}).get('n_params', '?')} parameters), n = {x.shape[0]}, {note}, "
        f"Hutchinson trace (1 Rademacher probe, same probes for every method), rtol = atol = {args.tol:g}, "
        f"bits/dim offset {offset:.4g}. Δ vs ref = bits/dim − reference, per sample, for the first {k} samples; "
        f"the reference solved per sample at rtol = atol = {args.ref_tol:g} with the network in float64; "
        "accepted / rejected = step attempts per sample.",
        "",
        _row(["method", "bits/dim", "± s.e.", f"mean abs Δ vs ref (first {k})", "NFE / sample", "accepted", "rejected",
              "calls", "CPU time (s)"]),
        _row(["---"] * 9),
    ]  # fmt: skip
    variants = [
        ("fastsde rk45 (per sample)", "rk45", True),
        ("fastsde rk45, scipy's shrink rule (measured_exponent=False)", "rk45", False),
        ("scipy solve_ivp RK45 (batch)", "scipy", True),
    ]
    for label, method, measured in variants:
        start = time.process_time()
        out = fastsde.log_likelihood(
            score,
            model.sde,
            x,
            trace="hutchinson",
            rtol=args.tol,
            atol=args.tol,
            method=method,
            measured_exponent=measured,
        )
        wall = time.process_time() - start
        bpd = fastsde.bits_per_dim(out.logp, d, offset)
        se = float(bpd.std()) / math.sqrt(bpd.numel())
        err = "–" if ref_bpd is None else f"{float((bpd[:k].double() - ref_bpd).abs().mean()):.1e}"
        if method == "rk45":
            acc = float(out.stats["accepted"].double().mean())
            rej = float(out.stats["rejected"].double().mean())
        else:
            acc = float(out.stats["accepted"])
            rej = (out.stats["nfev"] - 2) / 6 - acc
        lines.append(
            _row(
                [
                    label,
                    f"{float(bpd.mean()):.4f}",
                    f"{se:.4f}",
                    err,
                    f"{out.nfe:.1f}",
                    f"{acc:.2f}",
                    f"{rej:.2f}",
                    str(out.calls),
                    f"{wall:.1f}",
                ]
            )
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--processes", default="vp,subvp,ve,edm")
    p.add_argument("--model", default="digits")
    p.add_argument("--digits-n", type=int, default=128)
    p.add_argument("--digits-ref", type=int, default=32, help="digits with a tight-tolerance reference (0: none)")
    p.add_argument("--ref-tol", type=float, default=1e-7, help="tolerance of the digits reference")
    p.add_argument("--levels", type=int, default=None, help="levels of the digits data (default: found from the data)")
    p.add_argument("--skip-digits", action="store_true")
    p.add_argument("--skip-mixture", action="store_true")
    args = p.parse_args()
    args.processes = [s for s in args.processes.split(",") if s]
    torch.set_num_threads(1)
    lines = [] if args.skip_mixture else run_mixture(args) + run_ode_sampler(args)
    if not args.skip_digits:
        lines += run_digits(args)
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()

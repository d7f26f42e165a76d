"""The adaptive `ode` in log-SNR (its default coordinate) against `ode` in t, fastsde's
`adaptive_dpmpp_3m` (eps_rel = rtol) and k-diffusion's dpm_adaptive: NFE and per-mode Fréchet
distance (over its finite-sample floor) against the tolerance on the 64-D mixtures in the EDM, VP
and VE forms, 4096 samples, the same x_T for everyone.

    .venv-peers/bin/python benchmarks/ode_logsnr.py          # k-diffusion needed for the peer rows

Prints the markdown table of docs/benchmarks/adaptive.md, "Adaptive ODE solvers". Took 95 s here (two cores,
2026-12-02).
"""

from __future__ import annotations

import sys

import torch

import fastsde
from fastsde.bench.peers import available_peers
from fastsde.metrics.mixture import mixture_frechet, mixture_frechet_floor
from fastsde.noise import NoiseSource, Stream

N, DIM, SEED = 4096, 64, 0
RTOLS = (0.05, 0.02, 0.01, 0.005, 0.002)
PROCESSES = {"EDM": fastsde.EDM, "VP": fastsde.VPSDE, "VE": fastsde.VESDE}


def main() -> None:
    torch.set_num_threads(1)
    peers, notes = available_peers(["kdiff_dpm_adaptive_eta0"])
    for note in notes:
        print(note, file=sys.stderr)
    print(
        "| process | rtol (= atol) | ode (λ) NFE | ode (λ) FD / floor | ode (t) NFE | ode (t) FD / floor"
        " | adaptive_dpmpp_3m NFE | adaptive_dpmpp_3m FD / floor | dpm_adaptive NFE | dpm_adaptive FD / floor |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, make in PROCESSES.items():
        sde = make()
        gm = fastsde.problems.mixture_nd(sde, dim=DIM)
        floor, _ = mixture_frechet_floor(gm, N, draws=3)
        x_T = sde.prior_sample(NoiseSource.from_seed(SEED, N).normal((DIM,), Stream.PRIOR, 0, dtype=torch.float64))
        for rtol in RTOLS:
            row = [name, f"{rtol:g}"]
            for coord in ("logsnr", "time"):
                r = fastsde.sample(
                    gm,
                    sde,
                    (N, DIM),
                    solver="ode",
                    seed=SEED,
                    dtype=torch.float64,
                    rtol=rtol,
                    atol=rtol,
                    coordinate=coord,
                )
                row += [f"{r.nfe:.1f}", f"{mixture_frechet(r.samples, gm).value / floor:.2f}"]
            r = fastsde.sample(
                gm, sde, (N, DIM), solver="adaptive_dpmpp_3m", seed=SEED, dtype=torch.float64, eps_rel=rtol
            )
            row += [f"{r.nfe:.1f}", f"{mixture_frechet(r.samples, gm).value / floor:.2f}"]
            if peers:
                p = peers[0].run(gm, sde, x_T, rtol, sde.default_t_end)
                row += [f"{p.nfe:.1f}", f"{mixture_frechet(p.samples, gm).value / floor:.2f}"]
            else:
                row += ["–", "–"]
            print("| " + " | ".join(row) + " |", flush=True)
    print(f"\nfloor: FD of {N} exact samples (mean of 3 draws); FD / floor ≈ 1 is converged.")


if __name__ == "__main__":
    main()

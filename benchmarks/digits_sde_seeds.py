"""Seed spread of SDE-DPM-Solver++(2M) on the shipped digits model: k-diffusion against fastsde.

`fastsde bench --problem digits` runs each stochastic sampler with one seed. This script asks how
much of a gap between k-diffusion's ``sample_dpmpp_2m_sde`` and fastsde's ``dpmpp_2m_sde`` is the
noise draw rather than the method: both run on the same Karras (EDM ρ = 7) grid from the same x_T
(the bench's prior draw for seed 0), for several noise seeds, with

- ``kdiff tree``: k-diffusion with its own ``BrownianTreeNoiseSampler`` (what the bench runs);
- ``kdiff keyed``: k-diffusion fed fastsde's keyed noise through its ``noise_sampler`` argument;
- ``fastsde``: ``fastsde.sample(..., solver="dpmpp_2m_sde", grid="edm")``.

Needs the peers environment (k-diffusion):

    .venv-peers/bin/python benchmarks/digits_sde_seeds.py --n 1000 --nfe 50 --seeds 0,1,2,3,4,5
"""

from __future__ import annotations

import argparse
import statistics

import torch

import fastsde
from fastsde.bench.peers import EDMDenoiser, karras_sigmas
from fastsde.metrics.digits import digits_quality, floor_for, floor_sd_for
from fastsde.noise import Stream, as_noise_source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="samples per run")
    ap.add_argument("--nfe", type=int, default=50, help="NFE per sample (the final denoise included)")
    ap.add_argument("--seeds", default="0,1,2,3,4,5", help="noise seeds, comma-separated")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    from k_diffusion import sampling

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    model = fastsde.load_model("digits")
    sde, score, dims = model.sde, model.score, tuple(model.shape)
    x_T = sde.prior_sample(as_noise_source(0, args.n).normal(dims, Stream.PRIOR, 0, dtype=torch.float32))
    # k-diffusion: nfe - 1 Karras sigmas plus 0 (its last step is the denoise); fastsde: nfe grid points
    sigmas = karras_sigmas(sde, args.nfe - 1, sde.default_t_end, dtype=torch.float32)
    m_T = float(sde.mean_coeff(torch.tensor([sde.T])))

    def kdiff(noise_sampler) -> float:
        x = sampling.sample_dpmpp_2m_sde(
            EDMDenoiser(score, sde), x_T / m_T, sigmas, disable=True, noise_sampler=noise_sampler
        )
        return float(digits_quality(x)["fd"])

    rows: dict[str, list[float]] = {"kdiff tree": [], "kdiff keyed": [], "fastsde": []}
    for seed in seeds:
        tree = sampling.BrownianTreeNoiseSampler(x_T, float(sigmas[-2]), float(sigmas[0]), seed=seed)
        rows["kdiff tree"].append(kdiff(tree))
        keyed, move = as_noise_source(seed, args.n), [0]

        def keyed_noise(sigma, sigma_next, keyed=keyed, move=move):
            move[0] += 1
            return keyed.normal(dims, Stream.STEP, move[0] - 1, dtype=torch.float32)

        rows["kdiff keyed"].append(kdiff(keyed_noise))
        res = fastsde.sample(score, sde, (args.n, *dims), solver="dpmpp_2m_sde", grid="edm", steps=args.nfe,
                             seed=seed, x_init=x_T)  # fmt: skip
        assert res.nfe == args.nfe
        rows["fastsde"].append(float(digits_quality(res.samples)["fd"]))
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()), flush=True)

    print(f"\ndigits, n = {args.n}, {args.nfe} NFE, Karras grid; floor {floor_for(args.n):.2f} ± "
          f"{floor_sd_for(args.n):.2f}\n")  # fmt: skip
    print("| noise | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |")
    print("|---|" + "---|" * (len(seeds) + 1))
    for name, vals in rows.items():
        sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {statistics.mean(vals):.1f} ± {sd:.1f} |")


if __name__ == "__main__":
    main()

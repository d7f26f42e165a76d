"""ᾱ of fastsde's discrete VP processes against diffusers' DDPMScheduler table (docs/benchmarks/model-kinds.md,
"Discrete DDPM schedules"): max relative error over the 1000 training timesteps, timestep i at
t = (i + 1)/N, built from the scheduler (its float64 table) and from its float32 betas.

    .venv/bin/python benchmarks/discrete_schedules.py
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

import fastsde


def main() -> None:
    print("| schedule | from_diffusers_scheduler | from_betas(scheduler.betas) |")
    print("|---|---|---|")
    for kind in ("linear", "squaredcos_cap_v2", "scaled_linear"):
        sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=kind)
        table = sched.alphas_cumprod.double()
        t = (torch.arange(1000, dtype=torch.float64) + 1) / 1000
        cells = []
        for sde in (fastsde.VPSDE.from_diffusers_scheduler(sched), fastsde.VPSDE.from_betas(sched.betas)):
            cells.append(f"{float(((sde.mean_coeff(t) ** 2 - table).abs() / table).max()):.1e}")
        print(f"| {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

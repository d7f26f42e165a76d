"""Why the adaptive `ode` (Dormand–Prince in log-SNR) needs more NFE than dpm_adaptive on the 64-D
EDM mixture, measured three ways (docs/benchmarks/adaptive.md, "Why RK45 does not get there on these mixtures"):

1. placement: Dormand–Prince in ode's remainder form on fixed λ grids of k steps, uniform and
   warped towards the mode-choice region, against the per-mode Fréchet distance (4096 samples);
2. estimate: the true local error of one step from the solution at λ (a fine solve of the same
   step) against ode's embedded 5(4) estimate, by λ and step h (1024 samples);
3. caps: `fastsde.sample(solver="ode")` with h_max 1.5 (default), 2, 3 and no cap on EDM, VP, VE.

    .venv/bin/python benchmarks/ode_limits.py [placement,estimate,caps]   # 72 s here

Sections 1 and 2 step the exact mixture denoiser directly with ode's tableau (the stepper's
formula on a given λ grid, which `ode` itself cannot be given); section 3 is the public call.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor

import fastsde
from fastsde.metrics.mixture import mixture_frechet, mixture_frechet_floor
from fastsde.noise import NoiseSource, Stream
from fastsde.solvers.ode import _A, _B, _C, _E, DOPRI_NFE_START, DormandPrince

N, DIM, SEED = 4096, 64, 0
PROCESSES = {"EDM": fastsde.EDM, "VP": fastsde.VPSDE, "VE": fastsde.VESDE}


class Problem:
    """The 64-D mixture under a process: its exact denoiser D(u, λ) on u = x/m, ends, floor, x_T."""

    def __init__(self, name: str) -> None:
        self.sde = PROCESSES[name]()
        self.gm = fastsde.problems.mixture_nd(self.sde, dim=DIM)
        self.floor, _ = mixture_frechet_floor(self.gm, N, draws=3)
        self.ends = torch.tensor([self.sde.T, self.sde.default_t_end], dtype=torch.float64)
        self.lam0, self.lam1 = self.sde.log_snr(self.ends).tolist()
        noise = NoiseSource.from_seed(SEED, N).normal((DIM,), Stream.PRIOR, 0, dtype=torch.float64)
        self.u_T = self.sde.prior_sample(noise) / float(self.sde.mean_coeff(self.ends[:1]))

    def denoised(self, u: Tensor, lam: float) -> Tensor:
        t = self.sde.t_from_lambda(torch.full((u.shape[0],), lam, dtype=torch.float64))
        m, s = self.sde.mean_coeff(t), self.sde.marginal_std(t)
        return u + (s * s / m)[:, None] * self.gm.score(m[:, None] * u, t)

    def step(self, u: Tensor, d: Tensor, lam: float, h: float) -> tuple[Tensor, Tensor, Tensor]:
        """ode's step from (u, D(u)) at λ by h: (u_new, D(u_new), embedded 5(4) error on u)."""
        a, ks = u - d, [torch.zeros_like(u)]
        for j in range(1, 6):
            r = h * sum(c * k for c, k in zip(_A[j], ks))
            s = _C[j] * h
            ks.append(self.denoised(math.exp(-s) * a + d + r, lam + s) - d - r)
        r_new = h * sum(b * k for b, k in zip(_B, ks))
        u_new = math.exp(-h) * a + d + r_new
        d_new = self.denoised(u_new, lam + h)
        ks.append(d_new - d - r_new)
        return u_new, d_new, h * sum(e * k for e, k in zip(_E, ks))

    def solve(self, lams: list[float], u: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Along the λ grid from u (default: the prior draw): (u, D) at its end."""
        u = self.u_T if u is None else u
        d = self.denoised(u, lams[0])
        for lam, nxt in zip(lams[:-1], lams[1:]):
            u, d, _ = self.step(u, d, lam, nxt - lam)
        return u, d


def warped(p: Problem, k: int, c: float, centre: float) -> list[float]:
    """k steps over [λ0, λ1]: uniform for c = 0; for c < 0 shorter near `centre` (a fraction of the
    way) and longer at the ends, λ(s) = λ0 + span·(s − c·(sin 2π(s − centre + ½) − ramp)/2π)."""
    span = p.lam1 - p.lam0
    s = torch.linspace(0, 1, k + 1, dtype=torch.float64)
    wave = torch.sin(2 * math.pi * (s - centre + 0.5))
    ramp = (1 - s) * math.sin(2 * math.pi * (0.5 - centre)) + s * math.sin(2 * math.pi * (1.5 - centre))
    lams = (p.lam0 + span * (s - c * (wave - ramp) / (2 * math.pi))).tolist()
    lams[0], lams[-1] = p.lam0, p.lam1
    return lams


def placement() -> None:
    p = Problem("EDM")
    print("| steps | NFE | grid | steps in λ | FD / floor |")
    print("|---|---|---|---|---|")
    grids = [(k, 0.0) for k in (4, 5, 6, 7, 8)] + [(5, -0.5), (5, -0.7), (5, -0.9), (6, -0.3), (6, -0.5)]
    for k, c in grids:
        lams = warped(p, k, c, centre=0.45)
        _, d = p.solve(lams)  # D at t_end is the final denoise (ode's FSAL value)
        fd = mixture_frechet(d, p.gm).value / p.floor
        hs = ", ".join(f"{b - a:.2f}" for a, b in zip(lams[:-1], lams[1:]))
        name = "uniform in λ" if c == 0 else f"warped, c = {c:g}"
        nfe = DOPRI_NFE_START + DormandPrince.nfe_per_step * k  # as `ode` counts it
        print(f"| {k} | {nfe} | {name} | {hs} | {fd:.2f} |", flush=True)


def estimate() -> None:
    p = Problem("EDM")
    u, lam = p.u_T[:1024], p.lam0
    d = p.denoised(u, lam)
    print(
        "| λ (σ) | h | true error, median | true error, max | true / estimate, median | true / estimate, worst sample |"
    )
    print("|---|---|---|---|---|---|")
    for start in (p.lam0, -2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.5):
        while lam < start - 1e-12:  # the accurate path to the start (steps of 0.05)
            h = min(0.05, start - lam)
            u, d, _ = p.step(u, d, lam, h)
            lam += h
        for h in (1.0, 2.0, 3.0):
            if start + h > p.lam1:
                continue
            u_new, _, err = p.step(u, d, lam, h)
            k = max(8, int(h / 0.02))
            u_ref, _ = p.solve([lam + h * i / k for i in range(k + 1)], u)
            scale = 1 + u_ref.abs()

            def rms(v: Tensor, scale: Tensor = scale) -> Tensor:
                return (v / scale).pow(2).mean(dim=1).sqrt()

            true = rms(u_new - u_ref)
            ratio = true / rms(err)
            worst = int(true.argmax())
            print(
                f"| {start:.2f} ({math.exp(-start):.3g}) | {h:g} | {true.median():.2e} | {true.max():.2e} | "
                f"{ratio.median():.2f} | {ratio[worst]:.2f} |",
                flush=True,
            )


def caps() -> None:
    print("| process | h_max | rtol (= atol) | NFE | FD / floor | accepted | rejected |")
    print("|---|---|---|---|---|---|---|")
    for name in PROCESSES:
        p = Problem(name)
        for h_max in (None, 2.0, 3.0, math.inf):
            for rtol in (0.05, 0.01, 0.002):
                opts = {} if h_max is None else {"h_max": h_max}
                r = fastsde.sample(
                    p.gm, p.sde, (N, DIM), solver="ode", seed=SEED, dtype=torch.float64, rtol=rtol, atol=rtol, **opts
                )
                fd = mixture_frechet(r.samples, p.gm).value / p.floor
                acc, rej = r.stats["accepted"].double().mean(), r.stats["rejected"].double().mean()
                cap = "1.5 (default)" if h_max is None else f"{h_max:g}"
                print(f"| {name} | {cap} | {rtol:g} | {r.nfe:.1f} | {fd:.2f} | {acc:.2f} | {rej:.2f} |", flush=True)


def main() -> None:
    torch.set_num_threads(1)
    sections = {"placement": placement, "estimate": estimate, "caps": caps}
    wanted = sys.argv[1].split(",") if len(sys.argv) > 1 else list(sections)
    for name in wanted:
        print(f"\n### {name}\n")
        sections[name]()


if __name__ == "__main__":
    main()

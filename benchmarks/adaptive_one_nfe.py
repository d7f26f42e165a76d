"""Can SDE-DPM-Solver++(2M) choose its own steps at one evaluation per step? (research, not a test)

A negative result kept reproducible. Every rule below advances each sample by SDE-DPM-Solver++(2M)
in half log-SNR λ (first step first order, 1 NFE per step, fresh noise per step) and differs only
in how the next step h is chosen from what the sample has already seen (x̂0 at its last two points
and the noise of its last step), so a step never waits for a new evaluation and never selects noise:

- ``uniform``: no choice, N steps uniform in λ (fastsde's ``dpmpp_2m_sde``; the baseline to beat).
- ``correction``: the embedded 1st/2M pair. h is the largest step whose 2M correction
  ½·m_t(1 − e^{−2h})·h·(x̂0_s − x̂0_p)/h_p has scaled-L2 norm ≤ θ = 0.9 against the mixed tolerance
  δ = max(0.78·ε, ε·|x_s|) (GGF's test; here it needs no new evaluation, so retries are free and
  the step is solved for by bisection); growth ≤ 2× per step, as for the other rules.
- ``weak``: the first-order step has the exact conditional mean; its error is the missing
  covariance m_t²(1 − e^{−2h})²·Cov[x0 | x_s], relative to the local covariance ≈ (2h)²·P(I − P)
  with P = m·∂x̂0/∂x. Per sample, with N the last step's noise and Δ = x̂0_s − x̂0_p (≈ ∂x̂0/∂x·N
  since x̂0 is a martingale along the reverse SDE): tr P/d ≈ m·N·Δ/|N|², tr P²/d ≈ m²|Δ|²/|N|²;
  w = |tr P − tr P²|/d and h = ½·√(ε/w), growth ≤ 2× per step.
- ``weak_ahead``: as ``weak`` with w(h) = min(w·e^{2h}, ¼) (P grows like e^{2λ} at high noise).

Measured 2026-11-23, re-run 2026-12-01 with NoiseSource noise and CountingScore NFE (``uniform`` is
fastsde's ``dpmpp_2m_sde`` itself), mixture 16-D, n = 10 000, seed 0: see
docs/benchmarks/adaptive.md, "One evaluation per step". Every adaptive rule needs more NFE than the
uniform grid for the same quality: ``correction`` puts most steps at low noise (where |x| sets δ);
``weak`` skips the range where the modes separate (x̂0 hardly moves just before it, so the estimate
cannot see it coming); ``weak_ahead`` fixes that by spending steps at high noise instead.

    .venv/bin/python benchmarks/adaptive_one_nfe.py --process vp
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

import fastsde
from fastsde.metrics.mixture import mixture_frechet, mixture_frechet_floor
from fastsde.noise import Stream
from fastsde.problems import mixture_nd
from fastsde.sde import process_by_name

SETTINGS = {
    "uniform": [15, 20, 25, 30, 40, 50],
    "correction": [0.005, 0.003, 0.002, 0.001, 0.0005],
    "weak": [0.02, 0.01, 0.005, 0.002],
    "weak_ahead": [0.05, 0.02, 0.01, 0.005],
}
THETA = 0.9


def run(gm: fastsde.GaussianMixture, sde: fastsde.SDE, rule: str, setting: float, n: int, seed: int):
    """Samples, mean NFE per sample (final denoise included) and the λ of every step taken.

    Sample i's prior draw and the noise of its k-th step come from fastsde's NoiseSource (Stream.PRIOR,
    and Stream.STEP with counter k), the NFE from CountingScore, as in fastsde's own solvers."""
    f64 = torch.float64
    if rule == "uniform":
        res = fastsde.sample(gm, sde, (n, *gm.dims), solver="dpmpp_2m_sde", steps=int(setting), seed=seed, dtype=f64)
        grid = fastsde.time_grid(sde, res.options["grid"], int(setting), sde.T, sde.default_t_end)
        visited = sde.log_snr(grid[:-1]).repeat(n).numpy()
        return res.samples, float(res.nfe_per_sample.mean()), visited
    noise_source = fastsde.NoiseSource.from_seed(seed, n)
    score = fastsde.CountingScore(gm.score, n)
    d = gm.dims[0]
    t_hi, t_lo = torch.tensor(sde.T, dtype=f64), torch.tensor(sde.default_t_end, dtype=f64)
    x = sde.prior_sample(noise_source.normal((d,), Stream.PRIOR, 0, dtype=f64))
    lam0, lam1 = float(sde.log_snr(t_hi)), float(sde.log_snr(t_lo))
    lam = torch.full((n,), lam0, dtype=f64)
    x0_prev, noise_prev = torch.zeros(n, d, dtype=f64), torch.zeros(n, d, dtype=f64)
    h_prev = torch.zeros(n, dtype=f64)
    step = torch.zeros(n, dtype=torch.int64)  # each sample's own step counter: keys its noise
    active = torch.ones(n, dtype=torch.bool)
    visited = []
    while bool(active.any()):
        idx = active.nonzero().squeeze(1)
        lam_s = lam[idx]
        at_end = lam_s >= lam1 - 1e-12
        t = torch.where(at_end, t_lo.expand_as(lam_s), sde.t_from_lambda(lam_s))
        xs = x[idx]
        x0 = sde.denoise(xs, t, score(xs, t, idx))
        m_s = sde.mean_coeff(t)
        hp = h_prev[idx]
        has_prev = hp > 0
        delta = x0 - x0_prev[idx]
        h = torch.full_like(lam_s, 0.1)
        h = torch.where(has_prev, choose_step(rule, setting, sde, t, lam_s, xs, delta, noise_prev[idx], hp, m_s), h)
        rem = lam1 - lam_s
        last = h >= rem - 1e-9
        lam_t = torch.where(last, torch.full_like(lam_s, lam1), lam_s + h)
        tn = torch.where(last, t_lo.expand_as(lam_s), sde.t_from_lambda(lam_t))
        h = lam_t - lam_s
        coef = 1.0 - torch.exp(-2.0 * h)
        m_t, s_t, s_s = sde.mean_coeff(tn), sde.marginal_std(tn), sde.marginal_std(t)
        out = (s_t / s_s * torch.exp(-h))[:, None] * xs + (m_t * coef)[:, None] * x0
        slope = delta / torch.where(has_prev, hp, torch.ones_like(hp))[:, None]
        out = out + torch.where(has_prev, 0.5 * m_t * coef * h, torch.zeros_like(h))[:, None] * slope
        z = noise_source.normal((d,), Stream.STEP, step[idx], rows=idx, dtype=f64)
        noise = (s_t * coef.sqrt())[:, None] * z
        x[idx] = out + noise
        x0_prev[idx], noise_prev[idx], h_prev[idx], lam[idx] = x0, noise, h, lam_t
        step[idx] += 1
        visited.append(lam_s.numpy())
        active[idx[last]] = False
    t_end = t_lo.expand(n)
    x = sde.denoise(x, t_end, score(x, t_end))
    return x, score.nfe, np.concatenate(visited)


def choose_step(rule, eps, sde, t, lam_s, xs, delta, noise_prev, hp, m_s) -> torch.Tensor:
    """The next step in λ per sample, from the sample's past only."""
    if rule == "correction":
        tol = torch.clamp_min(eps * xs.abs(), 0.78 * eps)
        slope = delta / hp[:, None]

        def err(h: torch.Tensor) -> torch.Tensor:
            t_next = sde.t_from_lambda(lam_s + h)
            c = 0.5 * sde.mean_coeff(t_next) * (1.0 - torch.exp(-2.0 * h)) * h
            return ((c[:, None] * slope / tol) ** 2).mean(dim=1).sqrt()

        lo, hi = torch.zeros_like(lam_s), torch.full_like(lam_s, 20.0)
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            fits = err(mid) <= THETA
            lo, hi = torch.where(fits, mid, lo), torch.where(fits, hi, mid)
        return torch.minimum(torch.clamp_min(lo, 1e-4), 2.0 * hp)
    nn = (noise_prev * noise_prev).sum(dim=1).clamp_min(1e-300)
    tr_p = m_s * (noise_prev * delta).sum(dim=1) / nn
    tr_p2 = m_s**2 * (delta * delta).sum(dim=1) / nn
    w = (tr_p - tr_p2).abs().clamp_min(1e-12)
    h = 0.5 * (eps / w).sqrt()
    if rule == "weak_ahead":
        h = torch.full_like(w, 0.1)
        for _ in range(8):
            h = 0.5 * (eps / torch.clamp_max(w * torch.exp(2.0 * h), 0.25)).sqrt()
    return torch.minimum(h, 2.0 * hp)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--process", default="vp", choices=["subvp", "ve", "vp"])
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rules", default=",".join(SETTINGS))
    args = p.parse_args()
    torch.set_num_threads(1)
    sde = process_by_name(args.process)
    gm = mixture_nd(sde, dim=16)
    floor, sd = mixture_frechet_floor(gm, args.n, draws=30, seed=args.seed + 12345)
    tau = max(1.1 * floor, floor + 2 * sd)
    lam0, lam1 = (float(v) for v in sde.log_snr(torch.tensor([1.0, sde.default_t_end], dtype=torch.float64)))
    edges = np.linspace(math.floor(lam0), math.ceil(lam1), 7)
    bins = " ".join(f"[{a:.1f},{b:.1f})" for a, b in zip(edges[:-1], edges[1:]))
    print(f"{args.process}: floor {floor:.4g} ± {sd:.2g}, τ = {tau:.4g}; steps per sample in λ bins {bins}")
    print("| rule | setting | NFE | FD | FD/τ | steps per λ bin |\n|---|---|---|---|---|---|")
    for rule in args.rules.split(","):
        for setting in SETTINGS[rule]:
            x, nfe, visited = run(gm, sde, rule, setting, args.n, args.seed)
            fd = mixture_frechet(x, gm).value
            hist = np.histogram(visited, edges)[0] / args.n
            print(
                f"| {rule} | {setting:g} | {nfe:.1f} | {fd:.3g} | {fd / tau:.2f} | {' '.join(f'{v:.1f}' for v in hist)} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

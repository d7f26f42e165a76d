"""Golden outputs: every registered solver on every process at two or more option settings, and
``log_likelihood``, from fixed seeds on an exact 2-D mixture in float64.

They were recorded before the driver refactor (issue 14) from the solvers as they were, and
``tests/test_golden.py`` checks that the solvers still produce them: the refactor must not move
results. Regenerate only on purpose (a change that is meant to move results), with

    .venv/bin/python tests/golden.py

which rewrites ``tests/data/golden.safetensors``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import fastsde

F64 = torch.float64
N = 6
PATH = Path(__file__).parent / "data" / "golden.safetensors"

PROCESSES = {
    "vp": lambda: fastsde.VPSDE(),
    "subvp": lambda: fastsde.SubVPSDE(),
    "ve": lambda: fastsde.VESDE(sigma_min=0.01, sigma_max=50.0),
    "edm": lambda: fastsde.EDM(sigma_min=0.002, sigma_max=80.0),
}

#: solver -> option settings (each a dict passed to fastsde.sample).
SETTINGS: dict[str, list[dict[str, Any]]] = {
    "em": [dict(steps=12), dict(steps=9, grid="logsnr")],
    "reverse_diffusion": [dict(steps=12), dict(steps=9, grid="edm")],
    "ancestral": [dict(steps=12), dict(steps=9, grid="logsnr")],
    "pc": [dict(steps=10), dict(steps=8, corrector_steps=2, predictor="ancestral", per_sample_norm=True)],
    "euler": [dict(steps=12), dict(steps=9, grid="uniform")],
    "heun": [dict(steps=8), dict(steps=6, s_churn=5.0, s_tmin=0.05, s_tmax=10.0)],
    "ddim": [dict(steps=10), dict(steps=8, eta=1.0), dict(steps=8, eta=0.5, denoise=False)],
    "dpmpp_2m": [dict(steps=10), dict(steps=16, lower_order_final=False, grid="edm")],
    "dpmpp_2m_sde": [dict(steps=10), dict(steps=12, solver_type="heun", corrector=True, eta=0.5)],
    # coordinate="time": the method the record was made with (the default became "logsnr", issue 19)
    "ode": [
        dict(rtol=1e-3, atol=1e-3, coordinate="time"),
        dict(rtol=1e-2, atol=1e-2, h_init=0.05, coordinate="time"),
        dict(method="scipy", rtol=1e-3, coordinate="time"),
    ],
    "adaptive": [
        dict(eps_rel=0.05),
        dict(eps_rel=0.05, brownian="tree", reuse_rejected=True, pi_beta=0.3, corrector_steps=1),
        dict(eps_rel=0.1, brownian="memory", improved_euler=False, compact=False, use_prev="x", norm="linf"),
    ],
    "adaptive_sde_dpm": [
        dict(eps_rel=0.05),
        dict(eps_rel=0.05, brownian="tree", use_prev=True, extrapolate=False, corrector_steps=1),
        dict(eps_rel=0.1, brownian="fresh", reuse_rejected=False, norm="l2"),
    ],
    "adaptive_sde_dpm_2m": [dict(eps_rel=0.05), dict(eps_rel=0.05, brownian="fresh", h_max=math.inf, pi_beta=0.0)],
}

LIKELIHOOD: list[dict[str, Any]] = [
    dict(trace="exact", rtol=1e-4, atol=1e-4),
    dict(trace="hutchinson", rtol=1e-4, atol=1e-4, seed=3),
    dict(trace="exact", method="scipy", rtol=1e-4, atol=1e-4),
]


def sample_case(proc: str, solver: str, opts: dict[str, Any]) -> fastsde.SampleResult:
    sde = PROCESSES[proc]()
    gm = fastsde.problems.mixture_2d(sde)
    return fastsde.sample(gm, sde, (N, 2), solver=solver, seed=7, dtype=F64, **opts)


def likelihood_case(proc: str, opts: dict[str, Any]) -> fastsde.LikelihoodResult:
    sde = PROCESSES[proc]()
    gm = fastsde.problems.mixture_2d(sde)
    x = gm.sample(4, generator=torch.Generator().manual_seed(1))
    return fastsde.log_likelihood(gm, sde, x, **opts)


def sample_cases():
    for proc in PROCESSES:
        for solver, settings in SETTINGS.items():
            for i, opts in enumerate(settings):
                yield f"{proc}/{solver}/{i}", proc, solver, opts


def likelihood_cases():
    for proc in PROCESSES:
        for i, opts in enumerate(LIKELIHOOD):
            yield f"{proc}/likelihood/{i}", proc, opts


def record() -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, proc, solver, opts in sample_cases():
        res = sample_case(proc, solver, opts)
        out[f"{key}/samples"] = res.samples.contiguous()
        out[f"{key}/nfe"] = res.nfe_per_sample.contiguous()
        for stat in ("accepted", "rejected"):
            if stat in res.stats:
                out[f"{key}/{stat}"] = torch.as_tensor(res.stats[stat]).to(torch.int64).contiguous()
    for key, proc, opts in likelihood_cases():
        res = likelihood_case(proc, opts)
        out[f"{key}/logp"] = res.logp.contiguous()
        out[f"{key}/nfe"] = res.nfe_per_sample.to(F64).contiguous()
    return out


def load() -> dict[str, torch.Tensor]:
    return load_file(str(PATH))


if __name__ == "__main__":
    torch.set_num_threads(1)
    PATH.parent.mkdir(exist_ok=True)
    data = record()
    tmp = PATH.with_suffix(".tmp")
    save_file(data, str(tmp))
    tmp.replace(PATH)
    print(f"wrote {len(data)} tensors to {PATH}")

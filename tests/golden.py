"""Golden outputs: every registered solver on every process at two or more option settings, and
``log_likelihood``, from fixed seeds on an exact 2-D mixture in float64.

They were recorded before the driver refactor (issue 14) from the solvers as they were, and
``tests/test_golden.py`` checks that the solvers still produce them: the refactor must not move
results. Regenerate only on purpose (a change that is meant to move results), with

    .venv/bin/python tests/golden.py

which rewrites ``tests/data/golden.safetensors``.

Path-sensitive cases: an adaptive SDE solver whose Brownian path is queried at the times the
controller computes (``brownian="tree"`` or ``"memory"``) cannot be pinned sample by sample across
CPUs. W is Hölder-½ in its argument (the tree interpolates across leaves of width 2⁻³² of the range,
slope ~1/√width), so a last-bit change in a step's end time (another SIMD width or vendor math
library) moves W by ~1e-11; the controller turns that into other step sizes, and the whole path moves
(measured: 1-ulp perturbations of the error estimate move these 6-sample records by up to 2.3 in a
sample and 23 % in mean NFE). For them the record also holds their step statistics over
``N_STATS`` samples (mean NFE, accepted and rejected steps); how far last-bit perturbations move
those is measured by

    .venv/bin/python tests/golden.py --spread

(``STATS_RTOL`` in the test is about twice the largest move it printed).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import fastsde

F64 = torch.float64
N = 6
#: samples of a path-sensitive case's statistics record
N_STATS = 32
#: Brownian paths queried at computed times (see the module docstring)
PATH_SENSITIVE_BROWNIAN = ("tree", "memory")
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


def path_sensitive(solver: str, opts: dict[str, Any]) -> bool:
    """Whether a case's path depends on the last bit of the CPU's arithmetic (module docstring)."""
    spec = fastsde.SOLVERS[solver]
    if "brownian" not in spec.options:
        return False
    return opts.get("brownian", spec.options["brownian"].default) in PATH_SENSITIVE_BROWNIAN


def stats_case(proc: str, solver: str, opts: dict[str, Any]) -> torch.Tensor:
    """Mean NFE, accepted and rejected steps per sample over N_STATS samples (float64, shape (3,))."""
    sde = PROCESSES[proc]()
    gm = fastsde.problems.mixture_2d(sde)
    res = fastsde.sample(gm, sde, (N_STATS, 2), solver=solver, seed=7, dtype=F64, **opts)
    mean = [torch.as_tensor(res.stats[k]).to(F64).mean() for k in ("accepted", "rejected")]
    return torch.stack([res.nfe_per_sample.mean(), *mean])


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
        if path_sensitive(solver, opts):
            out[f"{key}/stats"] = stats_case(proc, solver, opts).contiguous()
    for key, proc, opts in likelihood_cases():
        res = likelihood_case(proc, opts)
        out[f"{key}/logp"] = res.logp.contiguous()
        out[f"{key}/nfe"] = res.nfe_per_sample.to(F64).contiguous()
    return out


def load() -> dict[str, torch.Tensor]:
    return load_file(str(PATH))


def spread(perturbations: int = 6) -> None:
    """Print, per path-sensitive case, the largest relative move of its statistics when the
    controller's error estimate is multiplied by (1 + k·2⁻⁵²), k = 1..perturbations."""
    from fastsde.solvers.core.controllers import Adaptive

    error = Adaptive.error
    k = [0]
    Adaptive.error = lambda self, x, res, prev: error(self, x, res, prev) * (1 + k[0] * 2.0**-52)
    try:
        for key, proc, solver, opts in sample_cases():
            if not path_sensitive(solver, opts):
                continue
            k[0] = 0
            base = stats_case(proc, solver, opts)
            moves = []
            for k[0] in range(1, perturbations + 1):
                moves.append(((stats_case(proc, solver, opts) - base).abs() / base.abs()).tolist())
            worst = torch.tensor(moves).amax(dim=0).tolist()
            print(f"{key:28s} nfe {worst[0]:.3f}  accepted {worst[1]:.3f}  rejected {worst[2]:.3f}", flush=True)
    finally:
        Adaptive.error = error


if __name__ == "__main__":
    torch.set_num_threads(1)
    if "--spread" in sys.argv:
        spread()
        sys.exit(0)
    PATH.parent.mkdir(exist_ok=True)
    data = record()
    tmp = PATH.with_suffix(".tmp")
    save_file(data, str(tmp))
    tmp.replace(PATH)
    print(f"wrote {len(data)} tensors to {PATH}")

"""DPM-Solver++(3M) against 2M on the PF-ODE: error at t_end against a tight per-sample RK45 solve
from the same prior draws (16-D exact mixture, 500 samples, float64), on the fixed grid for both
3M forms and under the adaptive controller. Prints the tables of docs/benchmarks/which-solver.md, "Third order
or second? DPM-Solver++(3M)".

    .venv/bin/python benchmarks/dpmpp_3m.py
"""

from __future__ import annotations

import torch

import fastsde

F64 = torch.float64
STEPS = [6, 8, 11, 16, 21, 31, 61, 121]
TOLS = [1e-2, 3e-3, 1e-3, 3e-4, 1e-4]


def main() -> None:
    torch.set_num_threads(1)
    n, dim = 500, 16
    for name in ("vp", "edm"):
        sde = fastsde.sde.process_by_name(name)
        gm = fastsde.problems.mixture_nd(sde, dim=dim)
        x_init = sde.prior_sample(fastsde.NoiseSource.from_seed(0, n).normal((dim,), 1, 0, dtype=F64))
        kw = dict(x_init=x_init, dtype=F64, denoise=False)
        ref = fastsde.sample(gm, sde, (n, dim), solver="ode", rtol=1e-10, atol=1e-10, **kw).samples

        def err(x: torch.Tensor, ref: torch.Tensor = ref) -> str:
            return f"{float((x - ref).norm(dim=1).median()):.2e}"

        print(f"\n{name}: median ‖x − x_ref‖ at t_end, fixed grid (N points = NFE without the denoise)")
        print("| solver | " + " | ".join(f"N={s}" for s in STEPS) + " |")
        print("|---|" + "---|" * len(STEPS))
        for label, solver, opts in (
            ("dpmpp_2m", "dpmpp_2m", {}),
            ("dpmpp_3m form=peer (default)", "dpmpp_3m", {"form": "peer"}),
            ("dpmpp_3m form=exact", "dpmpp_3m", {"form": "exact"}),
        ):
            row = [err(fastsde.sample(gm, sde, (n, dim), solver=solver, steps=s, **opts, **kw).samples) for s in STEPS]
            print(f"| {label} | " + " | ".join(row) + " |")
        print(f"\n{name}: adaptive_dpmpp_3m (mean NFE without the denoise, error)")
        print("| eps_rel | mean NFE | rejected per sample | error |")
        print("|---|---|---|---|")
        for tol in TOLS:
            res = fastsde.sample(gm, sde, (n, dim), solver="adaptive_dpmpp_3m", eps_rel=tol, **kw)
            rej = float(res.stats["rejected"].double().mean())
            print(f"| {tol:g} | {res.nfe:.1f} | {rej:.2f} | {err(res.samples)} |")


if __name__ == "__main__":
    main()

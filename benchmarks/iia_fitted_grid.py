"""IIA on a fitted grid: does an IIA table fitted on the shipped fitted grid of `digits`
improve on the base solver on that grid? For dpmpp_2m at 5, 6, 8 and 10 NFE: the base solver on its
default grid, on the shipped fitted grid, and `iia_dpmpp_2m` with a table fitted (seed 100, n = 256)
on the fitted grid; digits FD at n = 500 on seeds 0 and 1 (held out from the fits).

    .venv/bin/python benchmarks/iia_fitted_grid.py

Prints the markdown table of docs/benchmarks/few-step.md, "IIA on the fitted grids".
"""

from __future__ import annotations

import torch

import fastsde
from fastsde.metrics.digits import digits_quality

STEPS, N_EVAL, SEEDS, FIT_SEED, N_FIT = (5, 6, 8, 10), 500, (0, 1), 100, 256


def main() -> None:
    torch.set_num_threads(1)
    model = fastsde.load_model("digits")
    shape = (N_EVAL, *model.shape)
    print("| NFE | default grid | fitted grid | IIA on the fitted grid |")
    print("|---|---|---|---|")
    for steps in STEPS:
        grid = fastsde.shipped_grid("digits", "dpmpp_2m", steps)
        table = fastsde.fit_iia(
            model.score, model.sde, solver="iia_dpmpp_2m", steps=steps, n=N_FIT, seed=FIT_SEED,
            dtype=torch.float32, grid=grid,
        )  # fmt: skip
        cells = []
        for kw in (
            dict(solver="dpmpp_2m"),
            dict(solver="dpmpp_2m", grid=grid),
            dict(solver="iia_dpmpp_2m", grid=grid, table=table),
        ):
            fds = []
            for seed in SEEDS:
                res = fastsde.sample(model.score, model.sde, shape, steps=steps, seed=seed, **kw)
                fds.append(digits_quality(res.samples)["fd"])
            cells.append(" / ".join(f"{v:.1f}" for v in fds))
        print(f"| {steps} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

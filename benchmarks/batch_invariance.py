"""Does sample i depend on the batch it was drawn in? For each solver, draw the same n samples (per-sample
seeds: rows [lo, hi) of a run use ``NoiseSource.from_seed(seed, hi - lo, start=lo)``, as sample_to_dir
does) in one batch of n, in batches of 7 and one at a time, and report the largest |difference| from the
one-batch samples, row by row. Models: the shipped ``digits`` network (float32) and the exact 2-D mixture
(``fastsde.problems.mixture_2d`` under VP) in float64 and float32. One thread. Writes
docs/bench/batch_invariance.json.

    .venv/bin/python benchmarks/batch_invariance.py          # ~13 min on a busy 2-core machine

The expensive runs (PARTIAL: on digits ``em``, ``adaptive``, ``adaptive_dpmpp_3m``, ``ode``; on the mixture
``em`` and ``adaptive``) draw the first ROWS_PARTIAL rows only at batch sizes 7 and 1 (the table says so);
everything else draws all n rows at every batch size.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

import fastsde

ROOT = Path(__file__).resolve().parents[1]
JSON = ROOT / "docs" / "bench" / "batch_invariance.json"

#: solver -> (family, options); em at 200 steps to keep one-at-a-time runs short
SOLVERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("fixed grid, deterministic", {}),
    "dpmpp_2m": ("fixed grid, deterministic", {}),
    "unipc": ("fixed grid, deterministic", {}),
    "dpmpp_2m_sde": ("fixed grid, stochastic", {}),
    "em": ("fixed grid, stochastic", {"steps": 200}),
    "adaptive_sde_dpm_2m": ("adaptive, stochastic (default)", {}),
    "adaptive_dpmpp_3m": ("adaptive, deterministic", {}),
    "adaptive": ("adaptive, stochastic", {}),
    "ode": ("adaptive, deterministic", {}),
}
#: (model, solver) pairs whose draws at batch sizes 7 and 1 cover the first ROWS_PARTIAL rows only (cost)
ROWS_PARTIAL = 16
PARTIAL = {
    ("digits", "em"),
    ("digits", "adaptive"),
    ("digits", "adaptive_dpmpp_3m"),
    ("digits", "ode"),
    ("mixture_2d", "em"),
    ("mixture_2d", "adaptive"),
}
BATCHES = (7, 1)


def draw(score: Any, sde: fastsde.SDE, dims: tuple[int, ...], rows: int, batch: int, solver: str, opts: dict,
         dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, float]:  # fmt: skip
    """Rows [0, rows) of the run with ``seed``, drawn in batches of ``batch``: (samples, mean NFE)."""
    parts, nfe = [], 0.0
    for lo in range(0, rows, batch):
        hi = min(rows, lo + batch)
        noise = fastsde.NoiseSource.from_seed(seed, hi - lo, start=lo)
        res = fastsde.sample(score, sde, (hi - lo, *dims), solver=solver, seed=noise, dtype=dtype, **opts)
        parts.append(res.samples)
        nfe += res.nfe * (hi - lo)
    return torch.cat(parts), nfe / rows


def measure(n: int, seed: int) -> list[dict[str, Any]]:
    """Every (model, dtype, solver): the largest |difference| of batch sizes 7 and 1 from batch size n."""
    vp = fastsde.VPSDE()
    model = fastsde.load_model("digits")
    cases = [
        ("digits", model.score, model.sde, tuple(model.shape), torch.float32),
        ("mixture_2d", fastsde.problems.mixture_2d(vp), vp, (2,), torch.float64),
        ("mixture_2d", fastsde.problems.mixture_2d(vp), vp, (2,), torch.float32),
    ]
    rows = []
    for name, score, sde, dims, dtype in cases:
        for solver, (family, opts) in SOLVERS.items():
            t0 = time.perf_counter()
            ref, nfe = draw(score, sde, dims, n, n, solver, opts, dtype, seed)
            row: dict[str, Any] = {
                "model": name, "dtype": str(dtype).removeprefix("torch."), "solver": solver, "family": family,
                "options": opts, "n": n, "nfe": round(nfe, 2),
            }  # fmt: skip
            for b in BATCHES:
                m = min(ROWS_PARTIAL, n) if (name, solver) in PARTIAL else n
                got, _ = draw(score, sde, dims, m, b, solver, opts, dtype, seed)
                diff = (got.double() - ref[:m].double()).abs()
                row[f"max_diff_b{b}"] = float(diff.max())
                row[f"rows_b{b}"] = m
                row[f"identical_b{b}"] = bool(torch.equal(got, ref[:m]))
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(table_line(row), flush=True)
    return rows


def table_line(r: dict[str, Any]) -> str:
    """One markdown row: model, dtype, solver, family, NFE, then max |difference| at batch 7 and 1."""

    def cell(b: int) -> str:
        d = r[f"max_diff_b{b}"]
        text = "0 (identical)" if r[f"identical_b{b}"] else f"{d:.1e}"
        return text if r[f"rows_b{b}"] == r["n"] else f"{text} ({r[f'rows_b{b}']} rows)"

    opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
    solver = f"`{r['solver']}`" + (f" ({opts})" if opts else "")
    return f"| {r['model']} | {r['dtype']} | {solver} | {r['family']} | {r['nfe']:g} | {cell(7)} | {cell(1)} |"


HEADER = (
    "| model | dtype | solver | family | NFE | max \\|Δ\\| batch 7 vs 64 | max \\|Δ\\| batch 1 vs 64 |\n"
    "|---|---|---|---|---|---|---|"
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=JSON)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(HEADER, flush=True)
    t0 = time.perf_counter()
    rows = measure(args.n, args.seed)
    record = {
        "command": "python benchmarks/batch_invariance.py",
        "n": args.n,
        "seed": args.seed,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "wall_s": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wall {record['wall_s']} s; wrote {args.out}")


if __name__ == "__main__":
    main()

"""CPU wall time of each fit_* call at its defaults on the shipped digits models (docs/benchmarks/few-step.md,
"What fitting costs").

    .venv/bin/python benchmarks/fit_costs.py            # prints a table, writes docs/bench/fit_costs.json

One thread; each call's CPU time (what it costs on an idle core, whatever else the machine runs) and
its wall time in this run. ``fit_iia`` and ``fit_grid`` run to the end at their defaults on ``digits``. ``fit_mlem``
at its defaults (30 iterations) on the shipped three-model hierarchy takes over half an hour, so it
runs ``--mlem-iters`` iterations (default 2) in one call, and the full time is its set-up time (the
reference solve and the first objective, from the schedule's own history) plus 30 times its mean time
per iteration (each iteration costs the same: the same n, steps and levels); the table says which rows
are extrapolated.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import fastsde

OUT = Path(__file__).resolve().parent.parent / "docs" / "bench" / "fit_costs.json"
HIERARCHY = ["digits-h-small", "digits-h-medium", "digits-h-large"]


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of fn(): on one thread the CPU time is what the call
    costs on an idle core, whatever else the machine runs; the wall time shows the load."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mlem-iters", type=int, default=2, help="fit_mlem iterations actually run (>= 2)")
    ap.add_argument("--skip", default="", help="comma-separated calls to skip: iia,grid,mlem")
    args = ap.parse_args()
    torch.set_num_threads(1)
    skip = set(filter(None, args.skip.split(",")))
    rows = []
    model = fastsde.load_model("digits")
    if "iia" not in skip:
        wall, cpu = _timed(lambda: fastsde.fit_iia(model.score, model.sde))
        rows.append(
            {"call": "fit_iia(m.score, m.sde)", "model": "digits", "wall_s": wall, "cpu_s": cpu, "extrapolated": False}
        )
        print(rows[-1], flush=True)
    if "grid" not in skip:
        wall, cpu = _timed(lambda: fastsde.fit_grid(model.score, model.sde))
        rows.append(
            {"call": "fit_grid(m.score, m.sde)", "model": "digits", "wall_s": wall, "cpu_s": cpu, "extrapolated": False}
        )
        print(rows[-1], flush=True)
    if "mlem" not in skip:
        levels = fastsde.Levels.from_models(HIERARCHY)
        sde = fastsde.load_model(HIERARCHY[-1]).sde
        k = max(2, args.mlem_iters)
        sched = fastsde.fit_mlem(levels, sde, (1, 8, 8), iters=k)
        hist = sched.fit["history"]  # wall and CPU time at the end of set-up and of each iteration
        marks, cpu = [h["seconds"] for h in hist], [h["cpu_seconds"] for h in hist]
        setup, per_iter = marks[0], (marks[-1] - marks[0]) / k
        cpu_setup, cpu_per_iter = cpu[0], (cpu[-1] - cpu[0]) / k
        rows.append(
            {
                "call": "fit_mlem(Levels.from_models(digits-h-*), sde, (1, 8, 8))",
                "model": "digits-h-small/medium/large",
                "wall_s": setup + 30 * per_iter,
                "cpu_s": cpu_setup + 30 * cpu_per_iter,
                "extrapolated": True,
                "measured": {
                    "iters": k,
                    "setup_s": setup,
                    "per_iter_s": per_iter,
                    "cpu_setup_s": cpu_setup,
                    "cpu_per_iter_s": cpu_per_iter,
                },
            }
        )
        print(rows[-1], flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for r in rows:
        r["load_average_at_end"] = load
    if skip and OUT.exists():  # keep the rows of the calls skipped this time from the last run
        ran = {r["call"] for r in rows}
        rows = [r for r in json.loads(OUT.read_text())["rows"] if r["call"] not in ran] + rows
    record = {"torch": torch.__version__, "threads": 1, "rows": rows}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(record, indent=2) + "\n")
    print("\n| call (defaults) | model | CPU time (one thread) | wall (this run) | |\n|---|---|---|---|---|")
    for r in rows:
        note = "extrapolated to 30 iterations" if r["extrapolated"] else "measured"
        print(f"| `{r['call']}` | {r['model']} | {r['cpu_s'] / 60:.1f} min | {r['wall_s'] / 60:.1f} min | {note} |")
    print(f"\nwrote {OUT} (load average at the end of this run: {load})")


if __name__ == "__main__":
    main()

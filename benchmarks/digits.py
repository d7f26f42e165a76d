"""Digits benchmark: quality (FD in the shipped classifier's features, against the real-data floor)
and NFE of several solvers on every shipped digits model. Not a test: it prints a table.

    .venv/bin/python benchmarks/digits.py --n 200 --write docs/bench/digits_models.md

The table of docs/benchmarks/model-kinds.md, "The shipped digits models".

Runs on one CPU thread; cost grows with n × NFE × model size.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import fastsde
from fastsde.metrics.digits import digits_quality, load_classifier

# (label, solver, options); solvers that are not registered are skipped
RUNS = [
    ("EM-1000", "em", {"steps": 1000}),
    ("EM-100", "em", {"steps": 100}),
    ("PC-100", "pc", {"steps": 100}),
    ("ode 1e-3", "ode", {"rtol": 1e-3, "atol": 1e-3}),
    ("adaptive", "adaptive", {}),
]
MODELS = ("digits-small", "digits", "digits-large", "digits-ve")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="samples per run")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--runs", default=",".join(r[0] for r in RUNS), help="labels of the runs to do")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", default=None, help="write the markdown table to this file")
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    wanted = set(args.runs.split(","))
    rows = []
    header = "| model | eval cost | solver | NFE | wall (s) | FD | floor ± sd (n) | FD / floor | confidence |"
    print(header)
    print("|" + "---|" * 9, flush=True)
    lines = [header, "|" + "---|" * 9]
    for name in args.models.split(","):
        model = fastsde.load_model(name)
        for label, solver, opts in RUNS:
            if label not in wanted or solver not in fastsde.SOLVERS:
                continue
            start = time.perf_counter()
            res = fastsde.sample(model.score, model.sde, (args.n, *model.shape), solver=solver, seed=args.seed, **opts)
            wall = time.perf_counter() - start
            q = digits_quality(res.samples)
            ratio = q["fd"] / q["floor"] if math.isfinite(q["fd"]) else math.inf
            row = {
                "model": name,
                "eval_cost": model.eval_cost,
                "run": label,
                "solver": solver,
                "options": opts,
                "nfe": res.nfe,
                "wall_s": wall,
                **q,
                "ratio": ratio,
            }
            rows.append(row)
            line = (
                f"| {name} | {model.eval_cost:.1f} | {label} | {res.nfe:.1f} | {wall:.1f} | {q['fd']:.2f} | "
                f"{q['floor']:.2f} ± {q['floor_sd']:.2f} ({args.n}) | {ratio:.2f} | {q['confidence']:.3f} |"
            )
            lines.append(line)
            print(line, flush=True)
    command = "python benchmarks/digits.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if args.write:
        text = [
            "# Digits benchmark",
            "",
            f"Command: `{command}` (one CPU thread, seed {args.seed}, {args.n} samples per run).",
            "",
            "FD: Fréchet distance between the samples and the 300 held-out digits in the 64-d penultimate",
            "features of the shipped classifier (`fastsde.metrics.digits`); floor: the same FD for n real",
            "train-split digits, mean ± sd over random subsets (FD is biased upwards at small n, so compare",
            "with the floor at the same n; the sd is the noise of one FD at that n: one seed per row here).",
            "Confidence: mean max-softmax of the classifier (held-out digits: "
            f"{load_classifier()[1]['heldout_confidence']:.3f}).",
            "Eval cost: FLOPs of one network evaluation relative to digits-small.",
            "",
            *lines,
            "",
        ]
        Path(args.write).write_text("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The digits frontier: the best fastsde and the best peer digits FD at each small NFE budget, per seed.

Reads the results of two `fastsde bench --problem digits` runs (seeds 0 and 1) and prints the table
in docs/benchmarks/which-solver.md ("The digits model at 4–10 NFE"):

    S=$(cat benchmarks/frontier_digits_samplers.txt)
    for seed in 0 1; do
      .venv-peers/bin/fastsde bench --problem digits --n 500 --seed $seed --budgets 4,5,6,8,10 \\
          --samplers $S --no-progress --out runs/bench/frontier_digits_s$seed
    done
    .venv/bin/python benchmarks/frontier_digits.py runs/bench/frontier_digits_s0 runs/bench/frontier_digits_s1

The stochastic samplers at the same budgets ("Stochastic samplers on the digits model") are the
same two runs with the samplers in benchmarks/frontier_digits_stochastic.txt and --out
runs/bench/frontier_digits_stoch_s$seed, plus two with the variants in
benchmarks/frontier_digits_stochastic_variants.txt, --no-peers and --out
runs/bench/frontier_digits_stochv_s$seed; then, per seed, the two runs joined by "+":

    .venv/bin/python benchmarks/frontier_digits.py \\
        runs/bench/frontier_digits_stoch_s0+runs/bench/frontier_digits_stochv_s0 \\
        runs/bench/frontier_digits_stoch_s1+runs/bench/frontier_digits_stochv_s1

For runs without fitted variants the script prints every sampler's FD per budget.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(dirs: list[str]) -> list[list[dict]]:
    """The records of each seed's run; an argument "A+B" joins the records of runs A and B."""
    return [
        [r for d in arg.split("+") for r in json.loads((Path(d) / "results.json").read_text())["records"]]
        for arg in dirs
    ]


def qualities(runs: list[list[dict]]) -> dict[tuple[int, str, float], float]:
    """(seed index, sampler, budget) -> FD of every record that ran without error."""
    return {
        (i, r["sampler"], r["budget"]): r["quality"] for i, recs in enumerate(runs) for r in recs if r["error"] is None
    }


def main(runs: list[list[dict]]) -> None:
    """Best fastsde sampler against the best peer at each budget and seed."""
    budgets = sorted({r["budget"] for r in runs[0]})
    print("| NFE | seed | best fastsde (FD) | best peer (FD) | fastsde better? |")
    print("|---|---|---|---|---|")
    for b in budgets:
        for seed, recs in enumerate(runs):
            rows = [r for r in recs if r["budget"] == b and r["error"] is None and r["quality"] is not None]
            fs = min((r for r in rows if r["source"] == "fastsde"), key=lambda r: r["quality"])
            pe = min((r for r in rows if r["source"] != "fastsde"), key=lambda r: r["quality"])
            better = "yes" if fs["quality"] < pe["quality"] else "**no**"
            print(
                f"| {b} | {seed} | `{fs['sampler']}` {fs['quality']:.1f} (NFE {fs['nfe']:g}) | "
                f"`{pe['sampler']}` {pe['quality']:.1f} (NFE {pe['nfe']:g}) | {better} |"
            )


def fitted_table(runs: list[list[dict]]) -> None:
    """Each `<solver>_fitted` variant against its solver on the default grid: FD per seed."""
    fq = qualities(runs)
    fitted = sorted({name for (_, name, _) in fq if name.endswith("_fitted")})
    budgets = sorted({b for (_, name, b) in fq if name in fitted})
    print()
    print(
        "| solver | grid | "
        + " | ".join(f"FD@{b} (seeds {', '.join(map(str, range(len(runs))))})" for b in budgets)
        + " |"
    )
    print("|---|---|" + "---|" * len(budgets))
    for name in fitted:
        base = name.removesuffix("_fitted")
        for label, key in (("default", base), ("fitted", name)):
            cells = [
                " / ".join(f"{fq[(i, key, b)]:.1f}" if (i, key, b) in fq else "–" for i in range(len(runs)))
                for b in budgets
            ]
            print(f"| `{base}` | {label} | " + " | ".join(cells) + " |")


def sampler_table(runs: list[list[dict]]) -> None:
    """Every sampler's FD per budget and seed (for runs without fitted variants)."""
    fq = qualities(runs)
    names = list(dict.fromkeys(r["sampler"] for r in runs[0]))
    budgets = sorted({b for (_, _, b) in fq})
    seeds = ", ".join(map(str, range(len(runs))))
    print()
    print("| sampler | " + " | ".join(f"FD@{b} (seeds {seeds})" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for name in names:
        cells = [
            " / ".join(f"{fq[(i, name, b)]:.1f}" if (i, name, b) in fq else "–" for i in range(len(runs)))
            for b in budgets
        ]
        print(f"| `{name}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    runs = load(sys.argv[1:])
    main(runs)
    if any(r["sampler"].endswith("_fitted") for r in runs[0]):
        fitted_table(runs)
    else:
        sampler_table(runs)

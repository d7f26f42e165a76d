"""Adaptive SDE solvers against 1000-step EM on the shipped digits model, over several seeds
(docs/benchmarks/adaptive.md, "Digits: adaptive solvers against 1000-step EM").

Every configuration is sampled with n samples for each seed; the table gives, per configuration,
the mean NFE, the FD (mean ± standard error over seeds, and sd), the FD against the real-data floor
at the same n (``fastsde.metrics.digits.floor_for`` / ``floor_sd_for``), the classifier confidence,
and the comparison with the reference configuration (EM-1000 by default):

- Δ = mean FD − mean FD(reference), with se_Δ = √(se² + se_ref²) (unpaired) and, as a secondary
  reading, the paired Δ over the seeds both have (same seed ⇒ same prior draws);
- **matches** iff Δ ≤ 2·se_Δ (not worse than the reference beyond about two standard errors of
  seed-to-seed noise); **target** iff it matches at mean NFE ≤ reference NFE / 3.

    .venv/bin/python benchmarks/digits_adaptive.py --seeds 0,1,2 --json
    .venv/bin/python benchmarks/digits_adaptive.py --no-defaults --seeds 0,1,2 --json \\
        --config 'sde-dpm-2m:adaptive_sde_dpm_2m:' --config 'sde-dpm-2m 0.05:adaptive_sde_dpm_2m:eps_rel=0.05'

``--config 'label:solver:key=val,key=val'`` (repeatable) adds a configuration; values are parsed as
int, float, true/false, or else kept as strings. With ``--json`` every finished run is appended to
the JSON file at once, and runs already in it (same model, n, label, options, seed) are skipped, so
an interrupted or extended command resumes; the table is built from every run in the file with the
same model, n and one of ``--seeds`` (``--only`` narrows it, the reference row stays), so rows added later by another
invocation (e.g. new solvers) sit next to the reference.
``--report`` prints the table from the JSON without sampling. Runs on one CPU thread; the loop is
seed-major (all configurations for seed 0, then seed 1, ...), so a cut-short run still has complete
seeds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import fastsde
from fastsde.metrics.digits import digits_quality, floor_for, floor_sd_for

Config = tuple[str, str, dict[str, Any]]

DEFAULT_CONFIGS: list[Config] = [
    ("EM-1000", "em", {"steps": 1000}),
    ("EM-333", "em", {"steps": 333}),
    ("adaptive 0.01", "adaptive", {"eps_rel": 0.01}),
    ("adaptive 0.02", "adaptive", {"eps_rel": 0.02}),
    ("adaptive 0.05", "adaptive", {"eps_rel": 0.05}),
    ("adaptive 0.1", "adaptive", {"eps_rel": 0.1}),
    ("adaptive tree 0.02", "adaptive", {"eps_rel": 0.02, "brownian": "tree"}),
    ("adaptive tree 0.05", "adaptive", {"eps_rel": 0.05, "brownian": "tree"}),
    ("sde-dpm", "adaptive_sde_dpm", {}),
    ("sde-dpm 0.05", "adaptive_sde_dpm", {"eps_rel": 0.05}),
]
DEFAULT_JSON = Path(__file__).with_suffix(".json")
COMMON_OPTIONS = {"t_end", "denoise"}


def _value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_config(spec: str) -> Config:
    """'label:solver:key=val,key=val' (options optional) → (label, solver, options)."""
    parts = spec.split(":", 2)
    if len(parts) < 2 or not parts[0].strip() or not parts[1].strip():
        raise ValueError(f"--config must look like 'label:solver:key=val,key=val', got {spec!r}")
    label, solver = parts[0].strip(), parts[1].strip()
    opts: dict[str, Any] = {}
    for item in (parts[2] if len(parts) == 3 else "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ValueError(f"option {item!r} in --config {spec!r} must be key=value")
        key, val = item.split("=", 1)
        opts[key.strip()] = _value(val)
    return label, solver, opts


def check_config(cfg: Config) -> None:
    """Fail before any compute on an unknown solver or option."""
    label, solver, opts = cfg
    if solver not in fastsde.SOLVERS:
        raise ValueError(f"config {label!r}: unknown solver {solver!r}; known: {sorted(fastsde.SOLVERS)}")
    valid = set(fastsde.SOLVERS[solver].options) | COMMON_OPTIONS
    bad = sorted(set(opts) - valid)
    if bad:
        raise ValueError(f"config {label!r}: unknown option(s) {bad} for {solver!r}; valid: {sorted(valid)}")


def _key(model: str, n: int, label: str, solver: str, opts: dict[str, Any], seed: int) -> str:
    return json.dumps([model, n, label, solver, opts, seed], sort_keys=True)


def _provenance() -> dict[str, Any]:
    """git HEAD, dirty files and a hash of the solver sources actually imported."""
    root = Path(__file__).resolve().parent.parent

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return ""

    src = Path(fastsde.__file__).resolve().parent / "solvers"
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(src.glob("*.py")))).hexdigest()[:16]
    return {"head": git("rev-parse", "HEAD"), "dirty": git("status", "--porcelain").splitlines(), "solvers_sha": digest}


def run_one(model: Any, name: str, n: int, cfg: Config, seed: int) -> dict[str, Any]:
    """Sample one configuration for one seed and measure it."""
    label, solver, opts = cfg
    start = time.perf_counter()
    res = fastsde.sample(model.score, model.sde, (n, *model.shape), solver=solver, seed=seed, **opts)
    wall = time.perf_counter() - start
    q = digits_quality(res.samples)
    rec: dict[str, Any] = {
        "model": name,
        "n": n,
        "label": label,
        "solver": solver,
        "options": opts,
        "seed": seed,
        "nfe": float(res.nfe),
        "nfe_max": float(res.nfe_per_sample.max()),
        "calls": int(res.calls),
        "wall_s": wall,
        "fd": float(q["fd"]),
        "confidence": float(q["confidence"]),
    }
    for k in ("accepted", "rejected"):
        v = res.stats.get(k)
        if isinstance(v, Tensor):
            rec[f"{k}_mean"] = float(v.double().mean())
    return rec


def summarise(records: list[dict[str, Any]], labels: list[str], reference: str) -> list[dict[str, Any]]:
    """Per-label statistics over seeds, with the comparison against the reference label."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by.setdefault(r["label"], []).append(r)
    order = [lab for lab in labels if lab in by] + sorted(set(by) - set(labels))
    rows = []
    for lab in order:
        rs = sorted(by[lab], key=lambda r: r["seed"])
        if len({json.dumps([r["solver"], r["options"]], sort_keys=True) for r in rs}) > 1:
            raise ValueError(f"label {lab!r} names runs with different solvers/options; use distinct labels")
        fd = np.array([r["fd"] for r in rs])
        k = len(rs)
        sd = float(fd.std(ddof=1)) if k > 1 else math.nan
        rows.append(
            {
                "label": lab,
                "solver": rs[0]["solver"],
                "options": rs[0]["options"],
                "seeds": [r["seed"] for r in rs],
                "fd_by_seed": fd.tolist(),
                "nfe": float(np.mean([r["nfe"] for r in rs])),
                "fd": float(fd.mean()),
                "fd_sd": sd,
                "fd_se": sd / math.sqrt(k) if k > 1 else math.nan,
                "confidence": float(np.mean([r["confidence"] for r in rs])),
                "wall_s": float(np.mean([r["wall_s"] for r in rs])),
                "rejected": float(np.mean([r["rejected_mean"] for r in rs])) if "rejected_mean" in rs[0] else None,
            }
        )
    ref = next((r for r in rows if r["label"] == reference), None)
    for r in rows:
        r.update(delta=math.nan, delta_se=math.nan, paired=math.nan, paired_se=math.nan, matches=None, target=None)
        if ref is None or r is ref:
            continue
        r["delta"] = r["fd"] - ref["fd"]
        r["delta_se"] = math.sqrt(r["fd_se"] ** 2 + ref["fd_se"] ** 2)
        ref_by_seed = dict(zip(ref["seeds"], ref["fd_by_seed"], strict=True))
        diffs = [f - ref_by_seed[s] for s, f in zip(r["seeds"], r["fd_by_seed"], strict=True) if s in ref_by_seed]
        if diffs:
            r["paired"] = float(np.mean(diffs))
            r["paired_se"] = float(np.std(diffs, ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else math.nan
        if math.isfinite(r["delta_se"]):
            r["matches"] = bool(r["delta"] <= 2.0 * r["delta_se"])
            r["target"] = bool(r["matches"] and r["nfe"] <= ref["nfe"] / 3.0)
    return rows


def _pm(m: float, s: float, digits: int = 2) -> str:
    return f"{m:.{digits}f} ± {s:.{digits}f}" if math.isfinite(s) else f"{m:.{digits}f}"


def table(rows: list[dict[str, Any]], n: int, reference: str) -> str:
    """The markdown table."""
    floor, floor_sd = floor_for(n), floor_sd_for(n)
    head = (
        "| config | solver | options | seeds | NFE | FD mean ± se | FD sd | (FD − floor) / floor sd | confidence "
        f"| Δ FD vs {reference} (± se) | paired Δ (± se) | matches | ≤ ⅓ NFE and matches |"
    )
    out = [head, "|" + "---|" * 13]
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "defaults"
        yes = {True: "yes", False: "no", None: "—"}
        out.append(
            f"| {r['label']} | {r['solver']} | {opts} | {len(r['seeds'])} | {r['nfe']:.1f} | "
            f"{_pm(r['fd'], r['fd_se'])} | {r['fd_sd']:.2f} | {(r['fd'] - floor) / floor_sd:+.2f} | "
            f"{r['confidence']:.3f} | "
            + (
                "reference | — | — | — |"
                if r["label"] == reference
                else "no reference | — | — | — |"
                if not math.isfinite(r["delta"])
                else f"{r['delta']:+.2f} ± {r['delta_se']:.2f} | {r['paired']:+.2f} ± {r['paired_se']:.2f} | "
                f"{yes[r['matches']]} | {yes[r['target']]} |"
            )
        )
    out.append("")
    out.append(f"Floor at n = {n}: {floor:.2f} ± {floor_sd:.2f} (mean ± sd of the real-data FD).")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits")
    p.add_argument("--n", type=int, default=300, help="samples per run")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--config", action="append", default=[], help="'label:solver:key=val,...' (repeatable)")
    p.add_argument("--no-defaults", action="store_true", help="run only the --config configurations")
    p.add_argument("--only", default=None, help="comma-separated labels to run (of defaults and --config)")
    p.add_argument("--reference", default="EM-1000", help="label the others are compared with")
    p.add_argument("--json", nargs="?", const=str(DEFAULT_JSON), default=None, help=f"(default {DEFAULT_JSON.name})")
    p.add_argument("--report", action="store_true", help="only print the table from the JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    configs = ([] if args.no_defaults else list(DEFAULT_CONFIGS)) + [parse_config(c) for c in args.config]
    if args.only:
        wanted = {s.strip() for s in args.only.split(",")}
        configs = [c for c in configs if c[0] in wanted]
    if len({c[0] for c in configs}) != len(configs):
        raise ValueError(f"duplicate labels in {[c[0] for c in configs]}")
    for c in configs:
        check_config(c)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    path = Path(args.json) if args.json else None
    data: dict[str, Any] = {"runs": []}
    if path is not None and path.exists():
        data = json.loads(path.read_text())
    done = {_key(r["model"], r["n"], r["label"], r["solver"], r["options"], r["seed"]) for r in data["runs"]}

    if not args.report:
        model = fastsde.load_model(args.model)
        prov = _provenance()
        command = "python benchmarks/digits_adaptive.py " + " ".join(sys.argv[1:] if argv is None else argv)
        for seed in seeds:
            for cfg in configs:
                if _key(args.model, args.n, cfg[0], cfg[1], cfg[2], seed) in done:
                    continue
                rec = run_one(model, args.model, args.n, cfg, seed)
                rec.update(provenance=prov, command=command)
                data["runs"].append(rec)
                print(
                    f"[{cfg[0]} seed {seed}] NFE {rec['nfe']:.1f}  FD {rec['fd']:.2f}  conf {rec['confidence']:.3f}  "
                    f"wall {rec['wall_s']:.0f} s",
                    flush=True,
                )
                if path is not None:
                    path.write_text(json.dumps(data, indent=1) + "\n")

    labels = [c[0] for c in configs]
    runs = [r for r in data["runs"] if r["model"] == args.model and r["n"] == args.n and r["seed"] in seeds]
    if args.only:
        runs = [r for r in runs if r["label"] in labels or r["label"] == args.reference]
    rows = summarise(runs, labels, args.reference)
    print()
    print(f"model {args.model}, n = {args.n}")
    print(table(rows, args.n, args.reference))
    if path is not None and rows:
        data["summary"] = {"model": args.model, "n": args.n, "reference": args.reference, "rows": rows}
        path.write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`fastsde sample --solver mlem --levels A,B,C [--p auto | --p 0.2,0.05]`: the options' checks
(before any model is loaded) and the compute report: cost per level, total compute, EM with the
largest network at the same steps, their ratio."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from . import CLIError


def parse_levels(text: str) -> list[str]:
    """--levels A,B,C: at least two shipped models or model folders, coarse to fine, each named once."""
    import fastsde

    names = [s.strip() for s in text.split(",")]
    if any(not s for s in names):
        raise CLIError(f"--levels must be model names separated by commas, got {text!r}")
    if len(names) < 2:
        raise CLIError(
            f"--levels needs at least 2 models (coarse to fine), got {text!r}; for one model use --model {names[0]}"
        )
    unknown = [s for s in names if s not in fastsde.list_models() and not Path(s).is_dir()]
    if unknown:
        raise CLIError(
            f"--levels: unknown model {unknown[0]!r}; shipped models: {', '.join(fastsde.list_models())}, "
            "or model folders (fastsde train --out DIR)"
        )
    if len(set(names)) != len(names):
        raise CLIError(f"--levels names a model twice: {text!r}")
    return names


def parse_p(text: str, corrections: int) -> Any:
    """--p: 'auto', one probability in (0, 1] for every correction, one per correction, or the file
    of a learned schedule (``fastsde fit-mlem``)."""
    from ..solvers.mlem_schedule import check_p

    if text.strip() == "auto":
        return "auto"
    if text.endswith(".safetensors") or Path(text).is_file():  # a learned schedule (fastsde fit-mlem)
        from ..artifacts.mlem import load_mlem
        from .checks import reading

        with reading("--p", text, "an ML-EM schedule file (fastsde fit-mlem)"):
            return load_mlem(text)
    try:
        vals = [float(s) for s in text.split(",")]
    except ValueError:
        raise CLIError(f"--p must be 'auto' or probabilities in (0, 1] separated by commas, got {text!r}") from None
    try:
        check_p("--p", vals)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if len(vals) == 1:
        return vals[0]
    if len(vals) != corrections:
        raise CLIError(
            f"--p gives {len(vals)} probabilities but {corrections + 1} levels have {corrections} corrections "
            "(one number applies to all)"
        )
    return vals


def check_args(args: argparse.Namespace, solver: str, opts: dict[str, Any]) -> list[str] | None:
    """The --levels / --p checks before compute; sets opts["p"]. Returns the level names (or None)."""
    if args.levels is None:
        if args.p is not None:
            raise CLIError("--p applies to --solver mlem --levels A,B,...")
        return None
    if solver != "mlem":
        raise CLIError(f"--levels needs --solver mlem, got --solver {solver}")
    if args.model is not None:
        raise CLIError("give --levels or --model, not both")
    names = parse_levels(args.levels)
    if args.p is not None:
        if "p" in opts:
            raise CLIError("p is given twice (--p and --option p=...); give it once")
        opts["p"] = parse_p(args.p, len(names) - 1)
    return names


def load_levels(names: list[str], device: Any):
    """The Levels of the named models (costs: measured FLOP ratio), networks on ``device``."""
    import fastsde

    levels = fastsde.Levels.from_models(names)
    for m in levels.models:
        m.network.to(device)
    return levels


def _si(flops: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} "


def report(
    levels: Any, per_level: list[float], compute: float, denoised: bool, multilevel: dict[str, Any]
) -> list[str]:
    """The printed lines: p, cost per level, total compute against EM with the largest network at
    the same steps (level 1 runs every move, so the moves are its evaluations)."""
    unit = levels.flops[0]
    lines = []
    sched = multilevel.get("schedule", {})
    if multilevel.get("rule") == "constant":
        lines.append(f"p {', '.join(f'{v:g}' for v in sched.get('p', []))} (constant)")
    elif "p_mean" not in sched:
        lines.append(f"p {multilevel.get('rule', '?')}")
    else:
        means = ", ".join(f"{v:.3g}" for v in sched.get("p_mean", []))
        calib = multilevel.get("calibration", {})
        extra = (
            f"; calibration pass ({calib.get('samples', '?')} pilot samples, once per batch) {calib['cost']:.1f} "
            "in all, not in the compute below"
            if "cost" in calib
            else ""
        )
        lines.append(f"p {multilevel.get('rule', '?')} (mean over moves per correction: {means}){extra}")
    for k, (name, nfe, c) in enumerate(zip(levels.names, per_level, levels.costs)):
        lines.append(
            f"level {k + 1} {name}: {nfe:.2f} evaluations per sample x cost {c:.3f} = {nfe * c:.2f}"
            f"  ({_si(levels.flops[k])}FLOPs per evaluation)"
        )
    moves = per_level[0]
    em = (moves + (1 if denoised else 0)) * levels.costs[-1]
    ratio = em / compute if compute > 0 else math.inf
    lines.append(
        f"compute {compute:.2f} per sample (cost unit: one {levels.names[0]} evaluation; {_si(compute * unit)}FLOPs)"
    )
    lines.append(
        f"EM with {levels.names[-1]} at the same steps: ({moves:.0f} moves{' + 1 denoise' if denoised else ''}) x "
        f"{levels.costs[-1]:.3f} = {em:.2f} ({_si(em * unit)}FLOPs); ratio EM / ML-EM {ratio:.2f}x"
    )
    return lines

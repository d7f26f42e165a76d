"""`fastsde sample --out DIR/`: a run folder of resumable shards (fastsde.sample_to_dir), also
under ``torchrun --nproc-per-node K``. Every rank prints its shards as they are written; rank 0
prints the summary and the quality metric over all samples."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from . import CLIError
from .common import DEFAULT_SHARD_SIZE, cli_hint, command_line, compute_quality, quality_line, report_shard


def run_sharded(
    args: argparse.Namespace,
    score: Any,
    sde: Any,
    shape: tuple[int, ...],
    dtype: Any,
    device: Any,
    solver: str,
    opts: dict[str, Any],
    keywords: dict[str, Any],
    progress: bool,
    gm: Any = None,
) -> int:
    """Sample into the folder --out, resuming what is done there, and report as `fastsde sample` does."""
    import fastsde

    from ..score import NonFiniteScoreError
    from ..shards import MANIFEST
    from ..solvers.core.driver import IntegrationError

    out = Path(args.out)
    shard_size = args.shard_size or DEFAULT_SHARD_SIZE
    command = command_line(args)

    try:
        run = fastsde.sample_to_dir(
            score,
            sde,
            (args.n, *shape),
            out,
            solver=solver,
            seed=args.seed,
            shard_size=shard_size,
            model=args.model,
            dtype=dtype,
            device=device,
            batch_size=args.batch_size,
            progress=progress,
            on_shard=report_shard,
            **keywords,
            **opts,
        )
    except (IntegrationError, NonFiniteScoreError) as exc:
        raise CLIError(cli_hint(str(exc))) from None
    if run.rank != 0:
        return 0
    summary = run.manifest.get("summary", {})
    print(
        f"model {args.model}  solver {solver}  options {opts or '{}'}  n {args.n}  "
        f"{run.num_shards} shards of {shard_size}  world size {run.world_size}"
    )
    print(
        f"computed {len(run.computed)} shard(s) on rank 0, {len(run.skipped)} already done; "
        f"NFE {summary.get('nfe') or float('nan'):.1f} per sample  wall {run.wall_time:.2f} s"
    )
    levels = getattr(score, "names", None) and getattr(score, "flops", None) and score
    if levels and "cost" in summary:
        from .sample_levels import report as level_report

        p = opts.get("p", "auto")
        if isinstance(p, (int, float, list)):
            ps = [float(p)] * (len(levels.names) - 1) if isinstance(p, (int, float)) else p
            multilevel = {"rule": "constant", "schedule": {"p": ps}}
        else:  # set per batch ("auto") or by a learned schedule: the shards' own records hold them
            multilevel = {"rule": "auto" if p == "auto" else "learned"}
        for line in level_report(
            levels, summary["nfe_per_level"], summary["cost"], keywords.get("denoise", True), multilevel
        ):
            print(line)
    if summary.get("unfinished"):
        print(
            f"fastsde sample: warning: {summary['unfinished']} of {args.n} samples did not reach t_end "
            "(on_budget=partial); they are written as they stopped and counted in the manifest",
            file=sys.stderr,
        )
    if not run.complete:
        raise CLIError(f"the run in {str(out)!r} is incomplete; rerun `{command}` to finish it")
    if not args.no_metric:
        from .checks import MAX_BYTES

        labels = keywords.get("cond", {}).get("class_labels")
        if args.n * math.prod(shape) * 8 > MAX_BYTES:  # the metric reads every sample back into memory
            print(f"quality: not measured (the {args.n} samples exceed {MAX_BYTES / 2**30:g} GiB in memory)")
        else:
            quality = compute_quality(fastsde.load_samples(out), gm, labels)
            if quality:
                print(quality_line(quality, args.n))
    print(f"wrote {out / MANIFEST} and {run.num_shards} shard file(s)")
    return 0

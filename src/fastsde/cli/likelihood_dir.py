"""`fastsde likelihood --out DIR`: bits/dim over a data set as resumable shards
(fastsde.likelihood.sharded), also under ``torchrun``; every rank prints its shards, rank 0 the
result over all rows."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import CLIError
from .common import DEFAULT_SHARD_SIZE, likelihood_options, report_shard


def run_sharded(args: argparse.Namespace, score: Any, sde: Any, arr: Any, shape: tuple[int, ...], dtype: Any):
    """Evaluate into the folder --out, resuming what is done there; the DatasetLikelihood over all
    rows on rank 0, None on the other ranks."""
    from ..likelihood.sharded import likelihood_to_dir, load_likelihood
    from ..shards import MANIFEST

    out = Path(args.out)
    run = likelihood_to_dir(
        score,
        sde,
        arr,
        shape,
        out,
        shard_size=args.shard_size or DEFAULT_SHARD_SIZE,
        model=args.model,
        on_shard=report_shard,
        **likelihood_options(args, dtype),
    )
    if run.rank != 0:
        return None
    print(
        f"{run.num_shards} shards, computed {len(run.computed)} on rank 0, {len(run.skipped)} already done, "
        f"world size {run.world_size}; wrote {out / MANIFEST}"
    )
    if not run.complete:
        raise CLIError(f"the likelihood run in {str(out)!r} is incomplete; rerun the same command to finish it")
    return load_likelihood(out)

"""A sharded run in its own process, for tests/test_sharding.py (run directly or under torchrun).

usage: sharding_worker.py OUT N SHARD_SIZE [KILL_AT_CALL [KILL_RANK]]

Samples the exact 2-D mixture under VP with dpmpp_2m (10 steps, seed 11, float64). With
KILL_AT_CALL, the process of rank KILL_RANK (default 0) sends itself SIGKILL at that score call,
i.e. in the middle of a shard. Prints one line per rank: ``rank R computed [..] skipped [..]``.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

import fastsde

torch.set_num_threads(1)

SDE = fastsde.VPSDE()
MIXTURE = fastsde.problems.mixture_2d(SDE)
SETTINGS = dict(solver="dpmpp_2m", steps=10, seed=11, dtype=torch.float64)


#: the kill instrumentation, kept out of the score's reach: a run's identity includes every plain
#: parameter reachable from the score (closures included), and a killed run and its resumption must
#: use the same score
KILL: dict[str, int | None] = {"at": None, "rank": 0, "calls": 0}


def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    KILL["calls"] += 1
    if KILL["at"] is not None and int(os.environ.get("RANK", "0")) == KILL["rank"] and KILL["calls"] == KILL["at"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return MIXTURE.score(x, t)


def main() -> None:
    out, n, shard_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    KILL["at"] = int(sys.argv[4]) if len(sys.argv) > 4 else None
    KILL["rank"] = int(sys.argv[5]) if len(sys.argv) > 5 else 0

    run = fastsde.sample_to_dir(score, SDE, (n, 2), out, shard_size=shard_size, model="mixture_2d", **SETTINGS)
    print(f"rank {run.rank} computed {run.computed} skipped {run.skipped} complete {run.complete}", flush=True)


if __name__ == "__main__":
    main()

"""Wall time of a run folder of many tiny shards (docs/guides/large-runs.md, "The run folder"): the cost of the
folder's bookkeeping (shard files, progress lines, manifest) when the solve itself is nearly free.

    .venv/bin/python benchmarks/manifest_overhead.py [N]        # N one-sample shards (default 1500)

To compare with another version, put its src/ first: PYTHONPATH=/path/to/other/src python ...
"""

from __future__ import annotations

import sys
import tempfile
import time

import torch

import fastsde


def main() -> None:
    torch.set_num_threads(1)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1500
    sde = fastsde.VPSDE()
    gm = fastsde.problems.mixture_2d(sde)
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        fastsde.sample_to_dir(gm.score, sde, (n, 2), folder, solver="ddim", steps=2, shard_size=1, dtype=torch.float64)
        wall = time.perf_counter() - t0
    print(
        f"fastsde from {fastsde.__file__}: {n} one-sample shards in {wall:.1f} s ({1000 * wall / n:.1f} ms per shard)"
    )


if __name__ == "__main__":
    main()

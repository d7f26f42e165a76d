"""Sharded sampling at scale: throughput (samples/s) of fastsde.sample_to_dir with 1 and 2 workers
(torchrun, gloo, one thread per worker) and the overhead of sharding against one plain
fastsde.sample call, on the shipped digits model with dpmpp_2m at 10 steps. Writes
docs/bench/scale.md and docs/bench/scale.json (the table of docs/benchmarks/model-kinds.md,
"Sharding overhead", is copied from docs/bench/scale.md).

    .venv/bin/python benchmarks/scale.py            # n = 2000, shards of 500, 3 repeats (~4 min)

Repeats are interleaved (plain, sharded, 2 workers, ...) so that load from other jobs on the
machine falls on every configuration alike; the table reports medians and the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import fastsde
from fastsde.files import write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
JSON = ROOT / "docs" / "bench" / "scale.json"
SETTINGS = dict(solver="dpmpp_2m", steps=10, seed=0)


def plain(model: fastsde.models.LoadedModel, n: int) -> tuple[float, torch.Tensor]:
    """One fastsde.sample call with all n samples: (wall seconds, samples)."""
    t0 = time.perf_counter()
    res = fastsde.sample(model.score, model.sde, (n, *model.shape), **SETTINGS)
    return time.perf_counter() - t0, res.samples


def plain_batched(model: fastsde.models.LoadedModel, n: int, size: int) -> tuple[float, torch.Tensor]:
    """fastsde.sample in batches of ``size`` with the noise of each batch's global indices (what
    sample_to_dir does, without files): the baseline at the shards' batch size."""
    opts = {k: v for k, v in SETTINGS.items() if k != "seed"}
    t0 = time.perf_counter()
    parts = []
    for a in range(0, n, size):
        m = min(n, a + size) - a
        seed = fastsde.NoiseSource.from_seed(SETTINGS["seed"], m, start=a)
        parts.append(fastsde.sample(model.score, model.sde, (m, *model.shape), seed=seed, **opts).samples)
    return time.perf_counter() - t0, torch.cat(parts)


def sharded(model: fastsde.models.LoadedModel, n: int, shard_size: int) -> tuple[float, float, torch.Tensor]:
    """sample_to_dir into a fresh folder, then load_samples: (wall seconds of the run, seconds of
    it spent outside the shards' fastsde.sample calls, samples)."""
    inside: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fastsde.sample_to_dir(
            model.score,
            model.sde,
            (n, *model.shape),
            tmp,
            shard_size=shard_size,
            on_shard=lambda info: inside.append(info.wall_time),
            **SETTINGS,
        )
        wall = time.perf_counter() - t0
        return wall, wall - sum(inside), fastsde.load_samples(tmp)


def workers(k: int, n: int, shard_size: int) -> tuple[float, float, torch.Tensor]:
    """torchrun with k ranks into a fresh folder: (rank 0's wall inside sample_to_dir, the whole
    command's wall including process start-up and imports, samples)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(torchrun), "--standalone", f"--nproc-per-node={k}", "--", __file__, "--worker", tmp]
        cmd += ["--n", str(n), "--shard-size", str(shard_size)]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        total = time.perf_counter() - t0
        if res.returncode != 0:
            raise RuntimeError(f"torchrun failed:\n{res.stdout}\n{res.stderr}")
        inner = json.loads(res.stdout.strip().splitlines()[-1])["wall_s"]
        return inner, total, fastsde.load_samples(tmp)


def worker_main(out: str, n: int, shard_size: int) -> None:
    """One rank under torchrun: sample into out; rank 0 prints its wall time as JSON."""
    torch.set_num_threads(1)
    model = fastsde.load_model("digits")
    run = fastsde.sample_to_dir(model.score, model.sde, (n, *model.shape), out, shard_size=shard_size, **SETTINGS)
    if run.rank == 0:
        print(json.dumps({"wall_s": run.wall_time, "world_size": run.world_size}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--render", action="store_true", help="rewrite the page from docs/bench/scale.json, no measuring")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench" / "scale.md"))
    args = p.parse_args()
    if args.worker is not None:
        worker_main(args.worker, args.n, args.shard_size)
        return
    if args.render:
        render(json.loads(JSON.read_text()), args.out)
        return
    torch.set_num_threads(1)
    n, size = args.n, args.shard_size
    load_before = list(os.getloadavg())
    model = fastsde.load_model("digits")
    plain(model, 64)  # warm-up (first convolution calls)
    keys = ("plain", "one_shard", "plain_batched", "sharded_1", "sharded_2", "sharded_2_cmd")
    times: dict[str, list[float]] = {k: [] for k in keys}
    books: dict[str, list[float]] = {"one_shard": [], "sharded_1": []}
    diffs: dict[str, float] = {}
    for r in range(args.repeats):
        wall, ref = plain(model, n)
        times["plain"].append(wall)
        wall, book, x = sharded(model, n, n)
        times["one_shard"].append(wall)
        books["one_shard"].append(book)
        diffs["one_shard"] = float((x - ref).abs().max())
        wall, x = plain_batched(model, n, size)
        times["plain_batched"].append(wall)
        diffs["plain_batched"] = float((x - ref).abs().max())
        wall, book, x = sharded(model, n, size)
        times["sharded_1"].append(wall)
        books["sharded_1"].append(book)
        diffs["sharded_1"] = float((x - ref).abs().max())
        inner, total, x = workers(2, n, size)
        times["sharded_2"].append(inner)
        times["sharded_2_cmd"].append(total)
        diffs["sharded_2"] = float((x - ref).abs().max())
        print(f"repeat {r + 1}: " + "  ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)

    record = {
        "n": n,
        "shard_size": size,
        "repeats": args.repeats,
        "settings": SETTINGS,
        "model": "digits",
        "times_s": times,
        "bookkeeping_s": books,
        "max_abs_diff_vs_plain": diffs,
        "load_average": {"before": load_before, "after": list(os.getloadavg())},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
    }
    write_json_atomic(JSON, record)
    render(record, args.out)


def render(record: dict, out: str) -> None:
    """docs/bench/scale.md from a measurement record (docs/bench/scale.json)."""
    n, size, times, books, diffs = (
        record[k] for k in ("n", "shard_size", "times_s", "bookkeeping_s", "max_abs_diff_vs_plain")
    )
    repeats = record["repeats"]
    load = record.get("load_average")
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: (min(v), max(v)) for k, v in times.items()}
    rate = {k: n / v for k, v in med.items()}
    overhead = {
        "one_shard": 100.0 * (med["one_shard"] / med["plain"] - 1.0),
        "sharded_1": 100.0 * (med["sharded_1"] / med["plain_batched"] - 1.0),
    }
    book = {k: statistics.median(v) for k, v in books.items()}
    book_pct = {k: 100.0 * book[k] / med[k] for k in book}

    def row(label: str, key: str, note: str) -> str:
        lo, hi = spread[key]
        return f"| {label} | {med[key]:.2f} ({lo:.2f}–{hi:.2f}) | {rate[key]:.0f} | {note} |"

    lines = [
        "# Sharded sampling at scale",
        "",
        f"`fastsde.sample_to_dir` on the shipped `digits` model, dpmpp_2m at 10 steps (10 NFE), seed 0, "
        f"n = {n}, float32, CPU, one thread per worker. Medians of {repeats} interleaved repeats "
        "(min–max in brackets). Command:",
        "",
        "    .venv/bin/python benchmarks/scale.py",
        "",
        f"**The machine**: {record['machine']['cpus']} CPU cores, shared with other jobs running at the same "
        "time (other engineers' tests and benchmarks"
        + (f"; load average {load['before'][0]:.1f} before and {load['after'][0]:.1f} after the run" if load else "")
        + "), so absolute times are noisy and the 2 workers compete with that load for the 2 cores; read "
        "the figures as orders of magnitude, not as a scaling law.",
        "",
        f"**In short**: sharding costs {book['one_shard']:.3f} s ({book_pct['one_shard']:.2f} %) in one shard "
        f"and {book['sharded_1']:.3f} s ({book_pct['sharded_1']:.2f} %) in {-(-n // size)} shards of {size} "
        "(target ≤ 5 %); the wall-time differences between the one-worker rows are the machine's load "
        "(their min–max ranges overlap). Two torchrun workers reach "
        f"{rate['sharded_2']:.0f} samples/s inside `sample_to_dir` against {rate['plain']:.0f} for one "
        f"plain call ({med['plain'] / med['sharded_2']:.2f}x"
        + ("; below 2x when the two cores are not free)." if med["plain"] / med["sharded_2"] < 1.9 else ")."),
        "",
        "| configuration | wall s | samples/s | note |",
        "|---|---|---|---|",
        row("one `fastsde.sample` call", "plain", "the baseline"),
        row(
            f"`sample_to_dir`, 1 worker, one shard of {n}",
            "one_shard",
            f"{overhead['one_shard']:+.1f} % against the plain call; bookkeeping {book['one_shard']:.3f} s "
            f"= {book_pct['one_shard']:.2f} %",
        ),
        row(
            f"`fastsde.sample` in {-(-n // size)} calls of {size}",
            "plain_batched",
            "the baseline at the shards' batch size (same noise, no files)",
        ),
        row(
            f"`sample_to_dir`, 1 worker, shards of {size}",
            "sharded_1",
            f"{overhead['sharded_1']:+.1f} % against {size}-sample calls; bookkeeping {book['sharded_1']:.3f} s "
            f"= {book_pct['sharded_1']:.2f} %",
        ),
        row(
            f"`torchrun --nproc-per-node 2`, shards of {size}",
            "sharded_2",
            f"rank 0's time inside sample_to_dir (init, shards, barrier); "
            f"speed-up {med['plain'] / med['sharded_2']:.2f}x over the plain call",
        ),
        row(
            "the same, whole command",
            "sharded_2_cmd",
            "with torchrun's start-up, two processes importing torch, diffusers and fastsde and loading the "
            "model on the busy cores, and the rendezvous: a fixed cost per launch, not per sample",
        ),
        "",
        "Largest |difference| from the plain call's samples: "
        + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
        + (
            ": in this run (dpmpp_2m, batches of 2000 and 500) the sharded samples equal the plain call's "
            "exactly. That is not a guarantee: at other batch sizes the digits network's float32 outputs round "
            "differently (dpmpp_2m's samples differ by up to 2.9e-6 between batch sizes 64, 7 and 1, adaptive "
            "solvers' by up to 7.1e-3; docs/guides/large-runs.md, `benchmarks/batch_invariance.py`). The exact "
            "mixture's fixed-grid samples are tested equal (tests/test_sharding.py)."
            if not any(diffs.values())
            else ": the digits network's float32 convolutions round differently at another batch size (the "
            "exact mixture's samples are tested equal with torch.equal, tests/test_sharding.py)."
        ),
        "",
        "*Bookkeeping* is the part of `sample_to_dir`'s wall time spent outside the shards' "
        "`fastsde.sample` calls, measured inside the same run: validation, the folder scan, one `np.savez` "
        "per shard (written to a temporary name, fsynced, renamed) and a manifest rewrite after each shard. "
        "It is the sharding overhead free of the machine's load; the wall-time differences between rows "
        "are mostly that load (compare each row's min–max). Target: ≤ 5 %. Smaller batches are faster per "
        f"sample on this CPU (cache), which is why shards of {size} can beat one call of {n}.",
        "",
    ]
    write_text_atomic(out, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

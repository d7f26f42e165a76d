"""What the `fastsde sample` and `fastsde likelihood` commands share, in memory and as run folders:
the run folder's defaults, the command line as records write it, one line per shard written, the
library's advice in the command line's terms, the quality metric of samples, and the keywords both
likelihood entry points take from the flags."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path
from typing import Any

#: samples (rows) per shard file when --shard-size is not given
DEFAULT_SHARD_SIZE = 1000


def is_run_dir(path: str) -> bool:
    """--out names a run folder: it ends in a path separator or is an existing folder."""
    return path.endswith(("/", "\\")) or Path(path).is_dir()


def command_line(args: argparse.Namespace) -> str:
    """The command as typed (for records and for the advice to rerun it)."""
    return "fastsde " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:]))


def report_shard(info: Any) -> None:
    """One line per shard a rank has written (a ``fastsde.shards.ShardInfo``)."""
    late = f"  ({info.unfinished} did not reach t_end)" if info.unfinished else ""
    print(
        f"rank {info.rank}: shard {info.shard + 1}/{info.num_shards} [{info.start}, {info.stop}) "
        f"NFE {info.nfe:.1f}  {info.wall_time:.2f} s{late}",
        flush=True,
    )


def cli_hint(message: str) -> str:
    """A library error's advice in the command line's terms."""
    return (
        message.replace("on_budget='partial'", "--option on_budget=partial")
        .replace("raise max_nfe", "raise --option max_nfe=N")
        .replace("loosen eps_rel / eps_abs", "loosen --eps-rel / --eps-abs")
        .replace("loosen rtol/atol", "loosen --rtol / --atol")
    )


def compute_quality(samples, gm=None, labels=None) -> dict[str, float]:
    """The quality metric of the samples: FD to the exact mixture ``gm``, or for 1x8x8 samples the
    digits FD with its real-data floor and the classifier's confidence (with ``labels``, also the
    accuracy of the requested labels and the per-class FD, the FD measured against the held-out
    digits of the requested labels only), for 1x28x28 samples the Fashion-MNIST FD likewise (with
    ``labels``, the accuracy of the requested labels); {} otherwise."""
    if gm is not None:
        from ..metrics.mixture import mixture_frechet

        return {"fd": float(mixture_frechet(samples, gm).value)}
    if labels is not None and tuple(samples.shape[1:]) == (1, 8, 8) and samples.shape[0] >= 2:
        from ..metrics.digits import class_conditional_quality

        return class_conditional_quality(samples, labels, against_labels=True)
    if tuple(samples.shape[1:]) == (1, 8, 8) and samples.shape[0] >= 2:
        from ..metrics.digits import digits_quality

        return digits_quality(samples)
    if tuple(samples.shape[1:]) == (1, 28, 28) and samples.shape[0] >= 2:
        from ..metrics.fashion import fashion_class_quality, fashion_quality

        return fashion_quality(samples) if labels is None else fashion_class_quality(samples, labels)
    return {}


def quality_line(quality: dict[str, float], n: int) -> str:
    """The printed quality line (see the QUALITY_HELP of `fastsde sample`)."""
    if "floor" in quality:
        fd, floor = quality["fd"], quality["floor"]
        ratio = fd / floor if math.isfinite(fd) and floor > 0 else math.inf
        if "classes" in quality:
            labels = ",".join(str(c) for c in quality["classes"])
            plural = "s" if len(quality["classes"]) > 1 else ""
            against = f"against the {quality['reference']} held-out digits of label{plural} {labels}"
        else:
            against = quality.get("against", "against the 300 held-out digits")
        return (
            f"quality: FD {fd:.3f} {against} (real-data floor at n={n}: {floor:.3f} ± {quality['floor_sd']:.3f}, "
            f"ratio {ratio:.2f})  confidence {quality['confidence']:.3f}  (lower FD is better; "
            "see fastsde sample --help)"
        ) + (
            f"\nclass-conditional: accuracy {quality['accuracy']:.3f} of the requested labels"
            + (
                f"  per-class FD {quality['class_fd']:.2f} (against the held-out images of each class)"
                if "class_fd" in quality
                else ""
            )
            if "accuracy" in quality
            else ""
        )
    return f"quality: mixture FD {quality['fd']:.4f} (Fréchet distance to the exact mixture, lower is better)"


#: Flags passed on as they are to ``dataset_likelihood`` and ``likelihood_to_dir``.
LIKELIHOOD_FLAGS = (
    "levels", "offset", "seed", "passes", "batch_size", "trace", "probes", "probe", "rtol", "atol", "method", "max_steps"
)  # fmt: skip


def likelihood_options(args: argparse.Namespace, dtype: Any) -> dict[str, Any]:
    """The keywords that ``dataset_likelihood`` and ``likelihood_to_dir`` both take, from the flags."""
    return {**{name: getattr(args, name) for name in LIKELIHOOD_FLAGS}, "dtype": dtype, "levels_option": "--levels"}

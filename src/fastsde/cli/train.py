"""`fastsde train`: continuous-time denoising score matching of a small diffusers UNet.

Writes a checkpoint folder (model.safetensors + config.json, and train_state.* for --resume).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from . import CLIError

PRESETS = {
    # name: (channels, sde)
    "small": ((16, 32), "vp"),
    "medium": ((32, 64), "vp"),
    "large": ((64, 128), "vp"),
    "ve": ((32, 64), "ve"),
}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a score model (denoising score matching)")
    p.add_argument(
        "--data",
        default="digits",
        help="'digits', 'fashion' (Fashion-MNIST, Debian package dataset-fashion-mnist), an .npy/.npz array or a folder of images",
    )
    p.add_argument("--out", default="runs/model", help="checkpoint folder (default runs/model)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="channels and process of a shipped model")
    p.add_argument("--channels", default=None, help="UNet channels per level, e.g. 32,64")
    p.add_argument("--attention", action="store_true", help="self-attention at the lowest resolution")
    p.add_argument("--sde", choices=("vp", "ve"), default=None)
    p.add_argument(
        "--objective",
        choices=("eps", "flow"),
        default="eps",
        help="eps: denoising score matching (noise prediction) on --sde; flow: conditional flow matching "
        "(velocity prediction) on the rectified-flow path x = (1 - t) x0 + t z, as SD3 / FLUX",
    )
    p.add_argument("--sigma-max", type=float, default=20.0, help="VE σ_max (default 20: covers data in [−1, 1])")
    p.add_argument("--sigma-min", type=float, default=0.01)
    p.add_argument("--steps", type=int, default=2000, help="total optimiser steps")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this much wall time")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument(
        "--device",
        default="cpu",
        help="where to train: cpu (default), cuda, cuda:N or mps; the batches are drawn on the CPU, so they are "
        "the same on any device",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--conditional",
        action="store_true",
        help="class-conditional (labels of 'digits' / 'fashion', or the 'labels' array of an .npz), plus a null label for CFG",
    )
    p.add_argument(
        "--label-dropout", type=float, default=0.15, help="share of labels replaced by the null label (default 0.15)"
    )
    p.set_defaults(func=run)


#: limits of the numeric options (each error message states its limit)
MAX_TRAIN_STEPS = 10**7
MAX_BATCH = 65_536
MAX_THREADS = 1024
MAX_LEVELS = 6
MAX_CHANNELS = 4096
MAX_CLASSES = 100_000


def parse_channels(text: str) -> tuple[int, ...]:
    """--channels: 1..MAX_LEVELS positive integers (at most MAX_CHANNELS), each a multiple of the
    GroupNorm group count min(8, smallest) that the network uses."""
    try:
        channels = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise CLIError(f"--channels must be comma-separated integers, got {text!r}") from None
    if not 1 <= len(channels) <= MAX_LEVELS or any(not 1 <= c <= MAX_CHANNELS for c in channels):
        raise CLIError(
            f"--channels must be 1 to {MAX_LEVELS} integers in [1, {MAX_CHANNELS}] (one per UNet level), got {text!r}"
        )
    groups = min(8, min(channels))
    if any(c % groups for c in channels):
        raise CLIError(
            f"--channels must all be multiples of min(8, smallest) = {groups} (GroupNorm groups), got {text!r}"
        )
    return channels


def check_options(args: argparse.Namespace) -> None:
    """Every numeric option within its range, before any data is read."""
    from ..noise import check_seed
    from .checks import check_int, check_number

    check_int("--steps", args.steps, 1, MAX_TRAIN_STEPS)
    check_int("--batch-size", args.batch_size, 1, MAX_BATCH)
    check_number("--lr", args.lr, 0.0, None, open_low=True)
    if not 0.0 <= args.ema < 1.0:
        raise CLIError(f"--ema must lie in [0, 1) (the EMA decay per step, e.g. 0.999), got {args.ema}")
    check_int("--save-every", args.save_every, 1)
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise CLIError(f"--max-minutes must be positive, got {args.max_minutes}")
    if not (args.sigma_min > 0 and args.sigma_max > args.sigma_min) or args.sigma_max == float("inf"):
        raise CLIError(f"--sigma-min and --sigma-max need 0 < min < max < inf, got {args.sigma_min}, {args.sigma_max}")
    check_seed(args.seed, "--seed")
    if not 0.0 <= args.label_dropout < 1.0:
        raise CLIError(f"--label-dropout must lie in [0, 1), got {args.label_dropout}")
    check_int("--threads", args.threads, 1, MAX_THREADS)
    check_device(args.device)
    if args.channels is not None and not args.resume:
        parse_channels(args.channels)


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from ..data import load_dataset
    from ..training import TrainConfig, Trainer
    from .checks import check_out_dir, reading

    check_options(args)
    out = Path(args.out)
    if args.resume:  # the checkpoint must be there, and writable (it is saved over)
        if not (out / "train_state.safetensors").is_file():
            raise CLIError(f"--resume: no checkpoint to resume in {str(out)!r} (train_state.safetensors missing)")
    check_out_dir(out)  # before any training; the folder itself is made only once the run is set up
    torch.set_num_threads(args.threads)
    with reading("--data", args.data, "training images ('digits', an .npy/.npz array or an image folder)"):
        data = load_dataset(args.data)
        if data.dim() != 4 or data.shape[0] < 2 or min(data.shape[1:]) < 1:
            raise CLIError(f"--data {args.data!r}: need at least 2 images (n, C, H, W), got shape {tuple(data.shape)}")
    from .checks import check_memory

    check_memory("--batch-size", args.batch_size, tuple(data.shape[1:]), 4, " (one training batch)")
    with reading("--data", args.data, "an .npz whose 'labels' array holds one class per image"):
        labels = training_labels(args.data, data.shape[0]) if args.conditional or args.resume else None
    if labels is not None and int(labels.max()) >= MAX_CLASSES:
        raise CLIError(f"--data {args.data!r}: class labels must be below {MAX_CLASSES}, got {int(labels.max())}")
    command = "fastsde " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:]))

    if args.conditional and labels is None:
        raise CLIError(
            f"--conditional needs class labels: --data digits or fashion, or an .npz with a 'labels' array (got {args.data!r})"
        )
    if args.resume:
        with reading("--resume", out / "train_state.safetensors", "a checkpoint written by fastsde train"):
            trainer = Trainer.load(out, data, labels, device=args.device)
        print(f"resuming {out} at step {trainer.step}")
    else:
        channels, sde_kind = PRESETS[args.preset] if args.preset else ((32, 64), "vp")
        if args.channels is not None:
            channels = parse_channels(args.channels)
        side = data.shape[-1]
        if data.shape[-2] != side or side % 2 ** (len(channels) - 1):
            raise CLIError(
                f"--channels {','.join(map(str, channels))}: {len(channels)} UNet levels halve the image "
                f"{len(channels) - 1} times, so its sides must be equal and divisible by {2 ** (len(channels) - 1)}; "
                f"the images are {tuple(data.shape[-2:])}"
            )
        sde_kind = args.sde or sde_kind
        if args.objective == "flow" and args.sde is not None:
            raise CLIError(f"--objective flow trains on the rectified-flow path; --sde {args.sde} does not apply")
        if args.objective == "flow":
            from ..sde import RectifiedFlow

            sde = RectifiedFlow().config()
        elif sde_kind == "vp":
            sde = {"type": "VPSDE", "beta_min": 0.1, "beta_max": 20.0}
        else:
            sde = {"type": "VESDE", "sigma_min": args.sigma_min, "sigma_max": args.sigma_max}
        cfg = TrainConfig(
            sde=sde,
            channels=channels,
            attention=args.attention,
            shape=tuple(data.shape[1:]),
            batch_size=args.batch_size,
            lr=args.lr,
            ema=args.ema,
            seed=args.seed,
            data=args.data,
            norm_groups=min(8, min(channels)),
            num_classes=int(labels.max()) + 1 if labels is not None else 0,
            label_dropout=args.label_dropout,
        )
        trainer = Trainer(cfg, data, labels, device=args.device)
        try:  # only now, with the run set up: a refused run leaves no folder behind
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CLIError(f"cannot write the checkpoint folder {str(out)!r}: {exc}") from None
    n_params = sum(p.numel() for p in trainer.net.parameters())
    print(f"data {tuple(data.shape)}  params {n_params}  sde {trainer.sde!r}", flush=True)

    heldout = heldout_set(args.data, trainer.config.num_classes > 0)
    deadline = None if args.max_minutes is None else time.time() + 60.0 * args.max_minutes
    while trainer.step < args.steps:
        target = min(args.steps, (trainer.step // args.save_every + 1) * args.save_every)
        left = None if deadline is None else deadline - time.time()
        trainer.train(target, max_seconds=left, progress=not args.quiet)
        held = "" if heldout is None else f"  held-out {trainer.heldout_loss(*heldout):.4f}"
        trainer.save(out, command)
        print(
            f"step {trainer.step}  loss {trainer.recent_loss():.4f}{held}  wall {trainer.wall_time:.0f}s  saved {out}",
            flush=True,
        )
        if deadline is not None and time.time() >= deadline:
            break
    trainer.save(out, command)
    print(f"done: {trainer.step} steps, final loss {trainer.recent_loss():.4f}, wall {trainer.wall_time:.0f}s")
    return 0


def check_device(text: str) -> None:
    """--device: a torch device this machine has (before any data is read)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device must be a torch device such as cpu, cuda or cuda:0, got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {text}: this machine has no CUDA device (torch.cuda.is_available() is False)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CLIError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {text}: this machine has no MPS device")
    if device.type not in ("cpu", "cuda", "mps"):
        raise CLIError(f"--device must be cpu, cuda, cuda:N or mps, got {text!r}")


#: held-out images scored at each save (the first ones of the held-out split)
HELDOUT_IMAGES = 2000


def heldout_set(spec: str, conditional: bool):
    """(images, labels or None) of the held-out split of a named dataset, whose loss is printed and
    recorded at each save; None for user data (which has no held-out split)."""
    from ..data import digits_labels, fashion_labels, load_digits, load_fashion_mnist

    if spec == "digits":
        x, y = load_digits("heldout"), digits_labels("heldout")
    elif spec == "fashion":
        x, y = load_fashion_mnist("heldout")[:HELDOUT_IMAGES], fashion_labels("heldout")[:HELDOUT_IMAGES]
    else:
        return None
    return x, (y if conditional else None)


def training_labels(spec: str, n: int):
    """The class labels of a training set: the digits' own, or the ``labels`` array of an .npz (None when
    there are none; --conditional then fails with the reason)."""
    import numpy as np
    import torch

    from ..data import digits_labels, fashion_labels

    if spec == "digits":
        return digits_labels("train")
    if spec == "fashion":
        return fashion_labels("train")
    if Path(spec).suffix == ".npz" and Path(spec).is_file():
        with np.load(spec) as z:
            if "labels" in z.files:
                labels = torch.from_numpy(np.asarray(z["labels"]).astype(np.int64).reshape(-1))
                if labels.shape[0] != n or bool((labels < 0).any()):
                    raise CLIError(f"the 'labels' array of {spec} must hold {n} non-negative integers")
                return labels
    return None

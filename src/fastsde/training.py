"""Continuous-time denoising score matching (Song et al. 2021's loss) for diffusers UNets.

The network predicts the noise ε of x_t = m(t)·x0 + σ(t)·z from (x_t, label(t)); with the σ²-weighting
of the score-matching loss, σ²‖s_θ + z/σ‖² = ‖ε̂ − z‖², so the loss is a plain noise-prediction MSE and
the score is s = −ε̂/σ (fastsde's NoisePredictionScore convention). t ~ U[t_eps, 1].

Checkpoints are a folder: ``model.safetensors`` (EMA weights, what gets sampled), ``config.json``, and for
resuming ``train_state.safetensors`` (raw weights and the Adam state as tensors) plus
``train_state.json`` (step, loss history, optimizer hyper-parameters). No pickle anywhere.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .files import write_atomic, write_json_atomic
from .models import EpsNetwork, build_network, network_flops, sde_from_config
from .sde import SDE

__all__ = ["TrainConfig", "Trainer", "dsm_loss"]


@dataclass
class TrainConfig:
    """Every knob of a training run; stored in the checkpoint's config.json."""

    sde: dict[str, Any] = field(default_factory=lambda: {"type": "VPSDE", "beta_min": 0.1, "beta_max": 20.0})
    channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention: bool = False
    norm_groups: int = 8
    shape: tuple[int, ...] = (1, 8, 8)
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    grad_clip: float = 1.0
    ema: float = 0.999
    t_eps: float = 1e-5
    seed: int = 0
    data: str = "digits"
    #: class-conditional training: labels 0..num_classes-1 plus the null label num_classes (for
    #: classifier-free guidance); 0 trains an unconditional model
    num_classes: int = 0
    #: probability that a training label is replaced by the null label (conditional training only)
    label_dropout: float = 0.15

    def unet_config(self) -> dict[str, Any]:
        cfg = {
            "channels": list(self.channels),
            "layers_per_block": self.layers_per_block,
            "attention": self.attention,
            "norm_groups": self.norm_groups,
            "in_channels": self.shape[0],
            "sample_size": self.shape[1],
        }
        if self.num_classes:
            cfg["num_class_embeds"] = self.num_classes + 1  # the last embedding is the null label
        return cfg


def dsm_loss(net: EpsNetwork, sde: SDE, x0: Tensor, t: Tensor, z: Tensor, class_labels: Tensor | None = None) -> Tensor:
    """σ²-weighted denoising score matching, i.e. the noise-prediction MSE per pixel (with the class
    labels of x0 for a conditional network)."""
    m = sde.mean_coeff(t).reshape(-1, *([1] * (x0.dim() - 1)))
    s = sde.marginal_std(t).reshape(-1, *([1] * (x0.dim() - 1)))
    xt = m * x0 + s * z
    eps = net(xt, net.time_input(t), class_labels=class_labels)
    return (eps - z).pow(2).mean()


class Trainer:
    """Trains an EpsNetwork on ``data`` (n, C, H, W) in [−1, 1]; save/load make it resumable.

    With ``config.num_classes`` > 0 the network is class-conditional: ``labels`` (n,) holds the class
    of each image (0..num_classes-1), and each training label is replaced by the null label
    ``num_classes`` with probability ``config.label_dropout``, so that one network is both the
    conditional and the unconditional model (classifier-free guidance)."""

    def __init__(self, config: TrainConfig, data: Tensor, labels: Tensor | None = None) -> None:
        if tuple(data.shape[1:]) != tuple(config.shape):
            raise ValueError(f"data images have shape {tuple(data.shape[1:])}, config expects {tuple(config.shape)}")
        if data.shape[0] < 2:
            raise ValueError(f"need at least 2 training images, got {data.shape[0]}")
        if config.num_classes:
            if labels is None or labels.shape != (data.shape[0],):
                got = None if labels is None else tuple(labels.shape)
                raise ValueError(f"conditional training needs one label per image ({data.shape[0]},), got {got}")
            if bool((labels < 0).any()) or bool((labels >= config.num_classes).any()):
                raise ValueError(f"labels must lie in 0..{config.num_classes - 1}")
            if not 0.0 <= config.label_dropout < 1.0:
                raise ValueError(f"label_dropout must lie in [0, 1), got {config.label_dropout}")
        self.config = config
        self.data = data.float()
        self.labels = None if not config.num_classes else labels.to(torch.long)
        self.sde = sde_from_config(config.sde)
        torch.manual_seed(config.seed)
        self.net = build_network(config.unet_config(), config.sde)
        self.ema = build_network(config.unet_config(), config.sde)
        self.ema.load_state_dict(self.net.state_dict())
        self.ema.requires_grad_(False)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=config.lr)
        self.step = 0
        self.losses: list[float] = []
        self.wall_time = 0.0

    # -- one step ---------------------------------------------------------------------------
    def _batch(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.step)
        idx = torch.randint(0, self.data.shape[0], (self.config.batch_size,), generator=g)
        t = self.config.t_eps + (1.0 - self.config.t_eps) * torch.rand(self.config.batch_size, generator=g)
        z = torch.randn((self.config.batch_size, *self.config.shape), generator=g)
        labels = None
        if self.labels is not None:  # drawn after the rest: an unconditional run's batches are unchanged
            drop = torch.rand(self.config.batch_size, generator=g) < self.config.label_dropout
            labels = torch.where(drop, torch.full_like(idx, self.config.num_classes), self.labels[idx])
        return self.data[idx], t, z, labels

    def train_step(self) -> float:
        cfg = self.config
        self.net.train()
        x0, t, z, labels = self._batch()
        lr = cfg.lr * min(1.0, (self.step + 1) / max(cfg.warmup, 1))
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss = dsm_loss(self.net, self.sde, x0, t, z, labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
        self.opt.step()
        decay = min(cfg.ema, (1.0 + self.step) / (10.0 + self.step))
        with torch.no_grad():
            for pe, p in zip(self.ema.parameters(), self.net.parameters()):
                pe.lerp_(p, 1.0 - decay)
        self.step += 1
        value = float(loss.detach())
        self.losses.append(value)
        return value

    def train(self, steps: int, max_seconds: float | None = None, progress: bool = True, log=None) -> None:
        """Run until ``steps`` total steps (or ``max_seconds`` of wall time in this call)."""
        from tqdm import tqdm

        start = time.time()
        bar = tqdm(total=steps, initial=self.step, disable=not progress, desc="train", dynamic_ncols=True)
        while self.step < steps:
            t0 = time.time()
            loss = self.train_step()
            self.wall_time += time.time() - t0
            bar.update(1)
            if self.step % 10 == 0 or self.step == steps:
                bar.set_postfix(loss=f"{self.recent_loss():.4f}")
            if log is not None and self.step % 50 == 0:
                log(f"step {self.step} loss {loss:.4f} avg {self.recent_loss():.4f} wall {self.wall_time:.0f}s")
            if max_seconds is not None and time.time() - start > max_seconds:
                break
        bar.close()

    def recent_loss(self, n: int = 100) -> float:
        """Mean of the last n step losses (the 'final loss' reported for a model)."""
        tail = self.losses[-n:]
        return float(sum(tail) / len(tail)) if tail else math.nan

    # -- checkpoints ------------------------------------------------------------------------
    def model_config(self, command: str | None = None) -> dict[str, Any]:
        cfg = self.config
        cond = {}
        if cfg.num_classes:
            cond = {"conditioning": {"class_labels": {"num_classes": cfg.num_classes, "null_label": cfg.num_classes}}}
        return {
            "format": "fastsde-unet-eps/1",
            **cond,
            "sde": cfg.sde,
            "unet": cfg.unet_config(),
            "shape": list(cfg.shape),
            "prediction": "epsilon",
            "time_input": self.net.time_input_name,
            "input_scaling": self.net.input_scaling,
            "flops_per_sample": network_flops(self.ema, cfg.shape),
            "n_params": sum(p.numel() for p in self.ema.parameters()),
            "training": {
                **asdict(cfg),
                "steps": self.step,
                "wall_time_s": round(self.wall_time, 1),
                "final_loss": self.recent_loss(),
                "command": command,
            },
        }

    def save(self, folder: str | Path, command: str | None = None) -> None:
        """Write the checkpoint; every file goes to a temporary name and is renamed into place, so an
        interrupted save leaves the previous checkpoint whole."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        ema = {k: v.contiguous() for k, v in self.ema.state_dict().items()}
        write_atomic(folder / "model.safetensors", lambda p: save_file(ema, str(p)))
        write_json_atomic(folder / "config.json", self.model_config(command))
        state = {f"net.{k}": v.contiguous() for k, v in self.net.state_dict().items()}
        opt_state = self.opt.state_dict()
        for idx, st in opt_state["state"].items():
            for key, val in st.items():
                state[f"opt.{idx}.{key}"] = torch.as_tensor(val).contiguous()
        write_atomic(folder / "train_state.safetensors", lambda p: save_file(state, str(p)))
        meta = {
            "step": self.step,
            "wall_time_s": self.wall_time,
            "losses": self.losses,
            "param_groups": opt_state["param_groups"],
            "config": asdict(self.config),
        }
        write_json_atomic(folder / "train_state.json", meta, indent=None)

    @classmethod
    def load(cls, folder: str | Path, data: Tensor, labels: Tensor | None = None) -> Trainer:
        """Resume from a checkpoint folder written by save()."""
        folder = Path(folder)
        meta_path = folder / "train_state.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"no checkpoint to resume in {folder} (train_state.json missing)")
        meta = json.loads(meta_path.read_text())
        raw = meta["config"]
        raw["channels"] = tuple(raw["channels"])
        raw["shape"] = tuple(raw["shape"])
        trainer = cls(TrainConfig(**raw), data, labels)
        state = load_file(str(folder / "train_state.safetensors"))
        trainer.net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        trainer.ema.load_state_dict(load_file(str(folder / "model.safetensors")))
        opt_state: dict[str, Any] = {"state": {}, "param_groups": meta["param_groups"]}
        for k, v in state.items():
            if k.startswith("opt."):
                _, idx, key = k.split(".", 2)
                opt_state["state"].setdefault(int(idx), {})[key] = v
        trainer.opt.load_state_dict(opt_state)
        trainer.step = int(meta["step"])
        trainer.wall_time = float(meta["wall_time_s"])
        trainer.losses = list(meta["losses"])
        return trainer

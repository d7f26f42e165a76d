"""Continuous-time denoising score matching (Song et al. 2021's loss) for diffusers UNets.

The network predicts the noise ε of x_t = m(t)·x0 + σ(t)·z from (x_t, label(t)); with the σ²-weighting
of the score-matching loss, σ²‖s_θ + z/σ‖² = ‖ε̂ − z‖², so the loss is a plain noise-prediction MSE and
the score is s = −ε̂/σ (fastsde's NoisePredictionScore convention). t ~ U[t_eps, 1].

On a :class:`~fastsde.sde.RectifiedFlow` (``fastsde train --objective flow``) the same network is
trained by conditional flow matching instead (:func:`flow_loss`): it regresses the velocity z − x0 of
the linear path, and is sampled through :class:`~fastsde.score.VelocityScore`.

Checkpoints are a folder: ``model.safetensors`` (EMA weights, what gets sampled) and ``config.json``
(what ``fastsde.load_model(folder)`` reads), and for resuming ``train_state.safetensors``: ONE file holding
the whole training state (raw weights ``net.*``, EMA weights ``ema.*``, the Adam state ``opt.<i>.<name>``)
with step, loss history, optimizer hyper-parameters and the TrainConfig as its JSON record. It is written
first, to a temporary name renamed over the old one, so a resume always reads the previous checkpoint or
the new one, whole (a kill between the files of the older layout, whose record lived only in
``train_state.json``, could pair new weights with an old step). ``train_state.json`` is still written,
after the state, as a readable copy of the record; resuming ignores it unless the folder is of the older
layout, which still resumes. Every field is checked on load. No pickle anywhere.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from .files import (
    Fields,
    FileFormatError,
    read_json,
    read_tensors_with_meta,
    save_tensors_with_meta,
    write_atomic,
    write_json_atomic,
)
from .models import MAX_CHANNELS, MAX_LAYERS, MAX_SIZE, EpsNetwork, build_network, check_model_config, network_flops
from .sde import SDE, RectifiedFlow, sde_from_config

__all__ = ["TrainConfig", "Trainer", "dsm_loss", "STATE_FORMAT"]

#: The record format of train_state.safetensors (the whole resumable state in one file).
STATE_FORMAT = "fastsde-train-state/2"


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


def flow_loss(
    net: EpsNetwork, sde: SDE, x0: Tensor, t: Tensor, z: Tensor, class_labels: Tensor | None = None
) -> Tensor:
    """Conditional flow matching on a rectified flow: x_u = m(u)·x0 + σ(u)·z, the network regresses the
    velocity v = z − x0 (the derivative of the path in σ; its minimiser is E[z − x0 | x_u])."""
    m = sde.mean_coeff(t).reshape(-1, *([1] * (x0.dim() - 1)))
    s = sde.marginal_std(t).reshape(-1, *([1] * (x0.dim() - 1)))
    xt = m * x0 + s * z
    v = net(xt, net.time_input(t), class_labels=class_labels)
    return (v - (z - x0)).pow(2).mean()


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

    def __init__(
        self, config: TrainConfig, data: Tensor, labels: Tensor | None = None, device: str | torch.device = "cpu"
    ) -> None:
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
        #: where the networks and the data live; every random draw is made on the CPU and moved, so a
        #: run's batches (and its initial weights) are the same on any device
        self.device = torch.device(device)
        self.data = data.float().to(self.device)
        self.labels = None if not config.num_classes else labels.to(self.device, torch.long)
        self.sde = sde_from_config(config.sde)
        torch.manual_seed(config.seed)
        self.net = build_network(config.unet_config(), config.sde).to(self.device)
        self.ema = build_network(config.unet_config(), config.sde).to(self.device)
        self.ema.load_state_dict(self.net.state_dict())
        self.ema.requires_grad_(False)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=config.lr)
        self.step = 0
        self.losses: list[float] = []
        #: (step, held-out loss of the EMA network) at each evaluation; see heldout_loss
        self.heldout_losses: list[tuple[int, float]] = []
        self.wall_time = 0.0

    # -- one step ---------------------------------------------------------------------------
    def _batch(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.step)
        idx = torch.randint(0, self.data.shape[0], (self.config.batch_size,), generator=g)
        t = self.config.t_eps + (1.0 - self.config.t_eps) * torch.rand(self.config.batch_size, generator=g)
        z = torch.randn((self.config.batch_size, *self.config.shape), generator=g)
        labels = None
        if self.labels is not None:  # drawn after the rest: an unconditional run's batches are unchanged
            drop = (torch.rand(self.config.batch_size, generator=g) < self.config.label_dropout).to(self.device)
            picked = self.labels[idx.to(self.device)]
            labels = torch.where(drop, torch.full_like(picked, self.config.num_classes), picked)
        dev = self.device
        return self.data[idx.to(dev)], t.to(dev), z.to(dev), labels

    def train_step(self) -> float:
        cfg = self.config
        self.net.train()
        x0, t, z, labels = self._batch()
        lr = cfg.lr * min(1.0, (self.step + 1) / max(cfg.warmup, 1))
        for group in self.opt.param_groups:
            group["lr"] = lr
        objective = flow_loss if isinstance(self.sde, RectifiedFlow) else dsm_loss
        loss = objective(self.net, self.sde, x0, t, z, labels)
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

    @torch.no_grad()
    def heldout_loss(self, data: Tensor, labels: Tensor | None = None, batch_size: int = 256) -> float:
        """The training loss of the EMA network on held-out images, with the same t and noise at every
        call (t stratified over [t_eps, 1], noise from a fixed seed), so that successive values differ
        only by the weights: the curve that tells when training has flattened. Conditional networks
        see the true labels. The value is also appended to ``heldout_losses``."""
        cfg = self.config
        n = data.shape[0]
        if n < 1 or tuple(data.shape[1:]) != tuple(cfg.shape):
            raise ValueError(
                f"held-out images must be (n ≥ 1, {', '.join(map(str, cfg.shape))}), got {tuple(data.shape)}"
            )
        if cfg.num_classes and (labels is None or labels.shape != (n,)):
            raise ValueError(f"a conditional network's held-out loss needs one label per image ({n},)")
        g = torch.Generator().manual_seed(20_231_207)
        t = cfg.t_eps + (1.0 - cfg.t_eps) * (torch.randperm(n, generator=g).double() + 0.5) / n
        z = torch.randn((n, *cfg.shape), generator=g)
        objective = flow_loss if isinstance(self.sde, RectifiedFlow) else dsm_loss
        self.ema.eval()
        total = 0.0
        dev = self.device
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            lab = None if not cfg.num_classes else labels[lo:hi].to(dev, torch.long)
            x0, tt, zz = data[lo:hi].float().to(dev), t[lo:hi].float().to(dev), z[lo:hi].to(dev)
            part = objective(self.ema, self.sde, x0, tt, zz, lab)
            total += float(part) * (hi - lo)
        value = total / n
        self.heldout_losses.append((self.step, value))
        return value

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
            "prediction": "flow" if isinstance(self.sde, RectifiedFlow) else "epsilon",
            "time_input": self.net.time_input_name,
            "input_scaling": self.net.input_scaling,
            "flops_per_sample": network_flops(self.ema, cfg.shape),
            "n_params": sum(p.numel() for p in self.ema.parameters()),
            "training": {
                **asdict(cfg),
                "steps": self.step,
                "wall_time_s": round(self.wall_time, 1),
                "final_loss": self.recent_loss(),
                "heldout_losses": [[s, round(v, 6)] for s, v in self.heldout_losses],
                "command": command,
            },
        }

    def save(self, folder: str | Path, command: str | None = None) -> None:
        """Write the checkpoint. The resumable state is one file (train_state.safetensors: weights,
        EMA, optimizer state and record) renamed into place in one step, so an interrupted save leaves
        the previous checkpoint whole; model.safetensors and config.json (what load_model reads) follow,
        each whole."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        ema = {k: v.detach().cpu().contiguous() for k, v in self.ema.state_dict().items()}
        state = {f"net.{k}": v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        state.update({f"ema.{k}": v for k, v in ema.items()})
        opt_state = self.opt.state_dict()
        for idx, st in opt_state["state"].items():
            for key, val in st.items():
                state[f"opt.{idx}.{key}"] = torch.as_tensor(val).detach().cpu().contiguous()
        meta = {
            "format": STATE_FORMAT,
            "step": self.step,
            "wall_time_s": self.wall_time,
            "losses": self.losses,
            "heldout_losses": [[s, v] for s, v in self.heldout_losses],
            "param_groups": opt_state["param_groups"],
            "config": asdict(self.config),
        }
        save_tensors_with_meta(folder / "train_state.safetensors", state, meta)
        # a readable copy of the record, written after the state (the CLI looks for it before resuming);
        # load() reads the record inside train_state.safetensors, never this copy
        write_json_atomic(folder / "train_state.json", meta, indent=None)
        write_atomic(folder / "model.safetensors", lambda p: save_file(ema, str(p)))
        write_json_atomic(folder / "config.json", self.model_config(command))

    @classmethod
    def load(
        cls, folder: str | Path, data: Tensor, labels: Tensor | None = None, device: str | torch.device = "cpu"
    ) -> Trainer:
        """Resume from a checkpoint folder written by save() (or by the older four-file layout), every
        field checked before any training: a FileFormatError naming the file and the field."""
        folder = Path(folder)
        path = folder / "train_state.safetensors"
        old_meta = folder / "train_state.json"
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint to resume in {folder} (train_state.safetensors missing)")
        tensors, f = _read_state(path, old_meta)
        cfg = _read_train_config(f.obj("config"))
        trainer = cls(cfg, data, labels, device=device)
        step = f.integer("step", low=0)
        wall = f.number("wall_time_s", low=0.0)
        losses = f.numbers("losses", finite=False)  # a diverged run's NaN losses are its history
        groups = _read_param_groups(f, trainer.opt.state_dict()["param_groups"])
        if not any(k.startswith("ema.") for k in tensors):  # the older layout: EMA weights in model.safetensors
            tensors.update({f"ema.{k}": v for k, v in _read_weights(folder / "model.safetensors").items()})
        for prefix, net in (("net", trainer.net), ("ema", trainer.ema)):
            part = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            _load_weights(f.path, net, part, prefix)
        opt_state: dict[str, Any] = {"state": {}, "param_groups": groups}
        n_params = len(list(trainer.net.parameters()))
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, idx, key = (k.split(".", 2) + ["", ""])[:3]
                if not idx.isdigit() or int(idx) >= n_params or key not in ("step", "exp_avg", "exp_avg_sq"):
                    raise FileFormatError(
                        f.path, k, f"an Adam state tensor opt.<0..{n_params - 1}>.<step|exp_avg|exp_avg_sq>", v
                    )
                opt_state["state"].setdefault(int(idx), {})[key] = v
        params = list(trainer.net.parameters())
        for idx, st in opt_state["state"].items():
            for key, v in st.items():
                want = () if key == "step" else tuple(params[idx].shape)
                ok = tuple(v.shape) == want and v.dtype.is_floating_point and bool(torch.isfinite(v).all())
                if not ok or (key != "exp_avg" and bool((v < 0).any())):
                    sign = "" if key == "exp_avg" else "non-negative "
                    raise FileFormatError(
                        f.path, f"opt.{idx}.{key}", f"a {sign}finite floating tensor of shape {want}", v
                    )
            if set(st) != {"step", "exp_avg", "exp_avg_sq"}:
                raise FileFormatError(f.path, f"opt.{idx}", "step, exp_avg and exp_avg_sq", sorted(st))
        try:
            trainer.opt.load_state_dict(opt_state)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise FileFormatError(
                f.path, "param_groups", f"the optimizer state of this network ({exc})", groups
            ) from None
        trainer.step, trainer.wall_time, trainer.losses = step, wall, losses
        trainer.heldout_losses = _read_heldout_losses(f, step)
        return trainer


def _read_heldout_losses(f: Fields, step: int) -> list[tuple[int, float]]:
    """The [step, loss] pairs of the held-out curve (absent in older checkpoints: empty)."""
    raw = f.raw("heldout_losses", [])
    ok = isinstance(raw, list) and all(
        isinstance(p, list)
        and len(p) == 2
        and isinstance(p[0], int)
        and not isinstance(p[0], bool)
        and 0 <= p[0] <= step
        and isinstance(p[1], (int, float))
        and not isinstance(p[1], bool)
        for p in raw
    )
    if not ok:
        raise FileFormatError(f.path, "heldout_losses", f"a list of [step ≤ {step}, loss] pairs", raw)
    return [(int(s), float(v)) for s, v in raw]


def _read_param_groups(f: Fields, fresh: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The optimizer's param_groups of a record, checked against a fresh optimizer's: the same
    parameter indices, lr / eps / weight_decay / betas in range, flags of the same type. A key the
    record lacks (a checkpoint of another torch version) takes the fresh optimizer's value."""
    groups = f.items("param_groups", length=len(fresh))
    out = []
    for i, (g, new) in enumerate(zip(groups, fresh)):
        gf = Fields(f.path, g, f"param_groups[{i}]")
        group = {**new, **gf.data}
        group["params"] = gf.integers("params", length=len(new["params"]), low=0)
        if group["params"] != list(new["params"]):
            raise gf.error("params", f"the parameter indices {list(new['params'])}", group["params"])
        group["lr"] = gf.number("lr", new["lr"], low=0.0)
        group["eps"] = gf.number("eps", new["eps"], low=0.0, low_open=True)
        group["weight_decay"] = gf.number("weight_decay", new["weight_decay"], low=0.0)
        group["betas"] = gf.numbers("betas", list(new["betas"]), length=2, low=0.0, high=1.0, high_open=True)
        for key, default in new.items():
            if key in ("params", "lr", "eps", "weight_decay", "betas") or key not in gf.data:
                continue
            v = gf.data[key]
            if isinstance(default, bool) or default is None:
                if not (v is None or isinstance(v, bool)) or (default is not None and v is None):
                    raise gf.error(key, "true or false" + (" or null" if default is None else ""), v)
            elif type(v) is not type(default):
                raise gf.error(key, f"a {type(default).__name__} like the optimizer's", v)
        extra = sorted(set(gf.data) - set(new))
        if extra:
            raise gf.error(extra[0], f"no such Adam setting (it has {sorted(new)})", gf.data[extra[0]])
        out.append(group)
    return out


def _read_state(path: Path, old_meta: Path) -> tuple[dict[str, Tensor], Fields]:
    """(tensors, record) of train_state.safetensors; the record of the older layout from train_state.json."""
    data = path.read_bytes()
    try:
        return read_tensors_with_meta(data, str(path), STATE_FORMAT, "a training state file", "net.unet.conv_in.weight")
    except FileFormatError:
        if not old_meta.is_file():
            raise
    tensors = _read_weights(path)  # the older layout: tensors here, the record in train_state.json
    return tensors, Fields(str(old_meta), read_json(old_meta, "a training state record"))


def _read_weights(path: Path) -> dict[str, Tensor]:
    """The tensors of a plain safetensors file; a FileFormatError naming it when it is not one."""
    from safetensors.torch import load

    if not path.is_file():
        raise FileFormatError(str(path), None, "the file is missing", what="a weights file")
    try:
        return load(path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types on junk
        raise FileFormatError(
            str(path), None, f"not a safetensors file ({str(exc)[:200]})", what="a weights file"
        ) from None


def _load_weights(where: str, net: torch.nn.Module, weights: dict[str, Tensor], prefix: str) -> None:
    """Load ``weights`` into ``net``: every tensor present, finite, floating and of the network's shape."""
    own = net.state_dict()
    for k, v in own.items():
        got = weights.get(k)
        if got is None or tuple(got.shape) != tuple(v.shape) or not got.dtype.is_floating_point:
            raise FileFormatError(
                where,
                f"{prefix}.{k}",
                f"a floating tensor of shape {tuple(v.shape)}",
                got if got is not None else "nothing",
            )
        if not bool(torch.isfinite(got).all()):
            raise FileFormatError(where, f"{prefix}.{k}", "finite values", "NaN or infinite values")
    extra = sorted(set(weights) - set(own))
    if extra:
        raise FileFormatError(
            where, f"{prefix}.{extra[0]}", "no tensor of that name (not in this network)", weights[extra[0]]
        )
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()})


def _read_train_config(f: Fields) -> TrainConfig:
    """A TrainConfig from a checkpoint's record, every field typed and ranged."""
    known = {fl.name for fl in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(f.data) - known)
    if unknown:
        raise f.error(unknown[0], f"no such field (TrainConfig has {sorted(known)})", f.data[unknown[0]])
    f.process("sde")
    channels = f.integers("channels", min_length=1, low=1, high=MAX_CHANNELS)
    shape = f.integers("shape", length=3, low=1, high=MAX_SIZE)
    cfg = TrainConfig(
        sde=f.obj("sde").data,
        channels=tuple(channels),
        layers_per_block=f.integer("layers_per_block", low=1, high=MAX_LAYERS),
        attention=f.boolean("attention"),
        norm_groups=f.integer("norm_groups", low=1, high=MAX_CHANNELS),
        shape=tuple(shape),
        batch_size=f.integer("batch_size", low=1, high=1 << 24),
        lr=f.positive("lr"),
        warmup=f.integer("warmup", low=0),
        grad_clip=f.number("grad_clip", low=0.0),
        ema=f.number("ema", low=0.0, high=1.0, high_open=True),
        t_eps=f.number("t_eps", low=0.0, high=1.0, low_open=True, high_open=True),
        seed=f.integer("seed", low=0, high=2**63 - 1),
        data=f.string("data"),
        num_classes=f.integer("num_classes", 0, low=0, high=(1 << 20) - 1),
        label_dropout=f.number("label_dropout", 0.15, low=0.0, high=1.0, high_open=True),
    )
    model = {"sde": cfg.sde, "unet": cfg.unet_config(), "shape": list(cfg.shape)}
    try:  # the network it describes: the same checks as a model config's
        check_model_config(f.path, model)
    except FileFormatError as exc:
        field = {"unet.channels": "channels", "unet.norm_groups": "norm_groups", "unet.sample_size": "shape"}
        name = field.get(exc.field or "", exc.field or "config")
        raise f.error(name, exc.expected, f.data.get(name, f.data.get("shape"))) from None
    return cfg

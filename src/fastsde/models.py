"""Shipped trained models and the UNet configs they use.

Every model is a diffusers ``UNet2DModel`` predicting noise ε, conditioned on the continuous label
999·t (VP and VE alike: for VE, 999·t is an affine map of log σ, since t = log(σ/σ_min)/log(σ_max/σ_min)).
For VE the network input is scaled by c_in = 1/√(1 + σ²) inside ``EpsNetwork`` so that it sees unit-scale
inputs up to σ_max; VP inputs are already unit scale and pass through unchanged, so a VP network is a plain
UNet2DModel usable with ``DiffusersUNetScore``. The score is s = −ε̂/σ(t).

Package data: ``fastsde/_assets/weights/<name>.safetensors`` (EMA weights) + ``<name>.json`` (config and training record).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .files import Fields, FileFormatError
from .guidance import CFGScore
from .score import DiffusersUNetScore, NoisePredictionScore, VelocityScore
from .sde import SDE, VESDE, VPSDE, RectifiedFlow, sde_from_config

__all__ = [
    "EpsNetwork",
    "LoadedModel",
    "build_network",
    "load_model",
    "load_diffusers_folder",
    "list_models",
]


#: by the "type" of sde.config()
class EpsNetwork(nn.Module):
    """A UNet2DModel as a noise predictor ε̂(x, label) with label = 999·t (and VE input scaling)."""

    time_input_name = "999*t"

    def __init__(self, unet: nn.Module, sde: SDE) -> None:
        super().__init__()
        self.unet = unet
        self.sde = sde
        self.input_scaling = isinstance(sde, VESDE)
        classes = getattr(getattr(unet, "config", None), "num_class_embeds", None)
        #: a class-conditional network's null label (the last class embedding; trained with label
        #: dropout as the unconditional model), used when no class_labels are given; None otherwise
        self.null_label: int | None = int(classes) - 1 if classes else None

    def time_input(self, t: Tensor) -> Tensor:
        """t -> the network's conditioning label."""
        return 999.0 * t

    def forward(self, x: Tensor, label: Tensor, class_labels: Tensor | None = None) -> Tensor:
        dtype = next(self.unet.parameters()).dtype
        label = label.reshape(-1).expand(x.shape[0]) if label.numel() == 1 else label
        if self.input_scaling:
            sigma = self.sde.marginal_std(label.to(torch.float64) / 999.0).to(x.dtype)
            x = x / torch.sqrt(1.0 + sigma**2).reshape(-1, *([1] * (x.dim() - 1)))
        if class_labels is None and self.null_label is not None:
            class_labels = torch.full((x.shape[0],), self.null_label, dtype=torch.long)
        extra = {} if class_labels is None else {"class_labels": class_labels.to(x.device, torch.long)}
        return self.unet(x.to(dtype), label.to(dtype), **extra).sample.to(x.dtype)


def build_unet(cfg: dict[str, Any]) -> nn.Module:
    """A small diffusers UNet2DModel from a fastsde unet config (channels per level, optional attention
    at the lowest resolution)."""
    from diffusers import UNet2DModel

    channels = tuple(int(c) for c in cfg["channels"])
    levels = len(channels)
    attention = bool(cfg.get("attention", False))
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if attention:
        down[-1] = "AttnDownBlock2D"
        up[0] = "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=int(cfg.get("sample_size", 8)),
        in_channels=int(cfg.get("in_channels", 1)),
        out_channels=int(cfg.get("in_channels", 1)),
        layers_per_block=int(cfg.get("layers_per_block", 1)),
        block_out_channels=channels,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=int(cfg.get("norm_groups", 8)),
        num_class_embeds=int(cfg["num_class_embeds"]) if cfg.get("num_class_embeds") else None,
    )


class VelocityNetwork(EpsNetwork):
    """The same UNet trained for flow matching: it predicts the velocity v = ε − x0 on a
    :class:`~fastsde.sde.RectifiedFlow`, conditioned on 999·σ(u) (σ = the flow-matching t, so a
    network trained on the linear path can be sampled under any shift of it)."""

    time_input_name = "999*sigma"

    def time_input(self, t: Tensor) -> Tensor:
        return 999.0 * self.sde.marginal_std(t)


def build_network(unet_cfg: dict[str, Any], sde_cfg: dict[str, Any]) -> EpsNetwork:
    """An EpsNetwork for a diffusion process, a VelocityNetwork for a rectified flow."""
    sde = sde_from_config(sde_cfg)
    cls = VelocityNetwork if isinstance(sde, RectifiedFlow) else EpsNetwork
    return cls(build_unet(unet_cfg), sde)


def network_flops(net: nn.Module, shape: tuple[int, ...]) -> int:
    """Floating-point operations of one forward pass for one sample (torch's flop counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(2, *shape)
    label = torch.full((2,), 500.0)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, label)
    return int(counter.get_total_flops() // 2)


@dataclass
class LoadedModel:
    """A loaded model: ``score(x, t)`` (eval mode, no grad), its process, sample shape and config.

    ``name`` is the shipped name or the folder's path. ``eval_cost`` is the cost of one evaluation
    relative to the smallest shipped model (FLOP ratio; NaN where unknown). ``adapter`` is the score of a
    network that is not an EpsNetwork (a diffusers folder's UNet); None builds it from ``network``.
    """

    #: the mark the artifact layer reads (``artifacts.artifact.loaded_model``), which cannot import this module
    is_loaded_model = True
    #: not part of a run's content identity (``fastsde.identity``): the cost relative to the smallest
    #: shipped model, which moves whenever a smaller model ships, and the name (a folder's path), which is
    #: the run's label (``model=``) rather than what the model computes
    identity_ignores = ("eval_cost", "name")
    name: str
    network: nn.Module
    sde: SDE
    shape: tuple[int, ...]
    config: dict[str, Any]
    eval_cost: float
    adapter: Callable[[Tensor, Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        if self.adapter is not None:
            self._score = self.adapter
        elif isinstance(self.network, VelocityNetwork):  # flow matching: the network predicts v = ε − x0
            self._score = VelocityScore(self.network, self.sde, time_input=self.network.time_input)
        else:
            self._score = NoisePredictionScore(self.network, self.sde, time_input=self.network.time_input)

    def score(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        """The score; a class-conditional model takes ``class_labels`` (n,) (default: its null label,
        the unconditional model)."""
        with torch.no_grad():
            return self._score(x, t, **cond)

    @property
    def autograd_score(self) -> Callable[..., Tensor]:
        """The same score with autograd left on (``score`` runs under no_grad for sampling): what a
        likelihood needs, whose divergence differentiates the score in x. Flow, noise-prediction,
        class-conditional and diffusers-folder models alike."""
        return self._score

    @property
    def data_prediction(self) -> Callable[..., Tensor] | None:
        """The data prediction x̂0(x, t, **cond) of a flow model (what a solve from pure noise needs,
        where the score is −x whatever the data); None for a noise-prediction model."""
        fn = getattr(self._score, "data_prediction", None)
        if not callable(fn):
            return None

        def predict(x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
            with torch.no_grad():
                return fn(x, t, **cond)

        return predict

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional model (0 for an unconditional one)."""
        return int(self.config.get("conditioning", {}).get("class_labels", {}).get("num_classes", 0))

    @property
    def null_cond(self) -> dict[str, int] | None:
        """The conditioning of the unconditional model (``{"class_labels": null label}``) for
        classifier-free guidance; None for an unconditional model."""
        labels = self.config.get("conditioning", {}).get("class_labels")
        return None if not labels else {"class_labels": int(labels["null_label"])}

    def guided(self, scale: float):
        """This model's score under classifier-free guidance of ``scale`` (w = 1: the conditional model)."""
        if self.null_cond is None:
            raise ValueError(f"model {self.name!r} is not class-conditional: it has no null label to guide against")
        return CFGScore(self.score, scale, null_cond=self.null_cond, sde=self.sde)

    def __repr__(self) -> str:
        return f"LoadedModel({self.name!r}, sde={self.sde!r}, shape={self.shape}, eval_cost={self.eval_cost:.2f})"


def _models_dir():
    return resources.files("fastsde").joinpath("_assets", "weights")


def list_models() -> list[str]:
    """Names of the shipped models (``fastsde sample --model`` also takes "mixture", the exact 2-D problem,
    and model folders by path)."""
    names = [p.name[: -len(".json")] for p in _models_dir().iterdir() if p.name.endswith(".json")]
    return sorted(names)


#: Bounds of a fastsde UNet config: a file asking for more is refused before any allocation.
MAX_CHANNELS, MAX_LEVELS, MAX_LAYERS, MAX_SIZE, MAX_IN_CHANNELS = 4096, 8, 16, 4096, 64
#: Rough upper bound of the parameters a config may describe (about 9·c² per 3x3 conv).
MAX_PARAMS = 2e9


def check_model_config(path: str | os.PathLike, cfg: Any) -> dict[str, Any]:
    """A fastsde model config (``<name>.json`` or a train folder's config.json), every field typed
    and ranged; a FileFormatError naming the file and field. Returns ``cfg``."""
    f = Fields(str(path), cfg)
    f.string("format", None, choices=("fastsde-unet-eps/1",))
    sde = f.process("sde")
    u = f.obj("unet")
    channels = u.integers("channels", min_length=1, low=1, high=MAX_CHANNELS)
    if len(channels) > MAX_LEVELS:
        raise u.error("channels", f"at most {MAX_LEVELS} levels", channels)
    layers = u.integer("layers_per_block", 1, low=1, high=MAX_LAYERS)
    u.boolean("attention", False)
    groups = u.integer("norm_groups", 8, low=1, high=MAX_CHANNELS)
    if any(c % groups for c in channels):
        raise u.error("norm_groups", f"a divisor of every channel count {channels}", groups)
    in_channels = u.integer("in_channels", 1, low=1, high=MAX_IN_CHANNELS)
    size = u.integer("sample_size", 8, low=1, high=MAX_SIZE)
    if size % 2 ** (len(channels) - 1):
        raise u.error("sample_size", f"a multiple of {2 ** (len(channels) - 1)} ({len(channels)} levels)", size)
    if 9.0 * sum(c * c for c in channels) * (4 * layers + 4) > MAX_PARAMS:
        raise u.error("channels", f"a network of at most ~{MAX_PARAMS:.0e} parameters", channels)
    embeds = u.integer("num_class_embeds", None, low=2, high=1 << 20)
    shape = f.integers("shape", length=3, low=1, high=MAX_SIZE)
    if shape != [in_channels, size, size]:
        raise f.error(
            "shape", f"[unet.in_channels, unet.sample_size, unet.sample_size] = {[in_channels, size, size]}", shape
        )
    f.positive("flops_per_sample", None)
    f.integer("n_params", None, low=1)
    flow = isinstance(sde, RectifiedFlow)
    f.string("prediction", None, choices=("flow",) if flow else ("epsilon",))
    f.string("time_input", None, choices=((VelocityNetwork if flow else EpsNetwork).time_input_name,))
    if f.boolean("input_scaling", None) not in (None, isinstance(sde, VESDE)):
        raise f.error(
            "input_scaling", f"{str(isinstance(sde, VESDE)).lower()} for a {type(sde).__name__}", cfg["input_scaling"]
        )
    labels = f.obj("conditioning", {}).obj("class_labels", {})
    if labels.data:
        classes = labels.integer("num_classes", low=1, high=(1 << 20) - 1)
        if embeds != classes + 1:
            raise u.error("num_class_embeds", f"conditioning.class_labels.num_classes + 1 = {classes + 1}", embeds)
        labels.integer("null_label", low=classes, high=classes)
    f.obj("training", {})
    return cfg


def _read_config(name: str) -> dict[str, Any]:
    """The config of one shipped model, checked field by field; a broken file is a FileFormatError
    naming the model and the file (the other models are not read, so they still load)."""
    path = _models_dir().joinpath(f"{name}.json")
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FileFormatError(
            str(path), None, str(exc), message=f"model {name!r}: cannot read its config {path}: {exc}"
        ) from None
    try:
        return check_model_config(str(path), cfg)
    except FileFormatError as exc:
        raise exc.within(f"model {name!r}") from None


def _flops(name: str) -> float:
    """A shipped model's FLOPs per sample (positive, finite) from its config; NaN where the config
    lacks it or is broken (a broken model never affects another one's eval_cost)."""
    try:
        value = _read_config(name).get("flops_per_sample")
    except ValueError:
        return math.nan
    return math.nan if value is None else float(value)


#: dtype names load_model accepts besides torch dtypes.
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating torch dtype, or its name ("float32", "torch.float64", ...)."""
    if isinstance(dtype, str):
        key = dtype.removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"dtype must be a floating dtype, one of {sorted(_DTYPES)}, got {dtype!r}")
        return _DTYPES[key]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype (or one of {sorted(_DTYPES)}), got {dtype!r}")
    return dtype


def load_model(name: str | os.PathLike = "digits", dtype: torch.dtype | str = torch.float32) -> LoadedModel:
    """Load a shipped model by name (see list_models()), or a model folder by path: one written by
    ``fastsde train --out DIR`` (config.json + model.safetensors), or a diffusers ``save_pretrained``
    folder of a UNet2DModel with its scheduler config (see load_diffusers_folder). A model whose files
    are broken is a ValueError naming the file; the other models are not affected. Never unpickles."""
    dtype = _as_dtype(dtype)
    available = list_models()
    if isinstance(name, str) and name in available:
        cfg = _read_config(name)
        folder = _models_dir()
        return _assemble(name, cfg, f"{name}.json", folder.joinpath(f"{name}.safetensors"), dtype)
    if isinstance(name, (str, os.PathLike)) and Path(name).is_dir():
        return _load_folder(Path(name), dtype)
    raise ValueError(
        f"unknown model {name!r}; shipped models are {available} (or give the path of a folder written by "
        "`fastsde train --out DIR`)"
    )


def _read_json(label: str, path: Path) -> dict[str, Any]:
    """A JSON object from a model's file; a missing or broken file is a FileFormatError naming it."""
    if not path.is_file():
        raise FileFormatError(str(path), None, "missing", message=f"model {label!r}: {path} is missing")
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FileFormatError(
            str(path), None, str(exc), message=f"model {label!r}: cannot read {path}: {exc}"
        ) from None
    if not isinstance(cfg, dict):
        raise FileFormatError(str(path), None, "a JSON object", message=f"model {label!r}: {path} is not a JSON object")
    return cfg


def _load_folder(folder: Path, dtype: torch.dtype) -> LoadedModel:
    """A model folder: fastsde's (config.json with unet/sde/shape + model.safetensors) or diffusers'."""
    label = str(folder)
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder  # a pipeline folder
    if not (unet_dir / "config.json").is_file():
        raise ValueError(
            f"model {label!r}: the folder has no config.json (a folder written by `fastsde train --out DIR` holds "
            "config.json and model.safetensors; a diffusers one config.json and diffusion_pytorch_model.safetensors)"
        )
    cfg = _read_json(label, unet_dir / "config.json")
    if "_class_name" in cfg:
        return load_diffusers_folder(folder, dtype)
    try:
        check_model_config(str(folder / "config.json"), cfg)
    except FileFormatError as exc:
        raise exc.within(f"model {label!r}") from None
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"model {label!r}: its weights {weights} are missing")
    return _assemble(label, cfg, str(folder / "config.json"), weights, dtype)


def _assemble(label: str, cfg: dict[str, Any], cfg_name: str, weights_path, dtype: torch.dtype) -> LoadedModel:
    """Build the network a checked fastsde config describes and load its safetensors weights into it
    (every weight a finite floating tensor of the shape the config gives it)."""
    from safetensors.torch import load

    def bad(field: str | None, expected: str, message: str) -> FileFormatError:
        return FileFormatError(str(weights_path), field, expected, message=f"model {label!r}: {message}")

    try:
        net = build_network(cfg["unet"], cfg["sde"])
    except (KeyError, TypeError, ValueError, RuntimeError, ZeroDivisionError) as exc:
        raise FileFormatError(
            cfg_name,
            "unet",
            "a buildable network",
            message=f"model {label!r}: its config {cfg_name} does not describe a network: {exc!r}",
        ) from None
    try:
        weights = load(weights_path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types on truncated / corrupt files
        raise bad(None, str(exc), f"cannot read its weights {weights_path}: {exc}") from None
    for k, v in weights.items():
        if not v.dtype.is_floating_point or not bool(torch.isfinite(v).all()):
            raise bad(k, "finite floating values", f"the weight {k!r} in {weights_path} is not finite floating values")
    try:
        net.load_state_dict({k: v.float() for k, v in weights.items()})
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) if len(first) > 1 else first[0] if first else ""
        raise bad(None, detail, f"the weights in {weights_path.name} do not fit its config: {detail[:300]}") from None
    net = net.to(dtype).eval().requires_grad_(False)
    flops = cfg.get("flops_per_sample")
    cost = float(flops) / _smallest_flops() if flops is not None else math.nan
    return LoadedModel(label, net, net.sde, tuple(cfg["shape"]), cfg, cost)


def _smallest_flops() -> float:
    """FLOPs per sample of the smallest shipped model (the unit of eval_cost); NaN if none is readable.
    Each model's config is checked on its own: a broken one is skipped, never the others' unit."""
    finite = [f for f in (_flops(n) for n in list_models()) if math.isfinite(f) and f > 0]
    return min(finite) if finite else math.nan


def _scheduler_config(label: str, folder: Path) -> dict[str, Any]:
    """The scheduler config next to a diffusers UNet: scheduler_config.json in the folder or in scheduler/."""
    for candidate in (folder / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            return _read_json(label, candidate)
    raise ValueError(
        f"model {label!r}: no scheduler config (scheduler_config.json in {folder} or in {folder / 'scheduler'}); "
        "it sets the noise schedule the UNet was trained with"
    )


def _check_diffusers_config(label: str, path: Path, cfg: dict[str, Any]) -> None:
    """The fields of a diffusers UNet config that fastsde reads itself (diffusers checks the rest)."""
    f = Fields(str(path), cfg)
    try:
        f.string("_class_name")
        f.integer("in_channels", 3, low=1, high=MAX_IN_CHANNELS)
        size = f.raw("sample_size", None)
        if isinstance(size, list):
            f.integers("sample_size", length=2, low=1, high=MAX_SIZE)
        elif size is not None:
            f.integer("sample_size", low=1, high=MAX_SIZE)
    except FileFormatError as exc:
        raise exc.within(f"model {label!r}") from None


def load_diffusers_folder(folder: str | os.PathLike, dtype: torch.dtype | str = torch.float32) -> LoadedModel:
    """A diffusers ``save_pretrained`` folder of a UNet2DModel (config.json +
    diffusion_pytorch_model.safetensors, or a pipeline folder with unet/) plus its scheduler config.

    The scheduler's ᾱ table becomes a DiscreteVPSDE (VPSDE.from_diffusers_scheduler); the score is
    DiffusersUNetScore with the scheduler's prediction_type, the UNet conditioned on the fractional
    timestep. Weights load from safetensors only. eval_cost is NaN (no FLOP count for foreign networks).
    """
    import diffusers

    dtype = _as_dtype(dtype)
    folder = Path(folder)
    label = str(folder)
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    cfg = _read_json(label, unet_dir / "config.json")
    _check_diffusers_config(label, unet_dir / "config.json", cfg)
    if cfg.get("_class_name") != "UNet2DModel":
        raise ValueError(
            f"model {label!r}: {unet_dir / 'config.json'} is a {cfg.get('_class_name')!r}, not a UNet2DModel"
        )
    if not (unet_dir / "diffusion_pytorch_model.safetensors").is_file():
        raise ValueError(f"model {label!r}: {unet_dir / 'diffusion_pytorch_model.safetensors'} is missing")
    sched_cfg = _scheduler_config(label, folder)
    sched_cls = getattr(diffusers, str(sched_cfg.get("_class_name")), None)
    if not (isinstance(sched_cls, type) and issubclass(sched_cls, diffusers.SchedulerMixin)):
        sched_cls = diffusers.DDPMScheduler
    try:
        scheduler = sched_cls.from_config(sched_cfg)
        sde = VPSDE.from_diffusers_scheduler(scheduler)
    except (TypeError, ValueError, KeyError, NotImplementedError) as exc:
        raise ValueError(f"model {label!r}: its scheduler config does not give a VP schedule: {exc}") from None
    try:
        unet = diffusers.UNet2DModel.from_pretrained(
            unet_dir, use_safetensors=True, torch_dtype=dtype, low_cpu_mem_usage=False
        )
    except Exception as exc:  # diffusers raises OSError, ValueError, safetensors errors ...
        raise ValueError(f"model {label!r}: cannot load the UNet in {unet_dir}: {exc}") from None
    unet = unet.eval().requires_grad_(False)
    prediction = sched_cfg.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "sample", "v_prediction"):
        raise FileFormatError(
            label, "prediction_type", "one of ['epsilon', 'sample', 'v_prediction']", prediction
        ).within(f"model {label!r}: its scheduler config")
    size = unet.config.sample_size
    hw = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
    shape = (int(unet.config.in_channels), *hw)
    config = {"format": "diffusers", "sde": sde.config(), "shape": list(shape), "prediction": prediction}
    score = DiffusersUNetScore(unet, sde, prediction_type=prediction)
    return LoadedModel(label, unet, sde, shape, config, math.nan, adapter=score)

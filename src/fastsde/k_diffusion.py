"""fastsde solvers with k-diffusion's sampler signature (for k-diffusion and ComfyUI code).

Every fixed-grid solver is ``sample_<name>(model, x, sigmas, extra_args=None, callback=None,
disable=None, **options)``, every adaptive one ``sample_<name>(model, x, sigma_min, sigma_max,
extra_args=None, callback=None, disable=None, **options)``, as in k-diffusion:

- ``model(x, sigma, **extra_args)`` is a denoiser (x̂0 from the noisy x = x0 + σ·z, one σ per row);
- ``x`` is the starting state (noise times ``sigmas[0]``, or ``sigma_max``);
- ``sigmas`` is the grid; a trailing 0 is taken as k-diffusion takes it: the last move goes to σ = 0,
  i.e. fastsde's final denoise at the last positive σ (without it the solve ends at ``sigmas[-1]``);
- ``extra_args``: tensors with one row per sample follow the rows the solver evaluates (so they stay
  right under compaction); everything else (``cond_scale``, dicts, ...) is passed as it is;
- ``callback`` receives k-diffusion's dict ``{"x", "i", "sigma", "sigma_hat", "denoised"}`` after each
  move (``x`` the state the move started from, ``denoised`` its x̂0);
- multistep solvers keep their full order to the last positive σ (``lower_order_final=False``, as
  k-diffusion; the move to σ = 0 is the denoise);
- ``disable`` turns the progress bar off; ``options`` are the fastsde solver's (``fastsde.SOLVERS``),
  plus ``seed`` for stochastic solvers (default: drawn from torch's global generator, whose state
  k-diffusion's samplers also consume).

The function returns the samples, as k-diffusion's do; the adaptive ones end at ``sigma_min`` without a
final denoise, as ``sample_dpm_adaptive`` does (``denoise=True`` adds it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .api import sample
from .score import DenoiserScore
from .sde import EDM
from .solvers import SOLVERS
from .solvers.core.context import StepInfo

#: solvers that need more than a denoiser (a hierarchy of networks)
_EXCLUDED = ("mlem",)


def _split_extra_args(extra_args: Mapping[str, Any] | None, n: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Per-sample tensors (one row per sample) and the rest, passed as is."""
    if extra_args is None:
        return {}, {}
    if not isinstance(extra_args, Mapping):
        raise ValueError(
            f"extra_args must be a dict of keyword arguments for the model, got {type(extra_args).__name__}"
        )
    rows = {k: v for k, v in extra_args.items() if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == n}
    fixed = {k: v for k, v in extra_args.items() if k not in rows}
    return rows, fixed


def _check_x(x: Any) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating tensor (batch, *dims), got {got}")
    return x


def _check_sigmas(sigmas: Any) -> tuple[Tensor, bool]:
    """The positive grid (float64, CPU) and whether a trailing 0 asks for the final denoise."""
    try:
        s = torch.as_tensor(sigmas.detach().cpu() if isinstance(sigmas, Tensor) else sigmas, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"sigmas must be a 1-D list of numbers: {exc}") from None
    s = s.reshape(-1)
    to_zero = bool(s.numel()) and float(s[-1]) == 0.0
    grid = s[:-1] if to_zero else s
    if grid.numel() < 1 or (not to_zero and grid.numel() < 2):
        raise ValueError(f"sigmas must hold at least two values (the start and the end), got {s.tolist()}")
    if not bool(torch.isfinite(grid).all()) or not bool((grid > 0).all()) or not bool((grid[:-1] > grid[1:]).all()):
        raise ValueError(f"sigmas must be positive and strictly decreasing (a trailing 0 allowed), got {s.tolist()}")
    return grid, to_zero


class _Callback:
    """fastsde's StepInfo → k-diffusion's callback dict (x the state each move started from)."""

    def __init__(self, callback: Callable[[dict], Any], x: Tensor) -> None:
        self.callback = callback
        self.prev = x
        self.i = 0

    def __call__(self, info: StepInfo) -> None:
        sigma = info.t + info.h
        self.callback({"x": self.prev, "i": self.i, "sigma": sigma, "sigma_hat": sigma, "denoised": info.x0_hat})
        self.prev = info.x.clone()
        self.i += 1

    def final(self, sigma: float, denoised: Tensor) -> None:
        s = torch.full((denoised.shape[0],), sigma, dtype=denoised.dtype, device=denoised.device)
        self.callback({"x": self.prev, "i": self.i, "sigma": s, "sigma_hat": s, "denoised": denoised})


def _default_seed(spec: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    if "seed" in options or not spec.is_stochastic({k: v for k, v in options.items() if k != "denoise"}):
        return {}
    return {"seed": int(torch.randint(0, 2**62, (1,)).item())}


def _run(
    name: str,
    model: Callable[..., Tensor],
    x: Tensor,
    sde: EDM,
    extra_args: Mapping[str, Any] | None,
    callback: Callable[[dict], Any] | None,
    disable: bool | None,
    denoise: bool,
    options: dict[str, Any],
) -> tuple[Tensor, Any]:
    if not callable(model):
        raise ValueError(f"model must be a denoiser model(x, sigma, **extra_args), got {type(model).__name__}")
    rows, fixed = _split_extra_args(extra_args, x.shape[0])

    def denoiser(xx: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
        return model(xx, sigma, **cond, **fixed)

    spec = SOLVERS[name]
    options = {**_default_seed(spec, options), **options}
    relay = _Callback(callback, x) if callback is not None else None
    res = sample(
        DenoiserScore(denoiser, sde), sde, tuple(x.shape), name, x_init=x, cond=rows or None, denoise=denoise,
        callback=relay, progress=not disable if disable is not None else True, dtype=x.dtype, device=x.device,
        **options,
    )  # fmt: skip
    return res.samples, (relay, res)


def _fixed_sampler(name: str) -> Callable[..., Tensor]:
    def sampler(
        model: Callable[..., Tensor],
        x: Tensor,
        sigmas: Tensor,
        extra_args: Mapping[str, Any] | None = None,
        callback: Callable[[dict], Any] | None = None,
        disable: bool | None = None,
        **options: Any,
    ) -> Tensor:
        x = _check_x(x)
        grid, to_zero = _check_sigmas(sigmas)
        for key in ("grid", "steps", "t_end", "denoise", "x_init", "shape"):
            if key in options:
                raise ValueError(f"{key!r} is set by sigmas (the grid, and a trailing 0 for the final denoise)")
        if grid.numel() == 1:  # [σ, 0]: the move to σ = 0 is the denoise alone
            rows, fixed = _split_extra_args(extra_args, x.shape[0])
            s = torch.full((x.shape[0],), float(grid[0]), dtype=x.dtype, device=x.device)
            out = model(x, s, **rows, **fixed)
            if callback is not None:
                _Callback(callback, x).final(float(grid[0]), out)
            return out
        sde = EDM(sigma_min=float(grid[-1]), sigma_max=float(grid[0]))
        opts = {"grid": grid, "steps": int(grid.numel()), **options}
        if "lower_order_final" in SOLVERS[name].options:
            opts.setdefault("lower_order_final", False)  # k-diffusion lowers the order only on the move to σ = 0
        out, (relay, res) = _run(name, model, x, sde, extra_args, callback, disable, to_zero, opts)
        if relay is not None and to_zero:
            relay.final(float(grid[-1]), out)
        return out

    sampler.__name__ = sampler.__qualname__ = f"sample_{name}"
    sampler.__doc__ = (
        f"fastsde's ``{name}`` ({SOLVERS[name].summary}) with k-diffusion's signature: ``sigmas`` is the grid, "
        f"a trailing 0 the final denoise; options: {sorted(k for k in SOLVERS[name].options if k not in ('grid', 'steps'))}."
    )
    return sampler


def _adaptive_sampler(name: str) -> Callable[..., Tensor]:
    def sampler(
        model: Callable[..., Tensor],
        x: Tensor,
        sigma_min: float,
        sigma_max: float,
        extra_args: Mapping[str, Any] | None = None,
        callback: Callable[[dict], Any] | None = None,
        disable: bool | None = None,
        **options: Any,
    ) -> Tensor:
        x = _check_x(x)
        for label, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
            v = float(v) if isinstance(v, (int, float, Tensor)) and not isinstance(v, bool) else math.nan
            if not (math.isfinite(v) and v > 0):
                raise ValueError(
                    f"{label} must be a positive finite number, got {sigma_min if label == 'sigma_min' else sigma_max!r}"
                )
        if not float(sigma_min) < float(sigma_max):
            raise ValueError(f"sigma_min must be < sigma_max, got {sigma_min!r} and {sigma_max!r}")
        denoise = options.pop("denoise", False)
        sde = EDM(sigma_min=float(sigma_min), sigma_max=float(sigma_max))
        out, _ = _run(name, model, x, sde, extra_args, callback, disable, denoise, options)
        return out

    sampler.__name__ = sampler.__qualname__ = f"sample_{name}"
    sampler.__doc__ = (
        f"fastsde's adaptive ``{name}`` ({SOLVERS[name].summary}) with k-diffusion's ``sample_dpm_adaptive`` "
        f"signature: from sigma_max to sigma_min; options: {sorted(SOLVERS[name].options)}."
    )
    return sampler


#: the fixed-grid and adaptive solvers this module offers, by fastsde name
FIXED_GRID = tuple(n for n, s in SOLVERS.items() if s.nfe_per_step is not None and n not in _EXCLUDED)
ADAPTIVE = tuple(n for n, s in SOLVERS.items() if s.nfe_per_step is None and n not in _EXCLUDED)

for _name in FIXED_GRID:
    globals()[f"sample_{_name}"] = _fixed_sampler(_name)
for _name in ADAPTIVE:
    globals()[f"sample_{_name}"] = _adaptive_sampler(_name)

__all__ = ["FIXED_GRID", "ADAPTIVE"] + [f"sample_{n}" for n in FIXED_GRID + ADAPTIVE]

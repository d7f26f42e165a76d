"""The one source of randomness: keyed, counter-based draws.

Every draw is a pure function of (seed of the sample, stream, counter, element index), computed
with a 64-bit integer hash (splitmix64's finaliser) and turned into normals by Box–Muller. So
sample i gets the same numbers whatever the batch size, whichever other samples share its batch,
and whether or not finished samples were dropped from the batch. The integer part is exact on every
device; only the final float transform may differ in the last bit between devices.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["NoiseSource", "Stream", "as_noise_source", "check_seed"]

_MASK64 = (1 << 64) - 1


def _signed(v: int) -> int:
    """An unsigned 64-bit constant as torch's signed int64."""
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)
_GOLDEN = _signed(0x9E3779B97F4A7C15)
_LOW32 = (1 << 32) - 1


def _shr(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(z: Tensor) -> Tensor:
    """splitmix64 finaliser on an int64 tensor (wrapping arithmetic)."""
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def _mix_int(z: int) -> int:
    """The same finaliser on a Python int (used to derive per-sample seeds)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def check_seed(seed: object, what: str = "seed") -> int:
    """A seed as a Python int in [0, 2^64): any integer type (numpy's included), never a bool; a
    seed outside the range would wrap silently onto another seed, so it is refused."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(
            f"{what} must be an int in [0, 2**64) (or, for seed, a list of them or a NoiseSource), got {seed!r}"
        )
    value = int(seed)
    if not 0 <= value <= _MASK64:
        raise ValueError(f"{what} must lie in [0, 2**64), got {value}")
    return value


class Stream:
    """Stream identifiers, so that different kinds of draws never share numbers."""

    PRIOR = 1
    STEP = 2  # Brownian increments / Langevin noise of step k
    CORRECTOR = 3
    BERNOULLI = 4  # reserved: the level draws of multilevel EM (their own stream, so the Brownian path is EM's)
    PROBE = 5  # Hutchinson probes, dequantisation
    FIRST_MOVE = 6  # the shared first move of a stochastic method from m = 0 (a rectified flow's pure noise)
    USER = 16  # first id free for extensions


class NoiseSource:
    """Keyed draws for n samples. Row i depends only on seeds[i], the stream and the counter.

    Args:
        seeds: one integer seed per sample, each in [0, 2^64) (Python or numpy ints).
    """

    def __init__(self, seeds: Sequence[int] | Tensor) -> None:
        if isinstance(seeds, Tensor):
            if seeds.dtype.is_floating_point or seeds.dtype == torch.bool:
                raise ValueError(f"seeds must be integers, got a tensor of {seeds.dtype}")
            seeds = [int(s) for s in seeds.tolist()]
        seeds = [check_seed(s, "each seed") for s in seeds]
        if not seeds:
            raise ValueError("seeds must hold at least one seed, got an empty sequence")
        self.seeds = torch.tensor([_signed(_mix_int(s * 0x2545F4914F6CDD1D + 7)) for s in seeds], dtype=torch.int64)

    @classmethod
    def from_seed(cls, seed: int, n: int, *, start: int = 0) -> NoiseSource:
        """Seed sample i with (seed, i): sample i is the same for every batch size. ``start`` gives
        the rows of global indices start .. start + n - 1 (a shard of a larger run) without building
        the others: ``from_seed(s, m, start=a)`` equals ``from_seed(s, a + m).subset(range(a, a + m))``."""
        base = _mix_int(check_seed(seed, "seed"))
        if isinstance(start, bool) or not isinstance(start, numbers.Integral) or start < 0:
            raise ValueError(f"start must be a non-negative int, got {start!r}")
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if int(start) + int(n) > 1 << 62:
            raise ValueError(f"sample indices must stay below 2**62, got start {start} + n {n}")
        out = cls.__new__(cls)
        out._seeds, out._rows = None, (base, int(start), int(n))  # made at the first draw: a solve without
        return out  # noise (a deterministic solver from a given x_T) never pays for them

    @property
    def seeds(self) -> Tensor:
        """The per-sample seeds (int64). From :meth:`from_seed` they are computed at the first use, as one
        int64 tensor (wrapping arithmetic equals Python's mod 2**64): no Python loop over the samples."""
        if self._seeds is None:
            base, start, n = self._rows
            idx = torch.arange(start, start + n, dtype=torch.int64)
            s = _mix(idx + 0x51ED2705) ^ _signed(base)
            self._seeds = _mix(s * _signed(0x2545F4914F6CDD1D) + 7)
        return self._seeds

    @seeds.setter
    def seeds(self, value: Tensor) -> None:
        self._seeds = value

    def __len__(self) -> int:
        return self._rows[2] if self._seeds is None else self._seeds.shape[0]

    def subset(self, rows: Tensor | Sequence[int]) -> NoiseSource:
        """The source for a subset of the samples (same numbers for those samples)."""
        out = NoiseSource.__new__(NoiseSource)
        out.seeds = self.seeds[torch.as_tensor(rows, dtype=torch.long)]
        return out

    def _bits(self, shape: Sequence[int], stream: int, counter: int | Tensor, rows: Tensor | None, device) -> Tensor:
        seeds = self.seeds if rows is None else self.seeds[rows.to("cpu", torch.long)]
        n = seeds.shape[0]
        counter = (
            torch.as_tensor(counter, dtype=torch.int64).expand(n)
            if not isinstance(counter, Tensor)
            else counter.to("cpu", torch.int64).expand(n)
        )
        key = _mix(seeds ^ _mix(counter * _GOLDEN + _signed(stream * 0xBF58476D1CE4E5B9 + 1)))
        d = math.prod(shape)
        idx = torch.arange(d, dtype=torch.int64, device=device)
        bits = _mix(key.to(device)[:, None] + (idx[None, :] + 1) * _GOLDEN)
        return bits.reshape(n, *shape)

    def uniform(
        self,
        shape: Sequence[int],
        stream: int,
        counter: int | Tensor = 0,
        rows: Tensor | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """Uniform draws in [0, 1), shape (rows, *shape); `counter` may differ per row."""
        bits = self._bits(shape, stream, counter, rows, device)
        return (_shr(bits, 11).to(torch.float64) * 2.0**-53).to(dtype)

    def normal(
        self,
        shape: Sequence[int],
        stream: int,
        counter: int | Tensor = 0,
        rows: Tensor | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """Standard normal draws, shape (rows, *shape); `counter` may differ per row."""
        bits = self._bits(shape, stream, counter, rows, device)
        u1 = (_shr(bits, 32).to(torch.float64) + 1.0) * 2.0**-32  # (0, 1]
        u2 = (bits & _LOW32).to(torch.float64) * 2.0**-32  # [0, 1)
        z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
        return z.to(dtype)

    def rademacher(self, shape, stream, counter=0, rows=None, *, dtype=torch.float32, device="cpu") -> Tensor:
        """±1 draws with equal probability (Hutchinson probes)."""
        bits = self._bits(shape, stream, counter, rows, device)
        return ((bits & 1) * 2 - 1).to(dtype)


def _is_1d_array(seed: object) -> bool:
    """A 1-D numpy array of per-sample seeds (checked without importing numpy)."""
    return type(seed).__module__ == "numpy" and getattr(seed, "ndim", None) == 1


def as_noise_source(seed: int | Sequence[int] | NoiseSource, n: int) -> NoiseSource:
    """Accept one seed, a list of per-sample seeds, or a NoiseSource; check it covers n samples."""
    if isinstance(seed, NoiseSource):
        src = seed
    elif isinstance(seed, (list, tuple)) or (isinstance(seed, Tensor) and seed.dim() == 1) or _is_1d_array(seed):
        src = NoiseSource(seed)
    else:
        src = NoiseSource.from_seed(seed, n)
    if len(src) != n:
        raise ValueError(f"seed must give one seed per sample: expected {n}, got {len(src)}")
    return src

"""The noise source: keyed, batch-independent, correctly distributed, exact integer hashing."""

from __future__ import annotations

import math

import pytest
import torch

from fastsde.noise import NoiseSource, Stream, _mix, _mix_int, _signed, as_noise_source


def test_torch_hash_matches_python_reference():
    values = [0, 1, 2**40 + 3, -5, 2**63 - 1, -(2**63)]
    got = _mix(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [_signed(_mix_int(v)) for v in values]


def test_sample_i_is_independent_of_batch_size():
    small = NoiseSource.from_seed(7, 5).normal((3, 4), Stream.STEP, 11)
    large = NoiseSource.from_seed(7, 50).normal((3, 4), Stream.STEP, 11)
    assert torch.equal(small, large[:5])


def test_rows_and_per_row_counters_select_the_same_numbers():
    src = NoiseSource.from_seed(3, 10)
    full_a = src.normal((6,), Stream.STEP, 4)
    full_b = src.normal((6,), Stream.STEP, 9)
    rows = torch.tensor([8, 2])
    mixed = src.normal((6,), Stream.STEP, torch.tensor([4, 9]), rows=rows)
    assert torch.equal(mixed[0], full_a[8]) and torch.equal(mixed[1], full_b[2])
    assert torch.equal(src.subset(rows).normal((6,), Stream.STEP, 4), full_a[rows])


def test_streams_counters_and_seeds_give_different_numbers():
    src = NoiseSource.from_seed(0, 4)
    a = src.normal((8,), Stream.STEP, 0)
    assert not torch.equal(a, src.normal((8,), Stream.STEP, 1))
    assert not torch.equal(a, src.normal((8,), Stream.PRIOR, 0))
    assert not torch.equal(a, NoiseSource.from_seed(1, 4).normal((8,), Stream.STEP, 0))
    assert not torch.equal(a[0], a[1])
    assert torch.equal(a, src.normal((8,), Stream.STEP, 0))


def test_normal_moments_and_independence():
    z = NoiseSource.from_seed(0, 20000).normal((10,), Stream.STEP, 0, dtype=torch.float64).flatten()
    n = z.numel()
    assert abs(float(z.mean())) < 4 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 4 * math.sqrt(2 / n)
    assert abs(float((z**4).mean()) - 3) < 4 * math.sqrt(96 / n)
    zz = z.reshape(20000, 10)
    corr = torch.corrcoef(zz.T) - torch.eye(10, dtype=torch.float64)
    assert float(corr.abs().max()) < 4 / math.sqrt(20000)
    # Kolmogorov–Smirnov against the normal CDF
    zs, _ = torch.sort(z[:20000])
    cdf = 0.5 * (1 + torch.erf(zs / math.sqrt(2)))
    ks = float((cdf - torch.arange(1, 20001, dtype=torch.float64) / 20000).abs().max())
    assert ks < 1.63 / math.sqrt(20000)  # 1% level


def test_uniform_and_rademacher():
    src = NoiseSource.from_seed(5, 1000)
    u = src.uniform((50,), Stream.USER, 0, dtype=torch.float64)
    assert float(u.min()) >= 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / u.numel())
    r = src.rademacher((50,), Stream.PROBE, 0)
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(r.mean())) < 4 / math.sqrt(r.numel())


def test_seed_forms():
    assert len(as_noise_source(0, 3)) == 3
    listed = as_noise_source([11, 12, 13], 3)
    again = as_noise_source([13, 12, 11], 3)
    assert torch.equal(listed.normal((2,), 1, 0)[0], again.normal((2,), 1, 0)[2])
    src = NoiseSource.from_seed(1, 4)
    assert as_noise_source(src, 4) is src
    with pytest.raises(ValueError, match="one seed per sample: expected 5, got 3"):
        as_noise_source([1, 2, 3], 5)
    with pytest.raises(ValueError, match="seed must be an int"):
        as_noise_source(1.5, 2)


def test_from_seed_equals_the_per_sample_definition_at_any_start():
    """from_seed computes the per-sample seeds as one int64 tensor: the same numbers as seeding each
    sample with (seed, i) one by one, up to indices near 2**62 (wrapping arithmetic = mod 2**64)."""
    from fastsde.noise import _mix_int

    for seed in (0, 1, 7, 2**63 + 5, 2**64 - 1):
        for start in (0, 3, 2**40 + 1, 2**62 - 6):
            base = _mix_int(seed)
            loop = NoiseSource([base ^ _mix_int(i + 0x51ED2705) for i in range(start, start + 6)])
            assert torch.equal(NoiseSource.from_seed(seed, 6, start=start).seeds, loop.seeds)
    with pytest.raises(ValueError, match="below 2\\*\\*62"):
        NoiseSource.from_seed(0, 10, start=2**62)
    with pytest.raises(ValueError, match="n must be a positive int"):
        NoiseSource.from_seed(0, 0)

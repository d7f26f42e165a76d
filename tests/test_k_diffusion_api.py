"""fastsde.k_diffusion: k-diffusion's sampler signature over fastsde's solvers.

Equality with k-diffusion's euler / heun / dpmpp_2m is checked against the methods written out here from
their definitions (Karras et al. 2022, Algorithm 1 and 2; Lu et al. 2022, DPM-Solver++(2M)) in float64,
and against k-diffusion itself where it is installed (the ``peers`` extra)."""

from __future__ import annotations

import math

import pytest
import torch

import fastsde
from fastsde import k_diffusion as fk

torch.set_num_threads(1)
F64 = torch.float64
DATA_VAR = 0.25


def denoiser(x, sigma, scale=1.0, shift=None):
    """x̂0 of N(shift, 0.25·I) data at noise σ (one per row); ``scale`` multiplies it (a scalar extra arg)."""
    s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
    mean = 0.0 if shift is None else shift.reshape(-1, *([1] * (x.dim() - 1)))
    return scale * (mean + (x - mean) * DATA_VAR / (DATA_VAR + s**2))


def karras(n: int, lo: float = 0.002, hi: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n, dtype=F64)
    s = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)])


def ref_euler(x, sigmas):
    for i in range(len(sigmas) - 1):
        d = (x - denoiser(x, sigmas[i] * x.new_ones(x.shape[0]))) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def ref_heun(x, sigmas):
    for i in range(len(sigmas) - 1):
        s_in = x.new_ones(x.shape[0])
        d = (x - denoiser(x, sigmas[i] * s_in)) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x2 = x + d * dt
            d2 = (x2 - denoiser(x2, sigmas[i + 1] * s_in)) / sigmas[i + 1]
            x = x + (d + d2) / 2 * dt
    return x


def ref_dpmpp_2m(x, sigmas):
    old = None
    for i in range(len(sigmas) - 1):
        d = denoiser(x, sigmas[i] * x.new_ones(x.shape[0]))
        lam, lam_next = -math.log(sigmas[i]), (math.inf if sigmas[i + 1] == 0 else -math.log(sigmas[i + 1]))
        h = lam_next - lam
        if old is None or sigmas[i + 1] == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * d
        else:
            r = (lam - (-math.log(sigmas[i - 1]))) / h
            x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * ((1 + 1 / (2 * r)) * d - old / (2 * r))
        old = d
    return x


@pytest.fixture(scope="module")
def x_t():
    return torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64) * 80.0


@pytest.mark.parametrize("name, ref", [("euler", ref_euler), ("heun", ref_heun), ("dpmpp_2m", ref_dpmpp_2m)])
@pytest.mark.parametrize("n", [4, 10, 25])
def test_equals_the_methods_written_out(x_t, name, ref, n):
    sigmas = karras(n)
    got = getattr(fk, f"sample_{name}")(denoiser, x_t, sigmas, disable=True)
    want = ref(x_t, sigmas.tolist())
    assert torch.allclose(got, want, atol=1e-10, rtol=0), (got - want).abs().max()


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m"])
def test_equals_k_diffusion(x_t, name):
    kd = pytest.importorskip("k_diffusion")
    sigmas = karras(10)
    want = getattr(kd.sampling, f"sample_{name}")(denoiser, x_t, sigmas, disable=True)
    got = getattr(fk, f"sample_{name}")(denoiser, x_t, sigmas, disable=True)
    assert torch.allclose(got, want, atol=1e-10, rtol=0)


def test_without_a_trailing_zero_the_solve_ends_at_the_last_sigma(x_t):
    sigmas = karras(8)[:-1]
    got = fk.sample_euler(denoiser, x_t, sigmas, disable=True)
    assert torch.allclose(got, ref_euler(x_t, sigmas.tolist()), atol=1e-10, rtol=0)


def test_a_single_sigma_then_zero_is_the_denoise(x_t):
    got = fk.sample_dpmpp_2m(denoiser, x_t, [3.0, 0.0], disable=True)
    assert torch.equal(got, denoiser(x_t, torch.full((5,), 3.0, dtype=F64)))


def test_extra_args_rows_follow_the_samples_and_scalars_pass_as_is(x_t):
    shift = torch.arange(5, dtype=F64)
    sigmas = karras(12)
    got = fk.sample_dpmpp_2m(denoiser, x_t, sigmas, extra_args={"shift": shift, "scale": 1.0}, disable=True)
    alone = fk.sample_dpmpp_2m(denoiser, x_t[3:4], sigmas, extra_args={"shift": shift[3:4], "scale": 1.0}, disable=True)
    assert torch.allclose(got[3:4], alone, atol=1e-12, rtol=0)
    # each sample lands at its own mean
    assert (got.mean(dim=(1, 2, 3)) - shift).abs().max() < 0.5


def test_adaptive_with_compaction_keeps_extra_args_rows(x_t):
    """Under compaction the score sees subsets of rows; per-sample extra args must follow them."""
    shift = torch.tensor([0.0, 5.0, -5.0, 2.0, 10.0], dtype=F64)
    got = fk.sample_adaptive(denoiser, x_t, 0.002, 80.0, extra_args={"shift": shift}, disable=True,
                             seed=[0, 1, 2, 3, 4], eps_rel=0.05)  # fmt: skip
    for i in (1, 4):
        alone = fk.sample_adaptive(denoiser, x_t[i : i + 1], 0.002, 80.0, extra_args={"shift": shift[i : i + 1]},
                                   disable=True, seed=[i], eps_rel=0.05)  # fmt: skip
        assert (got[i] - alone[0]).abs().max() < 1e-3
    assert (got.mean(dim=(1, 2, 3)) - shift).abs().max() < 0.5


def test_adaptive_ends_at_sigma_min_without_denoise_by_default(x_t):
    x = fk.sample_adaptive_dpmpp_3m(denoiser, x_t, 0.5, 80.0, disable=True)
    xd = fk.sample_adaptive_dpmpp_3m(denoiser, x_t, 0.5, 80.0, disable=True, denoise=True)
    # at σ = 0.5 the state still carries noise of std 0.5 on top of the data's 0.5
    assert 0.6 < float(x.std()) < 0.8
    assert float(xd.std()) < float(x.std())


def test_callback_gets_k_diffusions_dict(x_t):
    seen = []
    sigmas = karras(6)
    out = fk.sample_dpmpp_2m(denoiser, x_t, sigmas, callback=seen.append, disable=True)
    assert [d["i"] for d in seen] == list(range(6))
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
    assert torch.equal(seen[0]["x"], x_t)
    assert torch.allclose(seen[2]["sigma"], torch.full((5,), float(sigmas[2]), dtype=F64))
    assert torch.equal(seen[-1]["denoised"], out)


def test_every_solver_has_a_function(x_t):
    for name, spec in fastsde.SOLVERS.items():
        if name == "mlem":
            continue
        fn = getattr(fk, f"sample_{name}")
        assert fn.__name__ == f"sample_{name}"
        if spec.nfe_per_step is None:
            out = fn(denoiser, x_t[:2], 0.01, 80.0, disable=True)
        else:
            out = fn(denoiser, x_t[:2], karras(6), disable=True)
        assert out.shape == (2, 3, 4, 4) and torch.isfinite(out).all(), name


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x: fk.sample_euler(denoiser, x, [1.0, 2.0, 0.0]), "strictly decreasing"),
        (lambda x: fk.sample_euler(denoiser, x, [1.0]), "at least two"),
        (lambda x: fk.sample_euler(denoiser, x.flatten(), [2.0, 1.0, 0.0]), "batch"),
        (lambda x: fk.sample_euler(denoiser, x, [2.0, 1.0, 0.0], steps=3), "set by sigmas"),
        (lambda x: fk.sample_euler(denoiser, x, [2.0, 1.0, 0.0], bogus=1), "bogus"),
        (lambda x: fk.sample_euler(denoiser, x, [2.0, 1.0, 0.0], extra_args=[1]), "extra_args"),
        (lambda x: fk.sample_adaptive(denoiser, x, 2.0, 1.0), "sigma_min must be < sigma_max"),
        (lambda x: fk.sample_adaptive(denoiser, x, -1.0, 1.0), "sigma_min"),
    ],
)
def test_bad_input_is_a_clear_error(x_t, call, match):
    with pytest.raises(ValueError, match=match):
        call(x_t)

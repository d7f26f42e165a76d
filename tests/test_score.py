"""Scores: the exact mixture is right at every t, adapters round-trip, the counter counts."""

from __future__ import annotations

import math

import pytest
import torch

import fastsde
from fastsde.problems import mixture_2d

T64 = torch.float64


def test_mixture_score_is_the_gradient_of_its_log_density(process):
    gm = mixture_2d(process)
    x = torch.randn(6, 2, dtype=T64, requires_grad=True)
    for t in (process.default_t_end, 0.1 * process.T, process.T):
        tt = torch.full((6,), t, dtype=T64)
        (grad,) = torch.autograd.grad(gm.log_prob(x, tt).sum(), x)
        torch.testing.assert_close(gm.score(x.detach(), tt), grad)


def test_mixture_density_integrates_to_one_and_matches_one_gaussian():
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)
    # grid quadrature in 2-D at a moderate time
    u = torch.linspace(-3, 3, 301, dtype=T64)
    xx, yy = torch.meshgrid(u, u, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    p = gm.log_prob(pts, torch.full((pts.shape[0],), 0.2, dtype=T64)).exp()
    assert abs(float(p.sum()) * float(u[1] - u[0]) ** 2 - 1) < 1e-4
    # a one-component mixture is a Gaussian with variance m²s² + σ²
    one = fastsde.GaussianMixture([1.0], torch.tensor([[0.3]], dtype=T64), [0.2], sde)
    t = torch.tensor([0.4], dtype=T64)
    m, s = float(sde.mean_coeff(t)), float(sde.marginal_std(t))
    ref = torch.distributions.Normal(m * 0.3, math.sqrt(m * m * 0.04 + s * s)).log_prob(
        torch.tensor([[0.7]], dtype=T64)
    )
    torch.testing.assert_close(one.log_prob(torch.tensor([[0.7]], dtype=T64), t), ref[:, 0])


def test_mixture_sample_matches_its_parameters():
    gm = mixture_2d(fastsde.VESDE())
    x = gm.sample(40000, t=0.0, generator=torch.Generator().manual_seed(0))
    resp = gm.responsibilities(x).argmax(1)
    w, mean, std = gm.marginal_params(0.0)
    for k in range(3):
        assert abs(float((resp == k).double().mean()) - float(w[k])) < 0.01
        torch.testing.assert_close(x[resp == k].mean(0), mean[k], atol=0.01, rtol=0)


def test_noise_prediction_and_denoiser_adapters_round_trip(process):
    gm = mixture_2d(process)
    x = torch.randn(5, 2, dtype=T64)
    t = torch.linspace(0.1, 0.9, 5, dtype=T64) * process.T
    s = gm.score(x, t)
    sigma, m = process.marginal_std(t)[:, None], process.mean_coeff(t)[:, None]
    labels = []

    def eps_model(xx, label):
        labels.append(label)
        return -sigma * gm.score(xx, t)

    adapter = fastsde.NoisePredictionScore(eps_model, process)
    torch.testing.assert_close(adapter(x, t), s)
    expected_label = 999 * t if isinstance(process, (fastsde.VPSDE, fastsde.SubVPSDE)) else process.marginal_std(t)
    torch.testing.assert_close(labels[0], expected_label)

    def denoiser(x_edm, sigma_edm):  # works in x/m, σ/m coordinates and returns x̂0
        torch.testing.assert_close(sigma_edm, (sigma / m)[:, 0])
        xx = x_edm * m
        return (xx + sigma**2 * gm.score(xx, t)) / m

    torch.testing.assert_close(fastsde.DenoiserScore(denoiser, process)(x, t), s)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_diffusers_unet_adapter_round_trips(prediction):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()
    sde = fastsde.VPSDE()
    adapter = fastsde.DiffusersUNetScore(unet, sde, prediction_type=prediction)
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        s = adapter(x, t)
        out = unet(x, 999 * t).sample
    m, sig = sde.mean_coeff(t)[:, None, None, None], sde.marginal_std(t)[:, None, None, None]
    back = {"epsilon": -sig * s, "sample": (x + sig**2 * s) / m, "v_prediction": None}[prediction]
    if back is None:  # ε = m v + σ x  and  ε = −σ s  ⇒  v = (−σ s − σ x)/m
        back = (-sig * s - sig * x) / m
    torch.testing.assert_close(back, out, rtol=1e-4, atol=1e-5)


def test_counting_score_counts_rows_and_checks_output():
    def score(x, t):
        return -x

    c = fastsde.CountingScore(score, 4)
    x = torch.zeros(4, 2)
    c(x, torch.zeros(4))
    c(x[:2], torch.zeros(2), rows=torch.tensor([1, 3]))
    assert c.nfe_per_sample.tolist() == [1, 2, 1, 2] and c.calls == 2 and c.rows_evaluated == 6
    assert c.nfe == 1.5
    with pytest.raises(ValueError, match=r"one time per row of x \(4\), got shape \(3,\)"):
        c(x, torch.zeros(3))
    with pytest.raises(ValueError, match=r"shaped like x \(4, 2\), got \(4, 3\)"):
        fastsde.CountingScore(lambda x, t: torch.zeros(4, 3), 4)(x, torch.zeros(4))


def test_counting_score_names_the_time_of_a_nan():
    def score(x, t):
        return torch.where((t > 0.5)[:, None], torch.nan, 0.0) * torch.ones_like(x)

    c = fastsde.CountingScore(score, 3)
    with pytest.raises(fastsde.NonFiniteScoreError, match=r"t = \[0.75\].*1 of 3 rows"):
        c(torch.zeros(3, 2), torch.tensor([0.1, 0.75, 0.2]))
    out = c(torch.zeros(3, 2), torch.tensor([0.1, 0.75, 0.2]), check_finite=False)
    assert bool(out.isnan().any())


def test_mixture_rejects_bad_parameters():
    with pytest.raises(ValueError, match="weights must be 2 positive numbers"):
        fastsde.GaussianMixture([1.0, -1.0], torch.zeros(2, 1), [1.0, 1.0])
    with pytest.raises(ValueError, match="stds must be positive"):
        fastsde.GaussianMixture([1.0], torch.zeros(1, 2), torch.zeros(1, 2))


def test_mixture_marginal_is_the_pushforward_on_every_process(process):
    """Under x_t = m x0 + σ z, component k at t is N(m μ_k, m² s_k² + σ²) per dimension: log_prob and
    score of a diagonal two-component mixture agree with that closed form at several times."""
    means = torch.tensor([[0.3, -0.5, 0.1], [-0.4, 0.2, 0.6]], dtype=T64)
    stds = torch.tensor([[0.2, 0.1, 0.3], [0.05, 0.4, 0.1]], dtype=T64)
    gm = fastsde.GaussianMixture([0.3, 0.7], means, stds, process)
    x = torch.randn(5, 3, dtype=T64, generator=torch.Generator().manual_seed(0))
    for frac in (0.0, 0.01, 0.5, 1.0):
        tv = process.default_t_end + frac * (process.T - process.default_t_end)
        t = torch.full((5,), tv, dtype=T64)
        m, sig = float(process.mean_coeff(t[:1])), float(process.marginal_std(t[:1]))
        comp = torch.distributions.Normal(m * means, (m * m * stds**2 + sig * sig).sqrt())
        log_comp = comp.log_prob(x[:, None, :]).sum(-1) + torch.log(torch.tensor([0.3, 0.7], dtype=T64))
        torch.testing.assert_close(gm.log_prob(x, t), torch.logsumexp(log_comp, 1))
        resp = torch.softmax(log_comp, 1)[..., None]
        expected_score = (resp * (m * means - x[:, None, :]) / comp.variance).sum(1)
        torch.testing.assert_close(gm.score(x, t), expected_score)


def test_mixture_rejects_samples_of_the_wrong_shape():
    gm = mixture_2d(fastsde.VPSDE())
    with pytest.raises(ValueError, match=r"x must have shape \(n, 2\) for this mixture, got \(4, 3\)"):
        gm.score(torch.zeros(4, 3, dtype=T64), torch.full((4,), 0.5, dtype=T64))
    with pytest.raises(ValueError, match=r"x must have shape \(n, 2\) for this mixture, got \(4, 1, 2\)"):
        gm.log_prob(torch.zeros(4, 1, 2, dtype=T64), 0.5)


def test_deferred_finite_checks_raise_the_same_error_later():
    """defer_finite keeps the NaN/Inf check on the device (no synchronisation per evaluation) and
    raises the immediate check's error at flush, or every FLUSH_EVERY evaluations."""
    import fastsde.score as score_mod

    def nan_above_half(x, t):
        return torch.where((t > 0.5)[:, None], torch.full_like(x, float("nan")), -x)

    x = torch.zeros(3, 2)
    counted = score_mod.CountingScore(nan_above_half, 3, defer_finite=True)
    counted(x, torch.full((3,), 0.2))
    counted(x, torch.tensor([0.2, 0.7, 0.9]))  # not raised yet
    counted(x, torch.full((3,), 0.3))
    with pytest.raises(score_mod.NonFiniteScoreError, match=r"t = \[0\.69\d*, 0\.89\d*\] \(2 of 3 rows\)"):
        counted.flush()
    counted.flush()  # cleared: nothing left to raise
    assert counted.calls == 3
    eager = score_mod.CountingScore(nan_above_half, 3)
    with pytest.raises(score_mod.NonFiniteScoreError, match=r"\(2 of 3 rows\)"):
        eager(x, torch.tensor([0.2, 0.7, 0.9]))
    many = score_mod.CountingScore(nan_above_half, 3, defer_finite=True)
    with pytest.raises(score_mod.NonFiniteScoreError):
        for _ in range(score_mod.CountingScore.FLUSH_EVERY):
            many(x, torch.full((3,), 0.8))


def test_front_door_defers_on_accelerators_and_still_raises(monkeypatch):
    import fastsde.api

    sde = fastsde.VPSDE()
    gm = fastsde.problems.mixture_2d(sde)
    plain = fastsde.sample(gm, sde, (4, 2), solver="ddim", steps=6, seed=0)
    monkeypatch.setattr(fastsde.api, "defer_finite_checks", lambda device: True)
    deferred = fastsde.sample(gm, sde, (4, 2), solver="ddim", steps=6, seed=0)
    assert torch.equal(plain.samples, deferred.samples)

    def broken(x, t):
        out = gm(x, t)
        return torch.where(((t > 0.4) & (t < 0.6))[:, None], torch.full_like(out, float("nan")), out)

    with pytest.raises(fastsde.NonFiniteScoreError, match="NaN or Inf at t ="):
        fastsde.sample(broken, sde, (4, 2), solver="ddim", steps=11, seed=0)
    monkeypatch.undo()
    assert fastsde.api.defer_finite_checks("cuda:0") and not fastsde.api.defer_finite_checks("cpu")

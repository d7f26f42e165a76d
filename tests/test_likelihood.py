"""Likelihood through the PF-ODE: exact-trace log-density against the closed-form mixture density,
unbiased Hutchinson estimates, prior log-density, bits/dim, dequantisation, errors."""

from __future__ import annotations

import math

import pytest
import torch

import fastsde
from fastsde.likelihood.pf_ode import bpd_offset, default_likelihood_t_end, dequantize
from fastsde.problems import mixture_2d, mixture_nd
from fastsde.solvers.ode import IntegrationError

F64 = torch.float64


def _data(gm: fastsde.GaussianMixture, n: int, t: float, seed: int = 0) -> torch.Tensor:
    return gm.sample(n, t=t, generator=torch.Generator().manual_seed(seed))


def test_exact_trace_matches_closed_form_density(process):
    """log p at the likelihood's t_end within 0.01 nats per dimension, under every process."""
    gm = mixture_2d(process)
    t_end = default_likelihood_t_end(process)
    x = _data(gm, 48, t_end)
    out = fastsde.log_likelihood(gm, process, x, trace="exact")
    true = gm.log_prob(x, t_end)
    per_dim = (out.logp - true).abs() / 2
    assert float(per_dim.max()) < 0.01, per_dim.max()
    assert out.logp.shape == (48,) and out.logp.dtype == F64
    torch.testing.assert_close(out.logp, out.prior_logp + out.delta_logp)
    torch.testing.assert_close(out.prior_logp, process.prior_logp(out.z))
    # accounting: per-sample RK45 evaluations, 2 + 6 per attempted step
    steps = (out.stats["accepted"] + out.stats["rejected"]).to(F64)
    torch.testing.assert_close(out.nfe_per_sample, 2 + 6 * steps)
    assert out.calls == 2 + 6 * int(steps.max())
    assert bool(out.finished.all())


def test_exact_trace_higher_dimension_and_scipy_reference():
    """An 8-D mixture under sub-VP; scipy's batched RK45 (the reference procedure) gives the same
    value, and per-sample steps cost fewer NFE."""
    sde = fastsde.SubVPSDE()
    gm = mixture_nd(sde, dim=8, modes=3, seed=1)
    t_end = 1e-5
    x = _data(gm, 16, t_end, seed=2)
    ours = fastsde.log_likelihood(gm, sde, x)
    ref = fastsde.log_likelihood(gm, sde, x, method="scipy")
    true = gm.log_prob(x, t_end)
    assert float(((ours.logp - true).abs() / 8).max()) < 0.01
    assert float(((ours.logp - ref.logp).abs() / 8).max()) < 1e-3
    assert ours.nfe <= ref.nfe
    assert torch.all(ref.nfe_per_sample == ref.stats["nfev"])


def test_batch_independence():
    """Sample i gets the same log-density alone or in a batch (per-sample steps, keyed probes)."""
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)
    x = _data(gm, 12, 1e-5, seed=3)
    for trace in ("exact", "hutchinson"):
        batch = fastsde.log_likelihood(gm, sde, x, trace=trace, seed=7)
        seeds = fastsde.NoiseSource.from_seed(7, 12).subset([5])
        alone = fastsde.log_likelihood(gm, sde, x[5:6], trace=trace, seed=seeds)
        torch.testing.assert_close(alone.logp[0], batch.logp[5], rtol=0, atol=1e-12)
        assert float(alone.nfe_per_sample[0]) == float(batch.nfe_per_sample[5])


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(probe):
    """Over many probe draws (one per row, fixed for the solve) the mean estimate matches the
    exact trace within its standard error; averaging 4 probes cuts the variance."""
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)
    point = torch.tensor([[0.1, 0.05]], dtype=F64)  # between modes: a curved field
    exact = fastsde.log_likelihood(gm, sde, point).logp[0]
    n = 300
    x = point.expand(n, 2).clone()
    est = fastsde.log_likelihood(gm, sde, x, trace="hutchinson", probe=probe, seed=11).logp
    se = est.std() / math.sqrt(n)
    assert float(est.std()) > 1e-3  # the estimates do vary with the probe
    assert abs(float(est.mean() - exact)) < 4 * float(se) + 1e-4
    est4 = fastsde.log_likelihood(gm, sde, x[:100], trace="hutchinson", probe=probe, probes=4, seed=12).logp
    assert float(est4.var()) < 0.6 * float(est[:100].var())
    assert abs(float(est4.mean() - exact)) < 4 * float(est4.std() / 10) + 1e-4


def _quadratic_score(a: torch.Tensor):
    """score(x, t) = −A x: under VP the PF-ODE drift is −½β(t)(I − A)x, whose Jacobian does not
    depend on x, so with probe v fixed for the whole solve ℓ(T) = −½·∫β dt · vᵀ(I − A)v exactly."""

    def score(x, t):
        return -x @ a

    return score


@pytest.mark.parametrize("probes", [1, 2])
def test_hutchinson_probe_is_fixed_for_the_solve_and_averaged(probes):
    """Each sample's Δlog p is −½∫β dt times vᵀMv for one Rademacher probe v (or the mean over
    ``probes`` of them): a probe redrawn at each evaluation would mix many v along the solve."""
    import itertools

    sde = fastsde.VPSDE()
    a = torch.tensor([[0.5, 0.2, 0.1], [0.2, 0.3, -0.15], [0.1, -0.15, 0.4]], dtype=F64)
    m = torch.eye(3, dtype=F64) - a
    t_end = default_likelihood_t_end(sde)
    beta_int = sde.beta_min * (1 - t_end) + 0.5 * (sde.beta_max - sde.beta_min) * (1 - t_end**2)
    x = torch.randn(24, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    out = fastsde.log_likelihood(_quadratic_score(a), sde, x, trace="hutchinson", probes=probes, seed=5)
    q = out.delta_logp / (-0.5 * beta_int)
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=3)), dtype=F64)
    forms = torch.einsum("ki,ij,kj->k", signs, m, signs)  # vᵀMv for every Rademacher v
    if probes == 2:
        forms = (forms[:, None] + forms[None, :]).flatten() / 2
    gap = (q[:, None] - forms[None, :]).abs().min(dim=1).values
    assert float(gap.max()) < 1e-6, gap
    assert len({round(float(v), 6) for v in q}) > 1  # probes differ between samples
    exact = fastsde.log_likelihood(_quadratic_score(a), sde, x, trace="exact")
    torch.testing.assert_close(exact.delta_logp / (-0.5 * beta_int), torch.full_like(q, float(torch.trace(m))))


def test_hutchinson_probes_are_keyed():
    sde = fastsde.VESDE()
    gm = mixture_2d(sde)
    x = _data(gm, 6, 1e-5)
    a = fastsde.log_likelihood(gm, sde, x, trace="hutchinson", seed=1)
    b = fastsde.log_likelihood(gm, sde, x, trace="hutchinson", seed=1)
    c = fastsde.log_likelihood(gm, sde, x, trace="hutchinson", seed=2)
    assert torch.equal(a.logp, b.logp)
    assert not torch.equal(a.logp, c.logp)
    fresh = fastsde.log_likelihood(gm, sde, x, trace="hutchinson", seed=1, pass_index=1)
    assert not torch.equal(a.logp, fresh.logp)


def test_prior_logp_closed_form():
    for sde in (fastsde.VPSDE(), fastsde.SubVPSDE(), fastsde.VESDE(sigma_max=50.0), fastsde.EDM(sigma_max=80.0)):
        z = torch.randn(5, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
        ref = torch.distributions.Normal(0.0, sde.prior_std).log_prob(z).sum(dim=(1, 2))
        torch.testing.assert_close(sde.prior_logp(z), ref)


def test_bits_per_dim():
    d = 64
    # a density uniform on [-1, 1]^D (log p = −D ln 2) is exactly 8 bits per 8-bit level
    assert fastsde.bits_per_dim(torch.tensor(-d * math.log(2.0)), d, offset=7.0).item() == pytest.approx(8.0)
    # uniform on [0, 1]^D: log p = 0 → 8 bits with offset 8
    assert fastsde.bits_per_dim(0.0, (1, 8, 8), offset=8.0) == pytest.approx(8.0)
    logp = torch.tensor([-100.0, 50.0], dtype=F64)
    torch.testing.assert_close(fastsde.bits_per_dim(logp, (2, 3)), -logp / (6 * math.log(2)) + 7.0)
    res = fastsde.LikelihoodResult(
        logp=logp, prior_logp=logp, delta_logp=0 * logp, nfe=0.0, nfe_per_sample=logp, calls=0,
        z=torch.zeros(2, 2, 3), finished=torch.ones(2, dtype=torch.bool), wall_time=0.0,
    )  # fmt: skip
    torch.testing.assert_close(res.bits_per_dim(), -logp / (6 * math.log(2)) + 7.0)
    with pytest.raises(ValueError, match="dims"):
        fastsde.bits_per_dim(logp, 0)
    with pytest.raises(ValueError, match="offset"):
        fastsde.bits_per_dim(logp, 4, offset=float("nan"))


def test_dequantize():
    levels = torch.randint(0, 256, (7, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x = dequantize(levels, seed=3, dtype=F64)
    assert x.shape == levels.shape and float(x.min()) >= -1.0 and float(x.max()) < 1.0
    assert torch.equal(torch.floor((x + 1) / 2 * 256).to(torch.uint8), levels)  # stays within its level
    x01 = dequantize(levels, seed=3, scale="[0,1]", dtype=F64)
    assert torch.equal(torch.floor(x01 * 256).to(torch.uint8), levels)
    torch.testing.assert_close(2 * x01 - 1, x)
    # keyed: row i does not depend on the batch; a new pass draws new noise
    part = dequantize(levels[2:4], seed=fastsde.NoiseSource.from_seed(3, 7).subset([2, 3]), dtype=F64)
    assert torch.equal(part, x[2:4])
    assert not torch.equal(dequantize(levels, seed=3, pass_index=1, dtype=F64), x)
    u = (x01 * 256 - levels.to(F64)).flatten()
    assert abs(float(u.mean()) - 0.5) < 0.1
    # 17 levels (the digits' 0..16): each level's cell has width 2/17 on [-1, 1]
    d17 = dequantize(torch.tensor([[0, 16, 8]]), levels=17, dtype=F64)
    assert torch.equal(torch.floor((d17 + 1) / 2 * 17).long(), torch.tensor([[0, 16, 8]]))
    assert bpd_offset() == 7.0 and bpd_offset(256, "[0,1]") == 8.0
    assert bpd_offset(17) == pytest.approx(math.log2(17) - 1)
    with pytest.raises(ValueError, match="0..16"):
        dequantize(torch.tensor([[0, 17]]), levels=17)
    with pytest.raises(ValueError, match="0..255"):
        dequantize(torch.tensor([[0, 256]]))
    with pytest.raises(ValueError, match="scale"):
        dequantize(levels, scale="[-2,2]")
    with pytest.raises(ValueError, match="integer levels"):
        dequantize(torch.tensor([[0.5, 1.0]]))


def test_budget_error_and_partial():
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)
    x = _data(gm, 4, 1e-5)
    with pytest.raises(IntegrationError, match="4 of 4 samples did not reach"):
        fastsde.log_likelihood(gm, sde, x, max_steps=2)
    out = fastsde.log_likelihood(gm, sde, x, max_steps=2, allow_partial=True)
    assert torch.isnan(out.logp).all() and not bool(out.finished.any())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=torch.zeros(3)), "shape"),
        (dict(x=torch.tensor([[0.0, float("nan")]])), "finite"),
        (dict(x=torch.zeros(2, 2, dtype=torch.int64)), "floating"),
        (dict(trace="approx"), "trace must be one of"),
        (dict(trace="hutchinson", probe="uniform"), "probe must be one of"),
        (dict(probes=0), "probes"),
        (dict(rtol=0.0), "rtol"),
        (dict(atol=float("inf")), "atol"),
        (dict(t_end=2.0), "t_end"),
        (dict(t_end=1.0), "t_end"),
        (dict(method="dopri"), "method"),
        (dict(max_steps=0), "max_steps"),
        (dict(seed=[1, 2, 3]), "one seed per sample"),
        (dict(pass_index=-1), "pass_index"),
    ],
)
def test_bad_input_fails_before_compute(kwargs, match):
    sde = fastsde.VPSDE()
    calls = []

    def score(x, t):
        calls.append(1)
        return -x

    args = dict(x=torch.zeros(2, 2, dtype=F64))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fastsde.log_likelihood(score, sde, **args)
    assert not calls


def test_non_differentiable_score_is_a_clear_error():
    sde = fastsde.VESDE()

    def detached(x, t):
        return (-x).detach()

    with pytest.raises(ValueError, match="not differentiable"):
        fastsde.log_likelihood(detached, sde, torch.zeros(2, 2))


# ---------------------------------------------------------------------------------------------
# fastsde likelihood (command line)
# ---------------------------------------------------------------------------------------------


def _cli(argv):
    from fastsde.cli import main

    return main(["likelihood", *argv])


def test_cli_reports_bits_per_dim(tmp_path, capsys):
    import numpy as np

    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)
    x = _data(gm, 40, 1e-5, seed=4).clamp(-1, 1)
    np.save(tmp_path / "x.npy", x.numpy())
    np.savez(tmp_path / "x.npz", test=((x.numpy() + 1) / 2 * 255).round().astype(np.uint8), other=np.zeros(3))
    assert _cli(["--data", str(tmp_path / "x.npy"), "--model", "mixture2d-vp", "--no-progress"]) == 0
    out = capsys.readouterr().out
    bpd = float(out.split("bits/dim: ")[1].split()[0])
    # continuous data used as given: no dequantisation offset (issue 21; it was 7, the 8-bit one)
    expected = fastsde.bits_per_dim(gm.log_prob(x.to(F64), 1e-5), 2, 0.0).mean()
    assert "(offset 0)" in out
    assert abs(bpd - float(expected)) < 2e-3
    assert "NFE:" in out and "time:" in out
    # 8-bit integer levels are dequantised; the .npz key is found by name
    assert _cli(["--data", str(tmp_path / "x.npz"), "--model", "mixture2d-vp", "--no-progress", "--n", "8"]) == 0
    assert "dequantised 256 levels" in capsys.readouterr().out
    argv = ["--data", str(tmp_path / "x.npz"), "--model", "mixture2d-ve", "--no-progress", "--passes", "2"]
    assert _cli([*argv, "--trace", "hutchinson", "--n", "8"]) == 0
    assert "bits/dim per pass:" in capsys.readouterr().out


def test_cli_shows_tqdm_progress(tmp_path, capsys):
    """Without --no-progress a tqdm bar counts samples on stderr (with the running bits/dim)."""
    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros((6, 2)))
    assert _cli(["--data", str(tmp_path / "x.npy"), "--model", "mixture2d-vp", "--batch-size", "4"]) == 0
    err = capsys.readouterr().err
    assert "likelihood" in err and "6/6" in err and "bpd=" in err and "100%" in err


def test_cli_float_data_on_a_level_grid_is_dequantised(tmp_path, capsys):
    """Quantised data stored as floats (the digits' 17 levels scaled to [-1, 1]) is found to sit on a
    grid and dequantised exactly as the same integer levels would be."""
    import numpy as np

    ints = np.random.default_rng(0).integers(0, 17, size=(20, 2))
    np.save(tmp_path / "f.npy", ints / 8.0 - 1.0)
    np.save(tmp_path / "i.npy", ints)
    base = ["--model", "mixture2d-vp", "--no-progress"]
    assert _cli(["--data", str(tmp_path / "f.npy"), *base]) == 0
    out_f = capsys.readouterr().out
    assert "grid of 17 levels" in out_f and f"(offset {math.log2(17) - 1:.4g})" in out_f
    assert _cli(["--data", str(tmp_path / "i.npy"), "--levels", "17", *base]) == 0
    out_i = capsys.readouterr().out
    assert out_f.split("bits/dim: ")[1].split()[0] == out_i.split("bits/dim: ")[1].split()[0]


@pytest.mark.parametrize(
    "array, extra, match",
    [
        ("wide", [], "does not match the model's sample shape"),
        ("big", [], "must lie in the model's range"),
        ("levels", ["--levels", "16"], "levels 0..15"),
        ("nan", [], "NaN"),
        (None, ["--rtol", "0"], "--rtol must be a positive"),
        ("offgrid", ["--levels", "17"], "grid of 17 levels"),
        (None, ["--max-steps", "2"], "4 of 4 samples did not reach the end time"),
    ],
)
def test_cli_bad_data_is_one_line_exit_2(tmp_path, capsys, array, extra, match):
    import numpy as np

    arrays = {
        "wide": np.zeros((4, 3)),
        "big": np.full((4, 2), 3.0),
        "levels": np.full((4, 2), 20, dtype=np.uint8),
        "nan": np.array([[0.0, np.nan]]),
        "offgrid": np.array([[0.013, 0.5]]),
        None: np.zeros((4, 2)),
    }
    np.save(tmp_path / "d.npy", arrays[array])
    rc = _cli(["--data", str(tmp_path / "d.npy"), "--model", "mixture2d-ve", "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and match in err, err


def test_cli_shipped_model_and_heldout_digits(monkeypatch, capsys):
    """Without --data, a model name goes through fastsde.load_model and the held-out digits split
    (17 levels stored as floats) is dequantised; a stand-in model keeps this fast and training-free."""
    data = pytest.importorskip("fastsde.data")
    if not hasattr(data, "load_digits"):
        pytest.skip("no held-out digits split in this build")
    from types import SimpleNamespace

    sde = fastsde.VPSDE()
    gm = fastsde.GaussianMixture([1.0], torch.zeros(1, 1, 8, 8), [0.5], sde)
    seen = []

    def fake_load(name):
        seen.append(name)
        return SimpleNamespace(score=gm, sde=sde, shape=(1, 8, 8))

    monkeypatch.setattr(fastsde, "load_model", fake_load, raising=False)
    assert _cli(["--n", "4", "--no-progress", "--rtol", "1e-3", "--atol", "1e-3"]) == 0
    out = capsys.readouterr().out
    assert seen == ["digits"]
    assert "held-out split of digits" in out and "grid of 17 levels" in out and "trace: hutchinson" in out


@pytest.mark.parametrize("name", ["digits-small", "digits-flow", "digits-cond"])
def test_shipped_model_score_made_differentiable(name):
    """Shipped models score under no_grad (for sampling); differentiable_score gives the same score
    with autograd (noise-prediction, flow and class-conditional models alike) and checks it against
    model.score."""
    if not hasattr(fastsde, "list_models") or name not in fastsde.list_models():
        pytest.skip(f"no shipped {name} model in this build")
    model = fastsde.load_model(name)
    score = fastsde.differentiable_score(model)
    x = torch.randn(3, *model.shape, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    t = torch.tensor([0.01, 0.3, 0.9])
    out = score(x, t)
    assert out.requires_grad
    torch.testing.assert_close(out.detach(), model.score(x.detach(), t), rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(g).all() and float(g.abs().sum()) > 0


def test_flow_model_likelihood_from_the_command_line(capsys):
    """fastsde likelihood runs on a flow model (its score with autograd on is the model's own adapter)."""
    from fastsde.cli import main

    assert main(["likelihood", "--model", "digits-flow", "--n", "2", "--no-progress", "--rtol", "1e-3"]) == 0
    out = capsys.readouterr().out
    assert "bits/dim" in out and "RectifiedFlow" in out

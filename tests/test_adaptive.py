"""Gotta Go Fast (``adaptive``) and the adaptive SDE-DPM-Solver++ (``adaptive_sde_dpm``) on exact
float64 mixtures: distribution, accounting, controller semantics, ablation switches, robustness."""

from __future__ import annotations

import math

import pytest
import torch

import fastsde
from fastsde.noise import NoiseSource, Stream
from fastsde.problems import mixture_2d, mixture_nd
from fastsde.solvers.adaptive import BrownianMemory, BrownianTree
from fastsde.solvers.core.context import SolverContext
from fastsde.solvers.core.driver import BudgetError

F64 = torch.float64


def check_marginal(gm, x: torch.Tensor, bias: float = 0.04, z: float = 4.5) -> None:
    """Per-mode weights, means and stds against the exact t = 0 mixture.

    Tolerances: z standard errors of the finite-sample estimate plus an allowance ``bias`` (in
    units of the component std for means, relative for stds, absolute for weights / 2)."""
    w, mu, sd = gm.marginal_params(0.0)
    n = x.shape[0]
    x = x.reshape(n, -1)
    mu, sd = mu.reshape(len(w), -1), sd.reshape(len(w), -1)
    assign = gm.responsibilities(x.reshape(n, *gm.dims), 0.0).argmax(1)
    for k in range(len(w)):
        xk = x[assign == k]
        nk = xk.shape[0]
        wk = nk / n
        assert abs(wk - float(w[k])) <= z * math.sqrt(float(w[k] * (1 - w[k])) / n) + bias / 2, (k, wk, float(w[k]))
        m_err = ((xk.mean(0) - mu[k]) / sd[k]).abs().max()
        assert m_err <= z / math.sqrt(nk) + bias, (k, float(m_err))
        # mean relative std error over dimensions (its standard error shrinks with the dimension)
        rel = (xk.std(0) / sd[k] - 1).mean()
        assert abs(rel) <= z / math.sqrt(2 * nk * x.shape[1]) + bias, (k, float(rel))


PROCS = {
    "vp": fastsde.VPSDE,
    "subvp": fastsde.SubVPSDE,
    "ve": fastsde.VESDE,
    "edm": fastsde.EDM,
}


# ---------------------------------------------------------------------------------------------
# Distribution
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("proc", list(PROCS))
def test_ggf_matches_exact_marginal(proc):
    sde = PROCS[proc]()
    gm = mixture_nd(sde, dim=16)
    res = fastsde.sample(gm, sde, (600, 16), solver="adaptive", seed=1, dtype=F64)
    assert torch.isfinite(res.samples).all()
    check_marginal(gm, res.samples)


@pytest.mark.parametrize("proc", list(PROCS))
def test_sde_dpm_matches_exact_marginal_2d(proc):
    sde = PROCS[proc]()
    gm = mixture_2d(sde)
    res = fastsde.sample(gm, sde, (1000, 2), solver="adaptive_sde_dpm", seed=2, dtype=F64)
    check_marginal(gm, res.samples, bias=0.08)


def test_ggf_brownian_tree_removes_the_2d_rejection_bias():
    """In 2-D, fresh noise after a rejection favours small draws (stds shrink or grow); the
    Brownian tree keeps the path, and the marginal is right."""
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)
    res = fastsde.sample(gm, sde, (800, 2), solver="adaptive", seed=3, dtype=F64, brownian="tree", eps_rel=0.02)
    check_marginal(gm, res.samples)


def test_sde_dpm_needs_fewer_nfe_than_ggf():
    sde = fastsde.VPSDE()
    gm = mixture_nd(sde, dim=16)
    ggf = fastsde.sample(gm, sde, (200, 16), solver="adaptive", seed=0, dtype=F64)
    dpm = fastsde.sample(gm, sde, (200, 16), solver="adaptive_sde_dpm", seed=0, dtype=F64)
    assert dpm.nfe < 0.4 * ggf.nfe, (dpm.nfe, ggf.nfe)


# ---------------------------------------------------------------------------------------------
# Accounting and controller
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["adaptive", "adaptive_sde_dpm"])
def test_nfe_accounting_and_per_sample_counts(solver):
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)
    res = fastsde.sample(gm, sde, (40, 2), solver=solver, seed=0, dtype=F64)
    acc, rej, reused = res.stats["accepted"], res.stats["rejected"], res.stats["reused_evaluations"]
    assert torch.equal(res.nfe_per_sample, (2 * (acc + rej) - reused + 1).to(F64))
    assert bool((reused == (rej if solver == "adaptive_sde_dpm" else 0)).all())  # GGF: 2 per attempt
    assert res.nfe == pytest.approx(float(res.nfe_per_sample.mean()))
    assert res.nfe_per_sample.unique().numel() > 5  # samples of different difficulty
    assert res.stats["status"] == ["done"] * 40
    assert torch.equal(res.stats["t_final"], torch.full((40,), 1e-3, dtype=F64))
    assert res.stats["rows_evaluated"] == int(res.nfe_per_sample.sum())  # compaction


@pytest.mark.parametrize("solver", ["adaptive", "adaptive_sde_dpm"])
def test_reusing_the_score_after_a_rejection_changes_nothing_but_nfe(solver):
    sde = fastsde.VESDE()
    gm = mixture_2d(sde)
    on = fastsde.sample(gm, sde, (12, 2), solver=solver, seed=1, dtype=F64, reuse_rejected=True)
    off = fastsde.sample(gm, sde, (12, 2), solver=solver, seed=1, dtype=F64, reuse_rejected=False)
    assert torch.allclose(on.samples, off.samples, rtol=0, atol=1e-12)
    assert torch.equal(on.nfe_per_sample, off.nfe_per_sample - on.stats["rejected"].to(F64))
    assert on.stats["rows_evaluated"] == int(on.nfe_per_sample.sum())


def test_tightening_eps_rel_raises_nfe():
    sde = fastsde.VPSDE()
    gm = mixture_nd(sde, dim=16)
    nfe = [
        fastsde.sample(gm, sde, (30, 16), solver="adaptive", seed=0, dtype=F64, eps_rel=e).nfe
        for e in (0.1, 0.02, 0.005)
    ]
    assert nfe[0] < nfe[1] < nfe[2], nfe


def test_rejection_path_large_h_init():
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)
    first = []
    res = fastsde.sample(
        gm,
        sde,
        (20, 2),
        solver="adaptive",
        seed=0,
        dtype=F64,
        h_init=0.5,
        callback=lambda info: first.append(info.accepted.clone()) if info.step == 0 else None,
    )
    assert not bool(first[0].any())  # a half-interval first step is rejected everywhere
    assert bool((res.stats["rejected"] > 0).all())
    assert res.stats["status"] == ["done"] * 20


def test_compaction_rows_and_identical_results():
    sde = fastsde.VESDE()
    gm = mixture_2d(sde)
    on = fastsde.sample(gm, sde, (16, 2), solver="adaptive", seed=4, dtype=F64)
    off = fastsde.sample(gm, sde, (16, 2), solver="adaptive", seed=4, dtype=F64, compact=False)
    assert torch.allclose(on.samples, off.samples, rtol=0, atol=1e-12)
    assert torch.equal(on.nfe_per_sample, off.nfe_per_sample)
    total = int(on.nfe_per_sample.sum())
    assert on.stats["rows_evaluated"] == total
    assert off.stats["rows_evaluated"] > total
    assert off.stats["rows_evaluated"] == 16 * (2 * off.stats["iterations"] + 1)
    assert on.calls == off.calls


def test_determinism_and_batch_size_independence():
    sde = fastsde.SubVPSDE()
    gm = mixture_2d(sde)
    for solver in ("adaptive", "adaptive_sde_dpm", "adaptive_sde_dpm_2m"):
        a = fastsde.sample(gm, sde, (4, 2), solver=solver, seed=7, dtype=F64, eps_rel=0.05)
        b = fastsde.sample(gm, sde, (4, 2), solver=solver, seed=7, dtype=F64, eps_rel=0.05)
        big = fastsde.sample(gm, sde, (9, 2), solver=solver, seed=7, dtype=F64, eps_rel=0.05)
        assert torch.equal(a.samples, b.samples)
        assert torch.allclose(a.samples, big.samples[:4], rtol=0, atol=1e-12)
        assert torch.equal(a.nfe_per_sample, big.nfe_per_sample[:4])


def test_no_sample_passes_t_end_and_last_step_lands_on_it():
    for sde in (fastsde.VPSDE(), fastsde.EDM()):
        gm = mixture_2d(sde)
        t_end = sde.default_t_end
        seen = []
        res = fastsde.sample(
            gm,
            sde,
            (10, 2),
            solver="adaptive",
            seed=0,
            dtype=F64,
            callback=lambda i, seen=seen: seen.append(i.t.min().item()),
        )
        assert min(seen) >= t_end
        assert torch.equal(res.stats["t_final"], torch.full((10,), t_end, dtype=F64))


# ---------------------------------------------------------------------------------------------
# Exact update of one step (single sample, fresh noise keyed by the attempt)
# ---------------------------------------------------------------------------------------------


def _trace(sde, gm, **opts):
    x0 = torch.tensor([[0.3, -0.2]], dtype=F64) * sde.prior_std
    steps = []
    fastsde.sample(
        gm,
        sde,
        (1, 2),
        solver="adaptive",
        seed=11,
        dtype=F64,
        x_init=x0,
        denoise=False,
        callback=lambda i: steps.append((i.step, i.t.clone(), i.h.clone(), i.x.clone(), bool(i.accepted[0]))),
        **opts,
    )
    noise = NoiseSource.from_seed(11, 1)
    return x0, steps, noise


@pytest.mark.parametrize(
    "variant", [dict(), dict(extrapolate=False), dict(improved_euler=False)], ids=["heun", "em", "lamba"]
)
def test_accepted_step_is_the_specified_update(variant):
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)
    x0, steps, noise = _trace(sde, gm, **variant)
    x, t_prev = x0, torch.tensor([1.0], dtype=F64)
    checked = 0
    for step, t, h, x_after, ok in steps:
        if ok:
            tn = t_prev - h
            z = noise.normal((2,), Stream.STEP, 4 * step, dtype=F64)
            dw = h.sqrt()[:, None] * z
            b1 = sde.reverse_drift(x, t_prev, gm(x, t_prev))
            n1 = sde.diffusion(t_prev)[:, None] * dw
            if variant.get("improved_euler", True):
                x1 = x - h[:, None] * b1 + n1
                b2 = sde.reverse_drift(x1, tn, gm(x1, tn))
                heun = x + 0.5 * ((x1 - x) + (-h[:, None] * b2 + sde.diffusion(tn)[:, None] * dw))
                want = heun if variant.get("extrapolate", True) else x1
            else:
                xd = x - h[:, None] * b1
                b2 = sde.reverse_drift(xd, tn, gm(xd, tn))
                want = x - 0.5 * h[:, None] * (b1 + b2) + n1
            assert torch.allclose(x_after, want, rtol=1e-12, atol=1e-12), (step, x_after, want)
            assert torch.allclose(t, tn)
            checked += 1
            x, t_prev = x_after, t
        else:
            assert torch.equal(x_after, x) and torch.equal(t, t_prev)
    assert checked > 20


def test_ablation_switches_change_behaviour():
    sde = fastsde.VPSDE()
    gm = mixture_nd(sde, dim=16)

    def nfe(**o):
        return fastsde.sample(gm, sde, (20, 16), solver="adaptive", seed=5, dtype=F64, **o).nfe

    base = nfe()
    assert nfe(norm="linf") > base  # max ≥ RMS: a stricter test
    assert nfe(norm="l2") > base  # no 1/n: √16 times larger errors
    for o in (dict(use_prev=False), dict(use_prev="x"), dict(safety=0.8), dict(exponent=0.5), dict(h_init=0.1)):
        assert nfe(**o) != base, o
    loose = nfe(eps_abs=0.05)
    assert loose < base


def test_corrector_costs_one_nfe_per_accepted_step():
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)
    res = fastsde.sample(gm, sde, (10, 2), solver="adaptive", seed=0, dtype=F64, corrector_steps=1)
    acc, rej = res.stats["accepted"], res.stats["rejected"]
    assert torch.equal(res.nfe_per_sample, (2 * (acc + rej) + acc + 1).to(F64))
    assert torch.isfinite(res.samples).all()


# ---------------------------------------------------------------------------------------------
# Robustness and errors
# ---------------------------------------------------------------------------------------------


def test_nan_region_is_rejected_and_run_finishes():
    """Proposals that stray into a region where the score is NaN are rejected and retried."""
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)

    def score(x, t):
        s = gm(x, t)
        bad = x.abs().amax(dim=1) > 2.5
        return torch.where(bad[:, None], torch.full_like(s, float("nan")), s)

    res = fastsde.sample(score, sde, (30, 2), solver="adaptive", seed=0, dtype=F64, h_init=1.0, max_nfe=3000)
    assert torch.isfinite(res.samples).all()
    assert int(res.stats["nonfinite_rejections"].sum()) > 0
    assert res.stats["status"] == ["done"] * 30


@pytest.mark.parametrize("solver", ["adaptive", "adaptive_sde_dpm", "adaptive_sde_dpm_2m"])
def test_transient_nan_is_rejected_and_run_finishes(solver):
    """Every 7th call returns NaN for all rows: those attempts are rejected, h shrinks, the run
    finishes with finite samples. (With the Brownian tree, a path that itself crosses a NaN
    region cannot finish; the budget then ends the run with BudgetError.)"""
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)
    calls = [0]

    def score(x, t):
        calls[0] += 1
        s = gm(x, t)
        return torch.full_like(s, float("nan")) if calls[0] % 7 == 0 else s

    res = fastsde.sample(score, sde, (8, 2), solver=solver, seed=0, dtype=F64, max_nfe=3000, denoise=False)
    assert torch.isfinite(res.samples).all()
    assert int(res.stats["nonfinite_rejections"].sum()) > 8
    assert res.stats["status"] == ["done"] * 8


def test_budget_error_and_partial_results():
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)
    with pytest.raises(BudgetError, match=r"^5 of 5 samples did not reach t_end = 0.001 within max_nfe = 20"):
        fastsde.sample(gm, sde, (5, 2), solver="adaptive", seed=0, dtype=F64, max_nfe=20)
    res = fastsde.sample(gm, sde, (5, 2), solver="adaptive", seed=0, dtype=F64, max_nfe=20, on_budget="partial")
    assert res.stats["status"] == ["budget"] * 5
    assert bool((res.stats["nfe_solver_per_sample"] <= 20).all())
    assert bool((res.stats["t_final"] > 1e-3).all())


@pytest.mark.parametrize("solver", ["adaptive", "adaptive_sde_dpm"])
def test_pi_control_halves_rejections_without_changing_the_law(solver):
    """PI control damps the step growth that follows a large accepted error, so fewer attempts are
    rejected (measured on the 16-D VP mixture at n = 10 000: 7.8 → 3.8 per sample for
    adaptive_sde_dpm at eps_rel 0.035), and the samples still have the right law."""
    sde = fastsde.VPSDE()
    gm = mixture_nd(sde, dim=16)

    def run(beta: float):
        return fastsde.sample(
            gm, sde, (600, 16), solver=solver, seed=3, dtype=F64, eps_rel=0.035, eps_abs=0.027, pi_beta=beta
        )

    plain, pi = run(0.0), run(0.35)
    rej_plain = plain.stats["rejected"].double().mean()
    rej_pi = pi.stats["rejected"].double().mean()
    assert rej_pi < 0.7 * rej_plain, (float(rej_pi), float(rej_plain))
    check_marginal(gm, pi.samples)


@pytest.mark.parametrize(
    "bad",
    [
        dict(eps_rel=0),
        dict(eps_abs=-1.0),
        dict(safety=1.5),
        dict(norm="l1"),
        dict(use_prev="y"),
        dict(max_nfe=1),
        dict(brownian="bridge"),
        dict(max_growth=1.0),
        dict(pi_beta=-0.1),
        dict(pi_beta=math.nan),
        dict(improved_euler=1),
    ],
)
def test_bad_options_fail_before_compute(bad):
    calls = []

    def score(x, t):
        calls.append(1)
        return -x

    solver = "adaptive_sde_dpm" if "improved_euler" not in bad else "adaptive"
    with pytest.raises(ValueError, match=next(iter(bad))):
        fastsde.sample(score, fastsde.VPSDE(), (2, 2), solver=solver, **bad)
    assert calls == []


def test_default_eps_abs_follows_data_range():
    sde = fastsde.VPSDE()
    res = fastsde.sample(mixture_2d(sde), sde, (2, 2), solver="adaptive", seed=0, dtype=F64)
    assert res.options["eps_abs"] == pytest.approx(2 / 256)


# ---------------------------------------------------------------------------------------------
# Brownian tree
# ---------------------------------------------------------------------------------------------


def test_brownian_tree_is_a_fixed_path_with_the_right_increments():
    n = 4000
    noise = NoiseSource.from_seed(0, n)
    ctx = SolverContext(sde=fastsde.VPSDE(), score=None, noise=noise, t_start=1.0, t_end=1e-3)
    tree = BrownianTree(ctx.noise, torch.zeros(n, 1, dtype=F64), -1.0, 2.0, lambda c: torch.exp(2 * c))
    rows = torch.arange(n)
    pts = [torch.full((n,), v, dtype=F64) for v in (-0.7, 0.1, 0.1003, 1.5)]
    w = [tree(p, rows) for p in pts]
    assert torch.equal(w[1], tree(pts[1], rows))  # same point, same value
    for a, b in zip(range(3), range(1, 4)):
        inc = (w[b] - w[a]).squeeze(1)
        var = math.exp(2 * float(pts[b][0])) - math.exp(2 * float(pts[a][0]))
        assert float(inc.var()) == pytest.approx(var, rel=0.1)
    # independent increments
    i1, i2 = (w[1] - w[0]).squeeze(1), (w[3] - w[2]).squeeze(1)
    assert abs(float(torch.corrcoef(torch.stack([i1, i2]))[0, 1])) < 0.06


def _cov_check(values: list[torch.Tensor], pts: list[float], c0: float) -> None:
    """Cov(W(a), W(b)) = v(min(a, b)) − v(c0) with v(c) = e^{2c}, within 6% (n = 20 000: SE ≈ 1–1.5%)."""
    w = torch.cat(values, dim=1)
    emp = torch.cov(w.T)
    for i, a in enumerate(pts):
        for j, b in enumerate(pts):
            theory = math.exp(2 * min(a, b)) - math.exp(2 * c0)
            assert float(emp[i, j]) == pytest.approx(theory, rel=0.06), (a, b, float(emp[i, j]), theory)


def test_brownian_memory_reveals_a_brownian_path_in_any_query_order():
    """Free increments past revealed points (with empty slots), bridges between revealed points,
    re-queries, more revealed points than slots, and forgetting the past on advance: the joint law of
    every revealed value is Brownian."""
    n, c0 = 20_000, -1.0
    ctx = SolverContext(sde=fastsde.VPSDE(), score=None, noise=NoiseSource.from_seed(0, n), t_start=1.0, t_end=1e-3)
    path = BrownianMemory(ctx.noise, torch.zeros(n, 1, dtype=F64), c0, lambda c: torch.exp(2 * c))
    rows = torch.arange(n)

    def at(v: float) -> torch.Tensor:
        return torch.full((n,), v, dtype=F64)

    order = [0.0, 0.6, 0.3, -0.5, 0.9]  # free, free past a revealed point, bridge, bridge, free (widens slots)
    got = {v: path(at(v), rows) for v in order}
    assert torch.equal(got[0.3], path(at(0.3), rows))  # a revealed point keeps its value
    _cov_check([got[v] for v in sorted(got)], sorted(got), c0)
    path.advance(rows, at(0.0), got[0.0])  # move to 0.0: -0.5 is forgotten, 0.3 / 0.6 / 0.9 are kept
    mid = path(at(0.15), rows)
    _cov_check([got[0.0], mid, got[0.3], got[0.9]], [0.0, 0.15, 0.3, 0.9], c0)
    # the remembered future did not change: a retried step sees the same path
    assert torch.equal(got[0.6], path(at(0.6), rows))


@pytest.mark.parametrize("proc", ["vp", "ve"])
def test_sde_dpm_with_brownian_memory_matches_exact_marginal_2d(proc):
    sde = PROCS[proc]()
    gm = mixture_2d(sde)
    res = fastsde.sample(gm, sde, (1000, 2), solver="adaptive_sde_dpm", seed=2, dtype=F64, brownian="memory")
    check_marginal(gm, res.samples, bias=0.08)


# ---------------------------------------------------------------------------------------------
# adaptive_sde_dpm_2m: 2M predictor, corrector at the step's end, 1 NFE per attempt
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("proc", list(PROCS))
def test_sde_dpm_2m_matches_exact_marginal_2d(proc):
    sde = PROCS[proc]()
    gm = mixture_2d(sde)
    res = fastsde.sample(gm, sde, (1000, 2), solver="adaptive_sde_dpm_2m", seed=2, dtype=F64)
    check_marginal(gm, res.samples, bias=0.08)


@pytest.mark.parametrize("proc", ["vp", "ve"])
def test_sde_dpm_2m_matches_exact_marginal_16d(proc):
    sde = PROCS[proc]()
    gm = mixture_nd(sde, dim=16)
    res = fastsde.sample(gm, sde, (600, 16), solver="adaptive_sde_dpm_2m", seed=1, dtype=F64)
    check_marginal(gm, res.samples)


def test_sde_dpm_2m_costs_one_evaluation_per_attempt():
    sde = fastsde.VESDE()
    gm = mixture_nd(sde, dim=16)
    res = fastsde.sample(gm, sde, (40, 16), solver="adaptive_sde_dpm_2m", seed=0, dtype=F64)
    acc, rej = res.stats["accepted"], res.stats["rejected"]
    assert torch.equal(res.nfe_per_sample, (1 + acc + rej + 1).to(F64))  # x̂0(x_T), attempts, denoise
    assert bool((rej > 0).any()) and res.nfe_per_sample.unique().numel() > 5
    assert res.stats["status"] == ["done"] * 40
    assert res.stats["rows_evaluated"] == int(res.nfe_per_sample.sum())  # compaction
    # at the same tolerance the 2S pair pays two evaluations per attempt
    dpm = fastsde.sample(gm, sde, (40, 16), solver="adaptive_sde_dpm", seed=0, dtype=F64)
    assert res.nfe < dpm.nfe, (res.nfe, dpm.nfe)


def test_sde_dpm_2m_accepted_step_is_the_specified_update():
    """Replays one sample from the callback: every accepted step equals the documented predictor /
    corrector update (fresh noise keyed by the attempt), the decision equals E ≤ 1 under the mixed
    tolerance, and a rejected attempt moves nothing."""
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)
    eps_rel, eps_abs = 0.02, 2 / 256
    x_T = torch.tensor([[0.3, -0.2]], dtype=F64)
    steps = []
    fastsde.sample(
        gm, sde, (1, 2), solver="adaptive_sde_dpm_2m", seed=11, dtype=F64, x_init=x_T, denoise=False,
        brownian="fresh", callback=lambda i: steps.append((i.step, i.t.clone(), i.x.clone(), bool(i.accepted[0]))),
    )  # fmt: skip
    noise = NoiseSource.from_seed(11, 1)
    x, t = x_T, torch.tensor([1.0], dtype=F64)
    x0_now = sde.denoise(x, t, gm(x, t))
    x0_before, h_before = None, None
    checked = rejected = 0
    for step, t_after, x_after, ok in steps:
        if not ok:
            assert torch.equal(x_after, x) and torch.equal(t_after, t)
            rejected += 1
            continue
        lam_s, lam_t = sde.log_snr(t), sde.log_snr(t_after)
        h = lam_t - lam_s
        m_t, s_t, s_s = sde.mean_coeff(t_after), sde.marginal_std(t_after), sde.marginal_std(t)
        w = (torch.exp(2 * lam_t) - torch.exp(2 * lam_s)).sqrt() * noise.normal((2,), Stream.STEP, 4 * step, dtype=F64)
        base = s_t / s_s * torch.exp(-h) * x + m_t * (1 - torch.exp(-2 * h)) * x0_now + s_t * torch.exp(-lam_t) * w
        d_old = (x0_now - x0_before) / h_before if x0_before is not None else torch.zeros_like(x)
        pred = base + 0.5 * m_t * (1 - torch.exp(-2 * h)) * h * d_old
        x0_t = sde.denoise(pred, t_after, gm(pred, t_after))
        lin = m_t * (h - 0.5 * (1 - torch.exp(-2 * h)))
        corr = base + lin * (x0_t - x0_now) / h
        old = base + lin * d_old
        delta = torch.clamp_min(eps_rel * old.abs(), eps_abs)
        assert float(((corr - old) / delta).pow(2).mean().sqrt()) <= 1.0
        assert torch.allclose(x_after, corr, rtol=1e-10, atol=1e-12), (step, x_after, corr)
        x, t, x0_before, x0_now, h_before = x_after, t_after, x0_now, x0_t, h
        checked += 1
    assert checked > 15 and rejected > 0
    assert float(t) == pytest.approx(1e-3)


def test_sde_dpm_2m_h_max_caps_the_step():
    sde = fastsde.VESDE()
    gm = mixture_nd(sde, dim=16)

    def largest(**o):
        hs = []
        fastsde.sample(
            gm, sde, (20, 16), solver="adaptive_sde_dpm_2m", seed=0, dtype=F64, eps_rel=0.2, eps_abs=0.15,
            callback=lambda i: hs.append(float(i.h.max())), **o,
        )  # fmt: skip
        return max(hs)

    assert largest() <= 0.45 + 1e-12
    assert largest(h_max=0.3) <= 0.3 + 1e-12
    assert largest(h_max=math.inf) > 1.0  # without the cap loose tolerances take long steps


def test_sde_dpm_2m_compaction_changes_nothing_but_rows():
    """Its per-sample history is indexed by sample, so dropping finished rows changes no result."""
    sde = fastsde.SubVPSDE()
    gm = mixture_2d(sde)
    on = fastsde.sample(gm, sde, (6, 2), solver="adaptive_sde_dpm_2m", seed=7, dtype=F64)
    off = fastsde.sample(gm, sde, (6, 2), solver="adaptive_sde_dpm_2m", seed=7, dtype=F64, compact=False)
    assert torch.allclose(on.samples, off.samples, rtol=0, atol=1e-12)
    assert torch.equal(on.nfe_per_sample, off.nfe_per_sample)
    assert on.stats["rows_evaluated"] == int(on.nfe_per_sample.sum()) < off.stats["rows_evaluated"]


@pytest.mark.parametrize(
    "bad", [dict(h_max=0), dict(h_max=math.nan), dict(h_max=True), dict(max_nfe=1), dict(corrector_steps=1)]
)
def test_sde_dpm_2m_bad_options_fail_before_compute(bad):
    calls = []

    def score(x, t):
        calls.append(1)
        return -x

    with pytest.raises(ValueError, match=next(iter(bad))):
        fastsde.sample(score, fastsde.VPSDE(), (2, 2), solver="adaptive_sde_dpm_2m", **bad)
    assert calls == []

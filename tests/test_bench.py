"""The benchmark: each peer adapter reproduces its peer's own result (or the solution it must reach)
on a small exact problem, the bench bookkeeping, and the CLI end to end on a tiny budget."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import fastsde
from fastsde.bench.peers import PEERS, EDMDenoiser, karras_sigmas, vp_trained_betas
from fastsde.bench.runner import converged_nfe, converged_threshold, reference_solution, steps_for_budget
from fastsde.cli import main
from fastsde.metrics.mixture import mixture_frechet
from fastsde.noise import Stream, as_noise_source

HAS_KDIFF = importlib.util.find_spec("k_diffusion") is not None
HAS_TORCHSDE = importlib.util.find_spec("torchsde") is not None
HAS_TORCHDIFFEQ = importlib.util.find_spec("torchdiffeq") is not None
needs_kdiff = pytest.mark.skipif(not HAS_KDIFF, reason="k-diffusion not installed (pip install fastsde[peers])")


def _x_T(sde, n=64, dims=(2,), seed=0):
    return sde.prior_sample(as_noise_source(seed, n).normal(dims, Stream.PRIOR, 0, dtype=torch.float64))


def _fastsde(gm, sde, x_T, solver, **opts):
    res = fastsde.sample(gm.score, sde, tuple(x_T.shape), solver=solver, x_init=x_T, dtype=torch.float64, **opts)
    return res


def _need(name):
    if name not in fastsde.SOLVERS:
        pytest.skip(f"fastsde solver {name!r} not in this build")


# ---------------------------------------------------------------------------------------------
# diffusers (always installed: a core dependency)
# ---------------------------------------------------------------------------------------------


def test_trained_betas_reproduce_the_vp_process():
    sde = fastsde.VPSDE()
    betas = vp_trained_betas(sde)
    abar = torch.cumprod(1.0 - betas, 0)
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    assert torch.allclose(abar, sde.mean_coeff(t) ** 2, rtol=1e-12)
    assert betas[0] == pytest.approx(1.0 - float(sde.mean_coeff(torch.tensor([1e-3], dtype=torch.float64))) ** 2)


def test_diffusers_ddim_adapter_matches_fastsde_ddim():
    """Trailing spacing with 10 steps evaluates at t = 1, 0.9, ..., 0.1 and jumps to x0: fastsde's DDIM
    on the uniform 10-point grid from 1 to t_end = 0.1 with its final denoise."""
    _need("ddim")
    sde = fastsde.VPSDE()
    gm = fastsde.problems.mixture_2d(sde)
    x_T = _x_T(sde)
    peer = PEERS["diffusers_ddim"].run(gm.score, sde, x_T, 10, sde.default_t_end)
    ours = _fastsde(gm, sde, x_T, "ddim", steps=10, grid="uniform", t_end=0.1)
    assert peer.nfe == ours.nfe == 10
    # diffusers keeps its alphas in float32
    assert torch.allclose(peer.samples, ours.samples, atol=2e-5, rtol=0)


def test_diffusers_euler_equals_diffusers_ddim():
    """Euler in (x/m, σ/m) is DDIM(η=0): the two adapters agree on the same trailing timesteps."""
    sde = fastsde.VPSDE()
    gm = fastsde.problems.mixture_2d(sde)
    x_T = _x_T(sde)
    a = PEERS["diffusers_euler"].run(gm.score, sde, x_T, 8, sde.default_t_end)
    b = PEERS["diffusers_ddim"].run(gm.score, sde, x_T, 8, sde.default_t_end)
    assert a.nfe == b.nfe == 8
    assert torch.allclose(a.samples, b.samples, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["diffusers_dpmsolver_2m", "diffusers_unipc"])
def test_diffusers_multistep_adapters_converge_to_the_pf_ode(name):
    sde = fastsde.VPSDE()
    gm = fastsde.problems.mixture_2d(sde)
    x_T = _x_T(sde)
    ref = reference_solution(gm.score, sde, x_T, sde.default_t_end, 1e-9)
    errs = [float(((PEERS[name].run(gm.score, sde, x_T, n, 1e-3).samples - ref) ** 2).mean()) for n in (10, 40, 200)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-5  # float32 alphas and the trailing grid's t = 1/N end limit the floor


def test_vp_only_peers_refuse_other_processes():
    assert not PEERS["diffusers_ddim"].supports(fastsde.VESDE())
    assert PEERS["diffusers_ddim"].supports(fastsde.VPSDE())
    assert PEERS["scipy_rk45"].supports(fastsde.SubVPSDE())


# ---------------------------------------------------------------------------------------------
# ODE and SDE integrators
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "scipy_rk45",
        pytest.param(
            "torchdiffeq_dopri5", marks=pytest.mark.skipif(not HAS_TORCHDIFFEQ, reason="torchdiffeq not installed")
        ),
    ],
)
@pytest.mark.parametrize("sde_cls", [fastsde.VPSDE, fastsde.VESDE, fastsde.EDM])
def test_pf_ode_adapters_reach_the_reference(name, sde_cls):
    sde = sde_cls()
    gm = fastsde.problems.mixture_2d(sde)
    x_T = _x_T(sde, n=32)
    ref = reference_solution(gm.score, sde, x_T, sde.default_t_end, 1e-9)
    run = PEERS[name].run(gm.score, sde, x_T, 1e-6, sde.default_t_end)
    assert float(((run.samples - ref) ** 2).mean()) < 1e-8
    assert run.nfe == run.calls  # one shared step size: every call evaluates the whole batch


def test_pf_ode_reference_agrees_with_fastsde_ode():
    _need("ode")
    sde = fastsde.SubVPSDE()
    gm = fastsde.problems.mixture_2d(sde)
    x_T = _x_T(sde, n=32)
    ref = reference_solution(gm.score, sde, x_T, sde.default_t_end, 1e-9)
    ours = _fastsde(gm, sde, x_T, "ode", rtol=1e-7, atol=1e-7)
    assert float(((ours.samples - ref) ** 2).mean()) < 1e-8


@pytest.mark.skipif(not HAS_TORCHSDE, reason="torchsde not installed")
def test_torchsde_adapter_samples_the_mixture():
    from fastsde.metrics.mixture import mixture_frechet_floor

    sde = fastsde.VPSDE()
    gm = fastsde.problems.mixture_2d(sde)
    x_T = _x_T(sde, n=600)
    run = PEERS["torchsde_milstein"].run(gm.score, sde, x_T, 1e-2, sde.default_t_end, seed=3)
    floor, sd = mixture_frechet_floor(gm, 600, draws=6)
    assert mixture_frechet(run.samples, gm).value < floor + 4 * sd
    # its noise is its own and seeded: same seed, same samples
    again = PEERS["torchsde_milstein"].run(gm.score, sde, x_T, 1e-2, sde.default_t_end, seed=3)
    assert torch.equal(run.samples, again.samples)


# ---------------------------------------------------------------------------------------------
# k-diffusion
# ---------------------------------------------------------------------------------------------


def test_edm_denoiser_is_tweedie_in_edm_coordinates():
    sde = fastsde.VPSDE()
    gm = fastsde.problems.mixture_2d(sde)
    x = _x_T(sde, n=8) * 0.5
    t = torch.full((8,), 0.3, dtype=torch.float64)
    m = sde.mean_coeff(t)[:, None]
    d = EDMDenoiser(gm.score, sde)(x / m, sde.edm_sigma(t))
    assert torch.allclose(d, sde.denoise(x, t, gm.score(x, t)), rtol=1e-10, atol=1e-12)


@needs_kdiff
@pytest.mark.parametrize(
    "peer,solver,opts",
    [
        ("kdiff_euler", "euler", {}),
        ("kdiff_heun", "heun", {}),
        ("kdiff_dpmpp_2m", "dpmpp_2m", {"grid": "edm", "lower_order_final": False}),
    ],
)
@pytest.mark.parametrize("sde_cls", [fastsde.VPSDE, fastsde.VESDE, fastsde.EDM])
def test_kdiffusion_adapters_match_fastsde_on_the_same_sigmas(peer, solver, opts, sde_cls):
    _need(solver)
    sde = sde_cls()
    gm = fastsde.problems.mixture_2d(sde)
    x_T = _x_T(sde)
    nfe = 12 if solver != "heun" else 11
    theirs = PEERS[peer].run(gm.score, sde, x_T, nfe, sde.default_t_end)
    steps = 12 if solver != "heun" else 6
    ours = _fastsde(gm, sde, x_T, solver, steps=steps, **opts)
    assert theirs.nfe == ours.nfe == nfe
    assert torch.allclose(theirs.samples, ours.samples, atol=1e-9, rtol=1e-9)


@needs_kdiff
@pytest.mark.parametrize("sde_cls", [fastsde.VPSDE, fastsde.VESDE, fastsde.EDM])
def test_kdiffusion_dpmpp_2m_sde_matches_fastsde_with_the_same_noise(sde_cls):
    """k-diffusion's sample_dpmpp_2m_sde (η = 1, midpoint), fed fastsde's keyed noise through its
    noise_sampler, equals fastsde's dpmpp_2m_sde on the same Karras sigmas."""
    from k_diffusion import sampling

    _need("dpmpp_2m_sde")
    sde = sde_cls()
    gm = fastsde.problems.mixture_2d(sde)
    x_T = _x_T(sde)
    steps = 12
    sigmas = karras_sigmas(sde, steps, sde.default_t_end)
    noise = as_noise_source(0, x_T.shape[0])
    move = [0]

    def noise_sampler(sigma, sigma_next):
        z = noise.normal((2,), Stream.STEP, move[0], dtype=torch.float64)
        move[0] += 1
        return z

    m_T = float(sde.mean_coeff(torch.tensor([sde.T], dtype=torch.float64)))
    theirs = sampling.sample_dpmpp_2m_sde(
        EDMDenoiser(gm.score, sde), x_T / m_T, sigmas, disable=True, noise_sampler=noise_sampler
    )
    ours = _fastsde(gm, sde, x_T, "dpmpp_2m_sde", steps=steps, grid="edm", lower_order_final=False, seed=0)
    assert move[0] == steps - 1 and ours.nfe == steps
    assert torch.allclose(theirs, ours.samples, atol=1e-9, rtol=1e-9)


@needs_kdiff
def test_kdiffusion_dpm_adaptive_eta0_reaches_the_reference():
    sde = fastsde.VPSDE()
    gm = fastsde.problems.mixture_2d(sde)
    x_T = _x_T(sde, n=32)
    ref = reference_solution(gm.score, sde, x_T, sde.default_t_end, 1e-9)
    run = PEERS["kdiff_dpm_adaptive_eta0"].run(gm.score, sde, x_T, 1e-5, sde.default_t_end)
    assert float(((run.samples - ref) ** 2).mean()) < 1e-6


def test_karras_sigmas_end_at_zero():
    sde = fastsde.VESDE()
    s = karras_sigmas(sde, 5, 1e-5)
    assert s.shape == (6,) and s[-1] == 0 and s[0] == pytest.approx(50.0) and bool((s[:-1].diff() < 0).all())


# ---------------------------------------------------------------------------------------------
# bookkeeping and the CLI
# ---------------------------------------------------------------------------------------------


def test_steps_for_budget_inverts_the_nfe():
    sde = fastsde.VPSDE()
    assert steps_for_budget("em", sde, 10) == 10  # EM: N NFE
    assert steps_for_budget("em", sde, 1) is None
    if "heun" in fastsde.SOLVERS:
        assert steps_for_budget("heun", sde, 10) == 5  # 2N − 1 = 9 ≤ 10 < 11


@pytest.mark.parametrize("solver", [n for n, s in fastsde.SOLVERS.items() if not s.adaptive])
def test_steps_for_budget_is_the_counted_nfe(solver):
    """The bench's step count for a budget comes from the declarations; a run at that count spends
    at most the budget, and one more grid point would exceed it (counted, not declared)."""
    sde = fastsde.EDM()
    gm = fastsde.problems.mixture_2d(sde)
    for budget in (5, 17):
        steps = steps_for_budget(solver, sde, budget)
        assert steps is not None and steps >= 2
        at = fastsde.sample(gm, sde, (2, 2), solver=solver, steps=steps).nfe
        above = fastsde.sample(gm, sde, (2, 2), solver=solver, steps=steps + 1).nfe
        assert at <= budget < above


def test_converged_nfe_needs_every_larger_run_below_threshold():
    recs = [
        {"nfe": 5, "quality": 0.5, "error": None},
        {"nfe": 10, "quality": 0.09, "error": None},  # a lucky dip
        {"nfe": 20, "quality": 0.2, "error": None},
        {"nfe": 50, "quality": 0.08, "error": None},
        {"nfe": 100, "quality": 0.07, "error": None},
    ]
    assert converged_nfe(recs, 0.1) == 50
    assert converged_nfe(recs, 0.01) is None
    assert converged_threshold((1.0, 0.2), 0.5) == pytest.approx(1.4)
    assert converged_threshold((1.0, 0.01), 2.0) == pytest.approx(2.2)


def test_median_of_3_rule_tolerates_one_stray_run_but_not_two():
    def runs(qs):
        return [{"nfe": float(10 * (i + 1)), "quality": q, "error": None} for i, q in enumerate(qs)]

    one_stray = runs([5.0, 2.0, 0.9, 0.8, 1.3, 0.9, 0.95])  # τ = 1: the run at 50 NFE is above
    assert converged_nfe(one_stray, 1.0) == 60.0
    assert converged_nfe(one_stray, 1.0, median_of_3=True) == 30.0
    two_strays = runs([5.0, 2.0, 0.9, 1.2, 1.3, 0.9, 0.95])
    assert converged_nfe(two_strays, 1.0, median_of_3=True) == 60.0
    last_far_above = runs([0.5, 0.6, 0.7, 3.0])
    assert converged_nfe(last_far_above, 1.0, median_of_3=True) is None
    assert converged_nfe(runs([2.0, 2.0]), 1.0, median_of_3=True) is None
    clean = runs([3.0, 0.9, 0.8])
    assert converged_nfe(clean, 1.0) == converged_nfe(clean, 1.0, median_of_3=True) == 20.0
    only_the_last = runs([120.0, 31.8, 13.9])  # never stricter than the strict rule
    assert converged_nfe(only_the_last, 17.0) == converged_nfe(only_the_last, 17.0, median_of_3=True) == 30.0


def test_bench_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench"
    samplers = "em,ddim,diffusers_ddim,scipy_rk45,ode" if "ddim" in fastsde.SOLVERS else "em,scipy_rk45"
    rc = main(
        [
            "bench",
            "--n",
            "64",
            "--dim",
            "2",
            "--budgets",
            "4,8",
            "--processes",
            "vp,ve",
            "--samplers",
            samplers,
            "--tolerances",
            "0.1,0.01",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    for f in ("results.json", "results.csv", "table.md", "mixture2d_vp_quality_vs_nfe.png"):
        assert (out / f).stat().st_size > 0
    assert (out / "mixture2d_ve_quality_vs_wall.png").exists()
    assert (out / "mixture2d_vp_mse_vs_nfe.png").exists()
    res = json.loads((out / "results.json").read_text())
    recs = res["records"]
    em = [r for r in recs if r["sampler"] == "em" and r["process"] == "vp"]
    assert [r["nfe"] for r in em] == [4.0, 8.0]
    assert all(r["error"] is None for r in recs)
    assert all(r["mse"] is None for r in em)  # stochastic: no MSE to the ODE reference
    assert all(0.0 <= r["outside_share"] <= 1.0 for r in em)
    assert not any(r["sampler"] == "diffusers_ddim" and r["process"] == "ve" for r in recs)
    assert set(res["summary"]) == {"vp", "ve"}
    table = (out / "table.md").read_text()
    assert "NFE to converge" in table and "ms/sample at converge" in table
    assert "ms per sample)" in table  # the best of each family: NFE with the wall time it took


def test_bench_runs_on_the_edm_process(tmp_path):
    """EDM (t = σ) is a bench process like the others; the VP-only diffusers peers are skipped on it."""
    out = tmp_path / "bench"
    samplers = "em,dpmpp_2m,scipy_rk45,diffusers_ddim" if "dpmpp_2m" in fastsde.SOLVERS else "em,scipy_rk45"
    common = ["--n", "64", "--dim", "2", "--budgets", "10,20", "--no-progress", "--out", str(out)]
    rc = main(["bench", "--processes", "edm", "--samplers", samplers, "--tolerances", "0.01", *common])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["summary"]) == {"edm"}
    assert res["summary"]["edm"]["sde"]["type"] == "EDM"
    recs = res["records"]
    assert recs and all(r["error"] is None and r["process"] == "edm" for r in recs)
    assert not any(r["sampler"] == "diffusers_ddim" for r in recs)
    assert [r["nfe"] for r in recs if r["sampler"] == "em"] == [10.0, 20.0]


def test_bench_rejects_an_unknown_process(tmp_path, capsys):
    rc = main(["bench", "--processes", "vp,sub-vp", "--n", "8", "--out", str(tmp_path), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "sub-vp" in err and "edm" in err


def test_bench_cli_rejects_unknown_sampler(tmp_path, capsys):
    rc = main(["bench", "--samplers", "nope", "--n", "8", "--out", str(tmp_path), "--no-progress"])
    assert rc == 2
    assert "unknown sampler" in capsys.readouterr().err


def test_bench_merge_pools_runs_of_the_same_problem(tmp_path, capsys):
    common = ["--n", "32", "--dim", "2", "--processes", "vp", "--no-progress", "--tolerances", "0.1"]
    assert main(["bench", *common, "--budgets", "4,8", "--samplers", "em", "--out", str(tmp_path / "a")]) == 0
    assert main(["bench", *common, "--budgets", "4", "--samplers", "ode", "--out", str(tmp_path / "b")]) == 0
    out = tmp_path / "merged"
    assert main(["bench", "--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert len(res["records"]) == len(a["records"]) + len(b["records"])
    assert set(res["summary"]["vp"]["converged"]) == {"em", "ode"}
    assert res["config"]["budgets"] == [4, 8]
    table = (out / "table.md").read_text()
    assert "| em |" in table and "| ode |" in table
    # a piece with another n (another x_T, floor and reference) cannot be pooled; nor the same sampler twice
    assert (
        main(["bench", *common[2:], "--n", "16", "--budgets", "4", "--samplers", "em", "--out", str(tmp_path / "c")])
        == 0
    )
    capsys.readouterr()
    assert main(["bench", "--merge", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(out)]) == 2
    assert "different n" in capsys.readouterr().err
    assert main(["bench", "--merge", str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(out)]) == 2
    assert "more than one run" in capsys.readouterr().err
    assert main(["bench", "--merge", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_bench_variants_run_their_base_solver_with_the_fixed_options(tmp_path):
    """`dpmpp_2m_sde_karras` in the bench is `dpmpp_2m_sde` on the EDM grid, from the bench's own x_T."""
    _need("dpmpp_2m_sde")
    out = tmp_path / "bench"
    common = ["bench", "--n", "32", "--dim", "2", "--processes", "vp", "--budgets", "6", "--no-progress"]
    assert main([*common, "--samplers", "dpmpp_2m_karras,dpmpp_2m_sde_karras,dpmpp_2m", "--out", str(out)]) == 0
    recs = {r["sampler"]: r for r in json.loads((out / "results.json").read_text())["records"]}
    assert json.loads(recs["dpmpp_2m_sde_karras"]["options"])["grid"] == "edm"
    assert json.loads(recs["dpmpp_2m"]["options"])["grid"] == "logsnr"
    sde = fastsde.VPSDE()
    gm = fastsde.problems.mixture_2d(sde)
    rec = recs["dpmpp_2m_sde_karras"]
    steps = json.loads(rec["options"])["steps"]
    res = fastsde.sample(
        gm.score,
        sde,
        (32, 2),
        solver="dpmpp_2m_sde",
        grid="edm",
        steps=steps,
        seed=0,
        x_init=_x_T(sde, 32),
        dtype=torch.float64,
    )
    assert res.nfe == rec["nfe"]
    assert mixture_frechet(res.samples, gm).value == pytest.approx(rec["quality"], rel=1e-9)


def test_bench_skips_a_variant_that_repeats_its_base_on_a_process(tmp_path, capsys):
    """The log-SNR variants are the defaults on VP (skipped there) and real variants on EDM, where
    the default grid is Karras (so there the Karras variants are the ones skipped)."""
    _need("dpmpp_2m")
    out = tmp_path / "bench"
    samplers = "dpmpp_2m,dpmpp_2m_karras,dpmpp_2m_logsnr"
    common = ["bench", "--n", "32", "--dim", "2", "--budgets", "6", "--no-progress", "--samplers", samplers]
    assert main([*common, "--processes", "vp,edm", "--out", str(out)]) == 0
    recs = json.loads((out / "results.json").read_text())["records"]
    ran = {(r["process"], r["sampler"]) for r in recs}
    assert ran == {("vp", "dpmpp_2m"), ("vp", "dpmpp_2m_karras"), ("edm", "dpmpp_2m"), ("edm", "dpmpp_2m_logsnr")}
    grids = {(r["process"], r["sampler"]): json.loads(r["options"])["grid"] for r in recs}
    assert grids[("edm", "dpmpp_2m")] == "edm" and grids[("edm", "dpmpp_2m_logsnr")] == "logsnr"
    log = capsys.readouterr().out
    assert "dpmpp_2m_logsnr: skipped on vp" in log and "dpmpp_2m_karras: skipped on edm" in log


def test_adaptive_variant_is_swept_over_tolerances(tmp_path):
    """`adaptive_sde_dpm_pi` is `adaptive_sde_dpm` with PI control, benchmarked like its base (a
    tolerance sweep, not step budgets)."""
    _need("adaptive_sde_dpm")
    out = tmp_path / "bench"
    args = ["bench", "--n", "32", "--dim", "2", "--processes", "vp", "--budgets", "500", "--no-progress"]
    assert main([*args, "--samplers", "adaptive_sde_dpm_pi", "--tolerances", "0.1,0.05", "--out", str(out)]) == 0
    recs = json.loads((out / "results.json").read_text())["records"]
    assert [r["setting"] for r in recs] == [0.1, 0.05]
    opts = [json.loads(r["options"]) for r in recs]
    assert all(o["pi_beta"] == 0.35 and o["eps_rel"] == r["setting"] for o, r in zip(opts, recs))


@pytest.mark.skipif("digits-unipc-5.safetensors" not in fastsde.shipped_grids(), reason="no shipped grid")
def test_fitted_grid_variants_run_the_shipped_grid_and_skip_elsewhere(tmp_path, capsys):
    """On a shipped model, `unipc_fitted` is `unipc` on the grid shipped for it (budgets without a
    grid skipped); on a mixture it is skipped with a note."""
    from fastsde.artifacts.grid import shipped_grid
    from fastsde.bench.runner import BenchConfig, Problem, _run_sampler, fastsde_samplers

    model = fastsde.load_model("digits")
    prob = Problem(
        "digits", "vp", model.sde, model.score, tuple(model.shape), torch.float32,
        lambda x: float(x.abs().mean()), (0.0, 0.0), "mean |x|", 1e-5, model="digits",
    )  # fmt: skip
    s = next(v for v in fastsde_samplers()[0] if v.name == "unipc_fitted")
    cfg = BenchConfig(problem="digits", budgets=[5, 37], n=4, seed=0, progress=False)
    x_T = model.sde.prior_sample(as_noise_source(0, 4).normal(prob.dims, Stream.PRIOR, 0, dtype=torch.float32))
    recs = _run_sampler("fastsde", s, prob, cfg, x_T, torch.zeros_like(x_T))
    assert [r["budget"] for r in recs] == [5] and recs[0]["error"] is None
    grid = shipped_grid("digits", "unipc", 5)
    assert json.loads(recs[0]["options"])["grid"] == grid.times.tolist()
    res = fastsde.sample(model.score, model.sde, (4, *model.shape), solver="unipc", steps=5, grid=grid, x_init=x_T)
    assert recs[0]["quality"] == pytest.approx(float(res.samples.abs().mean()), rel=1e-6)
    out = tmp_path / "bench"
    common = ["bench", "--n", "16", "--dim", "2", "--processes", "vp", "--budgets", "6", "--no-progress"]
    assert main([*common, "--samplers", "unipc_fitted,unipc", "--out", str(out)]) == 0
    assert {r["sampler"] for r in json.loads((out / "results.json").read_text())["records"]} == {"unipc"}
    assert "unipc_fitted: skipped on mixture2d (fitted grids are shipped for the shipped models only)" in (
        capsys.readouterr().out
    )

"""The front-door contract, checked for every registered solver on every process (issue 2).

Each test loops over ``fastsde.SOLVERS`` so that a new solver is held to the same contract the day it
is registered: accounting (NFE counted once, per sample, denoise included), determinism and
batch-size independence, the callback and the progress bar, NaN/Inf handling, and bad input raising a
ValueError before any score call. Runs use few steps or loose tolerances: these are contract checks,
not accuracy checks (accuracy is in test_fixed_solvers, test_convergence, test_adaptive, test_ode).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import fastsde
from fastsde.problems import mixture_2d
from fastsde.score import GaussianMixture, NonFiniteScoreError
from fastsde.solvers.core.context import StepInfo

F64 = torch.float64
SOLVER_NAMES = sorted(fastsde.SOLVERS)
N_STEPS = 8

#: Cheap settings, applied when a solver has the option.
FAST = {"steps": N_STEPS, "eps_rel": 0.1, "rtol": 1e-3, "atol": 1e-3}
#: Options that make a solver's sample i independent of the batch (PC's reference rule uses batch-mean norms).
BATCH_INDEPENDENT = {"pc": {"per_sample_norm": True}}


def fast_options(name: str, **extra: Any) -> dict[str, Any]:
    options = {k: v for k, v in FAST.items() if k in fastsde.SOLVERS[name].options}
    return {**options, **BATCH_INDEPENDENT.get(name, {}), **extra}


def is_fixed_step(name: str) -> bool:
    return not fastsde.SOLVERS[name].adaptive


def expected_nfe(name: str, res: fastsde.SampleResult) -> Tensor:
    """Per-sample NFE from the solver's declarations, the denoise included: a fixed grid costs
    first_nfe + (N − 1)·nfe_per_step; an adaptive solve first_nfe (+ the automatic first-step
    selection) + nfe_per_step per attempt, less the evaluations reused after rejections."""
    spec = fastsde.SOLVERS[name]
    opts = res.options
    if not spec.adaptive:
        return torch.full_like(res.nfe_per_sample, float(spec.fixed_nfe(opts, denoise=True)))
    s = res.stats
    attempts = (s["accepted"] + s["rejected"]).double()
    start = spec.stepper.first_nfe + (spec.stepper.initial_step_nfe if opts.get("h_init", 0) is None else 0)
    return start + spec.nfe_per_step_for(opts) * attempts - s["reused_evaluations"].double() + 1


class Recorder:
    """A score that records each call (rows, times) and can be made to misbehave on one call."""

    def __init__(self, score: Callable[[Tensor, Tensor], Tensor], bad_call: int | None = None, bad: float = math.nan):
        self.score = score
        self.rows: list[int] = []
        self.times: list[Tensor] = []
        self.bad_call = bad_call
        self.bad = bad

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.rows.append(x.shape[0])
        self.times.append(t.clone())
        out = self.score(x, t)
        if self.bad_call is not None and len(self.rows) == self.bad_call:
            out = torch.full_like(out, self.bad)
        return out


# ---------------------------------------------------------------------------------------------
# Accounting and the final denoise
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_accounting_and_denoise_on_every_process(process, solver):
    """NFE is the per-sample count of rows handed to the score; the documented rule holds; the
    denoise costs exactly one NFE per sample and is the Tweedie step at t_end of the same path."""
    gm = mixture_2d(process)
    rec = Recorder(gm)
    opts = fast_options(solver)
    res = fastsde.sample(rec, process, (6, 2), solver=solver, seed=3, dtype=F64, **opts)
    assert res.samples.shape == (6, 2) and res.samples.dtype == F64
    assert bool(torch.isfinite(res.samples).all())
    assert res.calls == len(rec.rows)
    assert float(res.nfe_per_sample.sum()) == sum(rec.rows)
    assert res.nfe == pytest.approx(float(res.nfe_per_sample.mean()), rel=1e-12)
    assert res.nfe_per_sample.tolist() == expected_nfe(solver, res).tolist()

    raw = fastsde.sample(gm, process, (6, 2), solver=solver, seed=3, dtype=F64, denoise=False, **opts)
    assert (res.nfe_per_sample - raw.nfe_per_sample).tolist() == [1.0] * 6
    t_end = torch.full((6,), process.default_t_end, dtype=F64)
    torch.testing.assert_close(res.samples, process.denoise(raw.samples, t_end, gm(raw.samples, t_end)))


# ---------------------------------------------------------------------------------------------
# Determinism and batch-size independence
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_deterministic_and_batch_size_independent_on_every_process(process, solver):
    """Same seed, same samples; sample i (and its NFE) is the same in a batch of 4 and of 13."""
    gm = mixture_2d(process)
    kw = dict(solver=solver, seed=21, dtype=F64, **fast_options(solver))
    small = fastsde.sample(gm, process, (4, 2), **kw)
    again = fastsde.sample(gm, process, (4, 2), **kw)
    big = fastsde.sample(gm, process, (13, 2), **kw)
    assert torch.equal(small.samples, again.samples)
    if fastsde.SOLVERS[solver].nfe_per_step is None:
        # Adaptive solvers drop finished samples from the batch, so sample i sits at another position
        # in a batch of 13 than in a batch of 4; torch's SIMD kernels round exp/log/pow in the scalar
        # tail of a vector differently in the last bit (seen with AVX2). Same steps, same NFE; the
        # samples agree to rounding.
        torch.testing.assert_close(small.samples, big.samples[:4], rtol=1e-10, atol=1e-12)
    else:
        assert torch.equal(small.samples, big.samples[:4])
    assert torch.equal(small.nfe_per_sample, big.nfe_per_sample[:4])
    other = fastsde.sample(gm, process, (4, 2), **{**kw, "seed": 22})
    assert not torch.equal(small.samples, other.samples)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_image_shaped_float32_samples(solver):
    """Samples shaped (n, C, H, W) in float32 work: the solve stays in the requested dtype and per-row
    times broadcast over every data dimension."""
    sde = fastsde.VPSDE()
    means = torch.tensor([[-0.5, 0.2, 0.4, -0.1], [0.5, -0.3, 0.0, 0.3]], dtype=F64).reshape(2, 1, 2, 2)
    gm = GaussianMixture([0.6, 0.4], means, [0.1, 0.2], sde)
    dtypes: set[torch.dtype] = set()

    def score(x: Tensor, t: Tensor) -> Tensor:
        dtypes.update({x.dtype, t.dtype})
        return gm(x, t)

    kw = dict(solver=solver, seed=5, dtype=torch.float32, **fast_options(solver))
    img = fastsde.sample(score, sde, (3, 1, 2, 2), **kw)
    assert img.samples.shape == (3, 1, 2, 2) and img.samples.dtype == torch.float32
    assert bool(torch.isfinite(img.samples).all()) and dtypes == {torch.float32}
    assert torch.equal(img.samples[:2], fastsde.sample(score, sde, (2, 1, 2, 2), **kw).samples)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_custom_t_end_is_where_the_solve_and_the_denoise_end(solver):
    for sde, t_end in ((fastsde.VPSDE(), 0.05), (fastsde.EDM(), 0.5)):
        rec = Recorder(mixture_2d(sde))
        infos: list[StepInfo] = []
        res = fastsde.sample(
            rec, sde, (3, 2), solver=solver, t_end=t_end, dtype=F64, callback=infos.append, **fast_options(solver)
        )
        assert res.options["t_end"] == t_end
        torch.testing.assert_close(infos[-1].t, torch.full((3,), t_end, dtype=F64))
        assert rec.times[-1].tolist() == [t_end] * 3  # the denoise
        assert min(float(t.min()) for t in rec.times) >= t_end * (1 - 1e-12)


# ---------------------------------------------------------------------------------------------
# Callback and progress bar
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vp", "edm"])
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_callback_sees_every_step_and_can_stop(name, solver):
    sde = fastsde.VPSDE() if name == "vp" else fastsde.EDM()
    gm = mixture_2d(sde)
    infos: list[StepInfo] = []
    res = fastsde.sample(
        gm, sde, (5, 2), solver=solver, seed=1, dtype=F64, callback=infos.append, **fast_options(solver)
    )
    assert infos, "the callback was never called"
    if is_fixed_step(solver):
        assert [i.step for i in infos] == list(range(N_STEPS - 1))
    nfes = [i.nfe for i in infos]
    assert nfes == sorted(nfes) and nfes[0] > 0
    for info in infos:
        assert info.t.shape == (5,) and info.h.shape == (5,) and info.x.shape == (5, 2)
        assert bool((info.t >= sde.default_t_end * (1 - 1e-9)).all() and (info.t <= sde.T).all())
    last = infos[-1]
    torch.testing.assert_close(last.t, torch.full((5,), sde.default_t_end, dtype=F64))
    assert last.nfe == pytest.approx(res.nfe - 1)  # every step reported, then the denoise
    assert not res.stopped_early

    stop = fastsde.sample(
        gm, sde, (5, 2), solver=solver, seed=1, dtype=F64, callback=lambda info: False, **fast_options(solver)
    )
    assert stop.stopped_early and stop.nfe == infos[0].nfe  # stopped after the first step, no denoise


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_progress_bar_is_shown_and_changes_nothing(solver, capsys):
    sde = fastsde.VPSDE()
    gm = mixture_2d(sde)
    kw = dict(solver=solver, seed=2, dtype=F64, **fast_options(solver))
    quiet = fastsde.sample(gm, sde, (4, 2), **kw)
    assert capsys.readouterr().err == ""
    shown = fastsde.sample(gm, sde, (4, 2), progress=True, **kw)
    err = capsys.readouterr().err
    assert re.search(r"\d+/\d+", err), f"no tqdm bar on stderr: {err!r}"
    assert torch.equal(quiet.samples, shown.samples) and quiet.nfe == shown.nfe


# ---------------------------------------------------------------------------------------------
# NaN / Inf from the score
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("name", ["vp", "edm"])
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_non_finite_score(name, solver, bad):
    """One bad call (the second): fixed-step solvers raise NonFiniteScoreError naming the time of
    that call; adaptive solvers reject the step, shrink it and finish with finite samples."""
    sde = fastsde.VPSDE() if name == "vp" else fastsde.EDM()
    gm = mixture_2d(sde)
    rec = Recorder(gm, bad_call=2, bad=bad)
    kw = dict(solver=solver, seed=4, dtype=F64, **fast_options(solver))
    if is_fixed_step(solver):
        with pytest.raises(NonFiniteScoreError) as info:
            fastsde.sample(rec, sde, (3, 2), **kw)
        named = [float(v) for v in re.search(r"t = \[([^\]]*)\]", str(info.value)).group(1).split(",")]
        assert named == pytest.approx(sorted(set(rec.times[1].tolist())))
        assert len(rec.rows) == 2  # raised at once, not after more compute
    else:
        res = fastsde.sample(rec, sde, (3, 2), **kw)
        assert bool(torch.isfinite(res.samples).all()) and not res.stopped_early
        assert len(rec.rows) > 2  # the rejected step was retried


# ---------------------------------------------------------------------------------------------
# Bad input: a ValueError naming the value, before any score call
# ---------------------------------------------------------------------------------------------


def _bad_cases(solver: str, sde: fastsde.SDE) -> list[tuple[dict[str, Any], str]]:
    options = fastsde.SOLVERS[solver].options
    cases: list[tuple[dict[str, Any], str]] = [
        (dict(bogus=1), r"unknown option\(s\) \['bogus'\] for solver '" + solver + r"'; valid options: \["),
        (dict(shape=(0, 2)), r"shape must be a tuple \(n, \*dims\).*got \(0, 2\)"),
        (dict(shape=(4,)), r"shape must be a tuple \(n, \*dims\).*got \(4,\)"),
        (dict(x_init=torch.zeros(4, 3)), r"x_init must have shape \(4, 2\), got \(4, 3\)"),
        (dict(t_end=sde.T * 1.5), r"t_end must lie in .*got " + re.escape(repr(sde.T * 1.5))),
        (dict(t_end=sde.T), r"t_end must be < T"),
        (dict(t_end=math.nan), r"t_end must be a finite number, got nan"),
        (dict(t_end=sde.t_min / 2 if sde.t_min > 0 else -1e-9), r"t_end must lie in "),  # 0 itself: t_end=0
        (dict(t_end=-1e-3), r"t_end must lie in .*got -0.001"),
        (dict(denoise=1), r"denoise must be True or False, got 1"),
    ]
    if "steps" in options:
        cases += [(dict(steps=v), rf"steps must be an integer >= 2, got {v}") for v in (0, -3, 1, 2.5)]
    for tol in ("eps_rel", "rtol", "atol", "h_init"):
        if tol in options:
            cases += [(dict(**{tol: v}), rf"{tol} must be > 0, got {v}") for v in (0.0, -1e-3)]
            cases += [(dict(**{tol: math.inf}), rf"{tol} must be a finite number, got inf")]
    if "eps_abs" in options:
        cases += [
            (dict(eps_abs=-1e-3), r"eps_abs must be > 0, got -0.001"),
            (dict(eps_abs=0.0), r"eps_abs must be > 0, got 0.0"),
        ]
    return cases


@pytest.mark.parametrize("name", ["vp", "ve", "edm"])
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_bad_input_is_a_value_error_before_any_compute(name, solver):
    sde = {"vp": fastsde.VPSDE, "ve": fastsde.VESDE, "edm": fastsde.EDM}[name]()
    rec = Recorder(mixture_2d(sde))
    for kwargs, message in _bad_cases(solver, sde):
        args = {"shape": (4, 2), "solver": solver, **kwargs}
        with pytest.raises(ValueError, match=message):
            fastsde.sample(rec, sde, **args)
        assert rec.rows == [], f"{kwargs}: the score was called before the error"
    # the message lists every valid option
    with pytest.raises(ValueError) as info:
        fastsde.sample(rec, sde, (4, 2), solver=solver, bogus=1)
    for option in [*fastsde.SOLVERS[solver].options, "t_end", "denoise"]:
        assert repr(option) in str(info.value)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_score_of_the_wrong_shape_is_a_value_error(solver):
    sde = fastsde.VPSDE()
    rec = Recorder(lambda x, t: torch.zeros(x.shape[0], 3, dtype=x.dtype))
    with pytest.raises(ValueError, match=r"score\(x, t\) must return a tensor shaped like x \(4, 2\), got \(4, 3\)"):
        fastsde.sample(rec, sde, (4, 2), solver=solver, **fast_options(solver))
    assert len(rec.rows) == 1  # found at the first call

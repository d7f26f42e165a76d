"""The hot path (issue 32): a fixed-grid solve never reads a tensor on the host inside its loop (on a GPU
every such read waits for the device), the adaptive loop reads once per attempt, the NaN/Inf checks
still fire with the same error when deferred as on an accelerator, and the fixed grid's precomputed
coefficients give the results of the per-row arithmetic."""

from __future__ import annotations

import pytest
import torch

import fastsde
from fastsde.solvers.core.common import first_order_moves, shared_rows

#: the Tensor methods that copy a value to the host (a synchronisation on an accelerator)
HOST_READS = ("__bool__", "item", "__float__", "__int__", "__index__", "tolist", "numpy")

FIXED = sorted(name for name, spec in fastsde.SOLVERS.items() if not spec.adaptive)


@pytest.fixture
def accelerator_policy(monkeypatch):
    """The counting wrapper's NaN/Inf policy of an accelerator (deferred, looked at after the solve; on
    the CPU it reads each check at once, which costs nothing there)."""
    import fastsde.api
    from fastsde.score import CountingScore

    monkeypatch.setattr(fastsde.api, "defer_finite_checks", lambda device: True)
    monkeypatch.setattr(CountingScore, "FLUSH_EVERY", 10**6)


@pytest.fixture
def host_reads(monkeypatch):
    """Counts every host read of a tensor while the fixture is active."""
    count = {"n": 0}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            count["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return count


def _mixture(sde):
    return fastsde.GaussianMixture(
        torch.tensor([0.5, 0.5]), torch.tensor([[-1.0, 0.5], [1.0, -0.5]]), torch.tensor([0.3, 0.3]), sde=sde
    )


@pytest.mark.parametrize("solver", FIXED)
def test_fixed_grid_loop_reads_nothing_on_the_host(solver, accelerator_policy, host_reads):
    """The number of host reads of a whole solve does not grow with its steps: none per step."""
    sde = fastsde.VPSDE()
    reads = []
    for steps in (6, 13):
        host_reads["n"] = 0
        fastsde.sample(_mixture(sde), sde, (4, 2), solver, seed=0, steps=steps)
        reads.append(host_reads["n"])
    assert reads[0] == reads[1], f"{solver}: {reads[0]} host reads at 6 steps, {reads[1]} at 13"


def test_the_read_counter_sees_reads(host_reads):
    """The fixture counts: a loop that reads once per step is caught (the test above can fail)."""
    x = torch.ones(3)
    for _ in range(5):
        bool(x.any())
    assert host_reads["n"] == 5


def test_fixed_grid_nonfinite_score_raises_with_the_time(accelerator_policy):
    """Deferred to the end of the solve, the NaN check still raises NonFiniteScoreError naming the time."""
    sde = fastsde.VPSDE()
    mix = _mixture(sde)

    def broken(x, t):
        out = mix.score(x, t)
        return torch.where((t < 0.5)[:, None], torch.full_like(out, float("nan")), out)

    with pytest.raises(fastsde.NonFiniteScoreError, match=r"NaN or Inf at t = \[0\.4"):
        fastsde.sample(broken, sde, (4, 2), "dpmpp_2m", seed=0, steps=6, grid="uniform")


def test_fixed_grid_nonfinite_rows_are_counted(accelerator_policy):
    """One bad row of four is named as such (the per-row sums keep the rows apart)."""
    sde = fastsde.VPSDE()
    mix = _mixture(sde)

    def one_bad_row(x, t):
        out = mix.score(x, t).clone()
        out[2, 1] = float("inf")
        return out

    with pytest.raises(fastsde.NonFiniteScoreError, match=r"\(1 of 4 rows\)"):
        fastsde.sample(one_bad_row, sde, (4, 2), "euler", seed=0, steps=5)


GRID_TABLE_CASES = [
    *((name, {}, "edm") for name in ("dpmpp_2m", "dpmpp_2m_sde", "lms", "deis", "ipndm", "unipc", "er_sde")),
    *((name, {}, "vp") for name in ("sa_solver", "dpmpp_3m_sde", "unipc")),
    ("unipc", {"order": 3}, "edm"),
    ("unipc", {"order": 3}, "flow"),
    ("unipc", {"order": 1}, "vp"),
    ("unipc", {"order": 3, "corrector": False}, "vp"),
    ("unipc", {"lower_order_final": False}, "flow"),
    ("dpmpp_2m", {}, "flow"),
    ("dpmpp_3m", {}, "edm"),
    ("dpmpp_3m", {"form": "exact", "lower_order_final": False}, "vp"),
    ("dpmpp_3m", {}, "flow"),
    ("lms", {}, "flow"),
    ("sa_solver", {"predictor_order": 2, "corrector_order": 1}, "flow"),
]


@pytest.mark.parametrize("solver,options,process", GRID_TABLE_CASES)
def test_grid_tables_match_the_per_row_path(solver, options, process):
    """The fixed grid's host decisions and precomputed coefficients (made once per run) give the samples
    of the per-row arithmetic, here forced by hiding what the host knows from the stepper."""
    from fastsde.solvers.core import driver

    sde = {"edm": fastsde.EDM, "vp": fastsde.VPSDE, "flow": fastsde.RectifiedFlow}[process]()
    mix = _mixture(sde)
    kw = dict(seed=3, steps=9, dtype=torch.float64, **options)
    fast = fastsde.sample(mix, sde, (5, 2), solver, **kw)
    original = driver._GridPoints.step

    def per_row(self, *args, **kwargs):
        step = original(self, *args, **kwargs)
        step.k = step.history = step.is_final = step.grid = None
        return step

    try:
        driver._GridPoints.step = per_row
        slow = fastsde.sample(mix, sde, (5, 2), solver, **kw)
    finally:
        driver._GridPoints.step = original
    assert fast.nfe == slow.nfe
    torch.testing.assert_close(fast.samples, slow.samples, rtol=1e-12, atol=1e-12)


def test_host_decisions_follow_the_history():
    """first_order_moves and shared_rows decide on the host when told, and read the rows otherwise."""

    class S:
        moves, is_final, final = 10, False, torch.zeros(2, dtype=torch.bool)

    s = S()
    s.history = 0
    assert first_order_moves(s, None, True) is True
    s.history, s.is_final = 3, True
    assert first_order_moves(s, None, True) is True  # the last move of a short grid
    assert first_order_moves(s, None, False) is False
    s.history = None
    got = first_order_moves(s, torch.tensor([True, False]), True)
    assert got.tolist() == [False, True]
    key = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    calls = []
    out = shared_rows(lambda k: calls.append(k.shape[0]) or k * 2, key, same=True)
    assert calls == [1] and out.tolist() == [[2.0, 4.0], [2.0, 4.0]]
    out = shared_rows(lambda k: calls.append(k.shape[0]) or k * 2, torch.tensor([[1.0], [3.0]]))
    assert calls == [1, 2] and out.tolist() == [[2.0], [6.0]]


@pytest.mark.parametrize("solver", ["adaptive", "adaptive_sde_dpm", "adaptive_sde_dpm_2m", "ode"])
def test_adaptive_loop_reads_the_device_once_per_attempt(solver, host_reads, monkeypatch):
    """Per attempt the adaptive loop's device work (attempt, judge, commit) reads nothing on the host, and
    its tally makes exactly one copy to the host (``Tensor.cpu``) and no other read; ``select`` works on
    host-made bookkeeping only (statuses, counts)."""
    from fastsde.solvers.core import adaptive_loop

    copies = {"n": 0}
    original_cpu = torch.Tensor.cpu

    def counted_cpu(self, *args, **kwargs):
        copies["n"] += 1
        return original_cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counted_cpu)
    seen = {"attempts": 0}
    for phase, allowed in (("attempt", 0), ("judge", 0), ("commit", 0), ("tally", 1)):
        method = getattr(adaptive_loop.AdaptiveSolve, phase)

        def watched(self, *args, _method=method, _phase=phase, _allowed=allowed):
            before = (host_reads["n"], copies["n"])
            out = _method(self, *args)
            reads, cpu = host_reads["n"] - before[0], copies["n"] - before[1]
            assert reads == 0 and cpu == _allowed, f"{_phase}: {reads} reads, {cpu} copies (allowed {_allowed})"
            seen["attempts"] += _phase == "tally"
            return out

        monkeypatch.setattr(adaptive_loop.AdaptiveSolve, phase, watched)
    sde = fastsde.VPSDE()
    # a Brownian tree or memory reads per query and reuse_rejected once to find its rows (documented);
    # the fresh path, GGF's, and a fresh evaluation read none
    known = fastsde.SOLVERS[solver].options
    opts = {k: v for k, v in (("brownian", "fresh"), ("reuse_rejected", False)) if k in known}
    res = fastsde.sample(_mixture(sde), sde, (6, 2), solver, seed=0, **opts)
    assert seen["attempts"] == res.stats["iterations"] > 0


@pytest.mark.parametrize("solver", ["euler", "heun", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m", "unipc"])
def test_fixed_grid_step_traces_under_torch_compile(solver, monkeypatch):
    """The stepper's step, the counted score call inside it included, is traced by torch.compile with
    fullgraph=True (a graph break raises) and gives the samples of the eager step, bit for bit
    (aot_eager: the traced graph run without code generation)."""
    import torch._dynamo

    sde = fastsde.EDM()
    mix = _mixture(sde)
    kw = dict(seed=1, steps=6, x_init=80.0 * torch.randn(3, 2, generator=torch.Generator().manual_seed(0)))
    eager = fastsde.sample(mix, sde, (3, 2), solver, **kw).samples
    cls = fastsde.SOLVERS[solver].stepper
    monkeypatch.setattr(cls, "step", torch.compile(cls.step, backend="aot_eager", fullgraph=True))
    try:  # the step recompiles per grid index (see docs/explanation/architecture.md): allow one graph per move
        with torch._dynamo.config.patch(recompile_limit=64):
            compiled = fastsde.sample(mix, sde, (3, 2), solver, **kw).samples
    finally:
        torch._dynamo.reset()
    assert torch.equal(compiled, eager)

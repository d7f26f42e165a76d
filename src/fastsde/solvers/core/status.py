"""How a solve ends, per sample (:class:`Status`), and the errors of samples that did not reach t_end."""

from __future__ import annotations

from enum import IntEnum

from torch import Tensor

from ...score import NonFiniteScoreError

__all__ = ["Status", "IntegrationError", "BudgetError", "NonFiniteSolveError", "MAX_NONFINITE", "unfinished_error"]


class Status(IntEnum):
    """Per-sample status of a solve."""

    RUNNING = 0
    DONE = 1
    BUDGET = 2  # the NFE budget ran out before t_end
    STOPPED = 3  # the callback asked to stop
    STEP_TOO_SMALL = 4  # the step fell below the floating-point spacing of the coordinate
    NONFINITE_START = 5  # the first evaluation was not finite
    NONFINITE = 6  # MAX_NONFINITE attempts in a row had a non-finite error (the score returned NaN/Inf)

    @property
    def label(self) -> str:
        return self.name.lower()


class IntegrationError(RuntimeError):
    """Some samples did not reach the end time; the message says how many and why."""


class BudgetError(IntegrationError):
    """Some samples did not reach t_end within the per-sample NFE budget ``max_nfe``."""


class NonFiniteSolveError(IntegrationError, NonFiniteScoreError):
    """Adaptive samples stopped because every attempt in a row gave NaN/Inf (a broken score, not a
    tolerance problem); also a :class:`~fastsde.score.NonFiniteScoreError`, as fixed-step solvers raise."""


#: Non-finite attempts in a run after which an adaptive sample stops (status "nonfinite"): each
#: shrinks h by the controller's nonfinite factor (0.1 or 0.2), so after ten the score is NaN/Inf
#: however small the step, and more attempts only burn the budget. A run ends with a finite attempt
#: at a step within a factor 100 of the one that first failed, so a sample creeping up to a NaN region
#: with ever smaller accepted steps in between stays in its run; one whose step falls below ten
#: floating-point spacings of its coordinate after a non-finite attempt stops with the same status.
MAX_NONFINITE = 10


def unfinished_error(status: Tensor, t: Tensor, n: int, t_end: float, max_nfe: int | None, hint: str) -> Exception:
    """One message naming how many samples did not finish, why, and where they stopped."""
    bad = (status != Status.DONE) & (status != Status.STOPPED)
    where = t[bad.to(t.device)]
    k_budget = int((status == Status.BUDGET).sum())
    head = f"{int(bad.sum())} of {n} samples did not reach t_end = {t_end:g}"
    if k_budget:
        head += f" within max_nfe = {max_nfe} score evaluations per sample"
    broken = (status == Status.NONFINITE) | (status == Status.NONFINITE_START)
    if bool(broken.any()):
        k = int(broken.sum())
        times = sorted({round(float(v), 6) for v in t[broken.to(t.device)].tolist()})
        shown = ", ".join(f"{v:.6g}" for v in times[:5]) + (", ..." if len(times) > 5 else "")
        msg = (
            f"the score returned NaN or Inf: {k} of {n} samples stopped at t = [{shown}] (non-finite at "
            f"the start, or in {MAX_NONFINITE} attempts in a row with ever smaller steps: a larger max_nfe or "
            "a looser tolerance would not help); check the score near these times"
        )
        if k_budget:
            msg += f"; {k_budget} more did not finish within max_nfe = {max_nfe}"
        return NonFiniteSolveError(msg)
    others = [
        f"{int((status == st).sum())} {st.label.replace('_', ' ')}"
        for st in (Status.STEP_TOO_SMALL,)
        if bool((status == st).any())
    ]
    if others:
        head += f" ({', '.join(others)})"
    msg = (
        f"{head}; they stopped at t in [{float(where.min()):.6g}, {float(where.max()):.6g}]. {hint}, "
        "or pass on_budget='partial' to get partial results"
    )
    return BudgetError(msg) if k_budget else IntegrationError(msg)

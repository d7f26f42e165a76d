"""The exact-floor check of test_flow_floor.py under SD3's shift 3 (its own file, so that pytest-xdist's
loadfile distribution gives each half to a worker)."""

from __future__ import annotations

import pytest
from test_flow_floor import SOLVERS, check_floor


@pytest.mark.parametrize("dim", [16, 64])
@pytest.mark.parametrize("name", SOLVERS)
def test_every_solver_reaches_the_exact_floor_shifted(name, dim):
    check_floor(name, 3.0, dim)

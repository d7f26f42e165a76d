"""Results do not move: every solver and log_likelihood reproduce the outputs recorded in
tests/data/golden.safetensors (see tests/golden.py) bit for bit, unless a case is listed in
TOLERANT with the reason its summation order changed."""

from __future__ import annotations

import golden
import pytest
import torch

#: case key -> (absolute tolerance, why it is not bit for bit). Empty: every case is exact.
TOLERANT: dict[str, tuple[float, str]] = {}


@pytest.fixture(scope="module")
def recorded() -> dict[str, torch.Tensor]:
    return golden.load()


def _compare(recorded: dict[str, torch.Tensor], key: str, values: dict[str, torch.Tensor]) -> None:
    expected = {k[len(key) + 1 :]: v for k, v in recorded.items() if k.startswith(key + "/")}
    assert expected, f"no golden record for {key}"
    for name, want in expected.items():
        assert name in values, f"{key}: result lacks {name}"
        got = values[name].to(want.dtype)
        if key in TOLERANT:
            tol = TOLERANT[key][0]
            assert torch.allclose(got, want, rtol=0, atol=tol, equal_nan=True), f"{key}/{name} moved beyond {tol}"
        else:
            assert (
                torch.equal(got, want)
                or (got.isnan() == want.isnan()).all()
                and torch.equal(got.nan_to_num(), want.nan_to_num())
            ), f"{key}/{name} moved: max |diff| {float((got - want).abs().max()):.3g}"


@pytest.mark.parametrize(
    "key,proc,solver,opts", list(golden.sample_cases()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_sampler_outputs_unchanged(recorded, key, proc, solver, opts):
    res = golden.sample_case(proc, solver, opts)
    values = {"samples": res.samples, "nfe": res.nfe_per_sample}
    for stat in ("accepted", "rejected"):
        if stat in res.stats:
            values[stat] = torch.as_tensor(res.stats[stat])
    _compare(recorded, key, values)


@pytest.mark.parametrize(
    "key,proc,opts", list(golden.likelihood_cases()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_likelihood_outputs_unchanged(recorded, key, proc, opts):
    res = golden.likelihood_case(proc, opts)
    _compare(recorded, key, {"logp": res.logp, "nfe": res.nfe_per_sample})

"""The README's two integration snippets run as written (the pipeline from a tiny local UNet instead of
the Hub: nothing is downloaded in tests)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from diffusers_models import DATA_VAR, tiny_unet

README = Path(__file__).resolve().parents[1] / "README.md"
torch.set_num_threads(1)


HEADING = "In your diffusers pipeline or k-diffusion code"


def blocks(heading: str = HEADING) -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_snippets_are_short():
    found = blocks()
    assert len(found) == 2
    for code in found:
        assert len(code.strip().splitlines()) <= 5, code
        assert max(len(line) for line in code.splitlines()) <= 120


def test_diffusers_snippets_run(monkeypatch):
    unet = tiny_unet(channels=3)
    unet.config.sample_size = 8
    monkeypatch.setattr(DDPMPipeline, "from_pretrained", classmethod(lambda cls, name: cls(unet, DDPMScheduler())))
    namespace: dict = {}
    exec(blocks()[0], namespace)  # noqa: S102
    assert len(namespace["images"]) == 1 and namespace["images"][0].size == (8, 8)
    assert namespace["pipe"].scheduler.result.nfe == 8
    # the sentence after the snippets: sample_pipeline runs any solver, adaptive ones included
    from fastsde.diffusers import sample_pipeline

    out = sample_pipeline(namespace["pipe"], solver="adaptive_dpmpp_3m", batch_size=4)
    assert len(out.images) == 4 and out.nfe > 0 and out.result.solver == "adaptive_dpmpp_3m"


def test_k_diffusion_snippet_runs():
    def model(x, sigma, cond, cond_scale):
        s = sigma.reshape(-1, 1, 1, 1)
        return cond.reshape(-1, 1, 1, 1) + (x - cond.reshape(-1, 1, 1, 1)) * DATA_VAR / (DATA_VAR + s * s)

    sigmas = torch.tensor([80.0, 20.0, 5.0, 1.0, 0.2, 0.002, 0.0])
    namespace = {"model": model, "sigmas": sigmas, "cond": torch.tensor([-3.0, 3.0])}
    namespace["x"] = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 80.0
    exec(blocks()[1], namespace)  # noqa: S102
    x0 = namespace["x0"]
    assert x0.shape == (2, 1, 4, 4)
    assert x0[0].mean() == pytest.approx(-3.0, abs=1.5) and x0[1].mean() == pytest.approx(3.0, abs=1.5)

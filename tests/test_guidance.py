"""Guidance: classifier-free guidance (CFGScore) and classifier guidance (ClassifierGuidance) on an exact
class-conditional mixture, their NFE and network-evaluation counts, and a conditional model trained by
`fastsde train --conditional` for 2 steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fastsde
from fastsde.cli import main
from fastsde.problems import conditional_mixture_2d

torch.set_num_threads(1)

LABELS = torch.tensor([0, 1, 2, 0, 1, 2])


@pytest.fixture(scope="module")
def problem():
    sde = fastsde.VPSDE()
    return sde, conditional_mixture_2d(sde)


def _point(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.5, torch.rand(n, generator=g, dtype=torch.float64)


def test_cfg_ends_are_the_conditional_and_unconditional_models(problem):
    sde, mix = problem
    x, t = _point()
    cond = {"class_labels": LABELS}
    s_c = mix(x, t, LABELS)
    s_u = mix.unconditional(x, t)
    assert torch.equal(fastsde.CFGScore(mix, 1.0, {"class_labels": mix.null_label})(x, t, **cond), s_c)
    torch.testing.assert_close(fastsde.CFGScore(mix, 0.0, {"class_labels": mix.null_label})(x, t, **cond), s_u)
    w = 3.0
    torch.testing.assert_close(
        fastsde.CFGScore(mix, w, {"class_labels": mix.null_label})(x, t, **cond), s_u + w * (s_c - s_u)
    )


def test_cfg_is_one_batched_call_one_nfe_two_network_evals(problem):
    sde, mix = problem
    calls = []

    def score(x, t, class_labels):
        calls.append((x.shape[0], class_labels.tolist()))
        return mix(x, t, class_labels)

    guided = fastsde.CFGScore(score, 2.0, {"class_labels": mix.null_label}, sde=sde)
    res = fastsde.sample(
        guided, sde, (6, 2), solver="ddim", steps=5, seed=0, dtype=torch.float64, cond={"class_labels": LABELS}
    )
    assert res.calls == len(calls) == 5  # 4 moves + the denoise, each ONE call of 2n rows
    assert all(rows == 12 and labels == LABELS.tolist() + [3] * 6 for rows, labels in calls)
    assert res.nfe == 5.0 and res.network_evals == 10.0
    assert res.config()["network_evals"] == 10.0
    plain = fastsde.sample(
        mix, sde, (6, 2), solver="ddim", steps=5, seed=0, dtype=torch.float64, cond={"class_labels": LABELS}
    )
    assert plain.network_evals == plain.nfe and "network_evals" not in plain.config()


def test_cfg_with_compaction_counts_only_the_running_rows(problem):
    sde, mix = problem
    guided = fastsde.CFGScore(mix, 2.0, {"class_labels": mix.null_label})
    kw = dict(solver="adaptive", seed=1, dtype=torch.float64, cond={"class_labels": LABELS}, eps_rel=0.05, eps_abs=0.05)
    a = fastsde.sample(guided, sde, (6, 2), compact=True, **kw)
    b = fastsde.sample(guided, sde, (6, 2), compact=False, **kw)
    torch.testing.assert_close(a.samples, b.samples, rtol=1e-10, atol=1e-12)
    assert a.network_evals == pytest.approx(2 * a.nfe)


def test_cfg_pushes_away_from_the_unconditional_model(problem):
    """Class-0 samples move away from the unconditional mean as w grows (0 → 1 → 4), and the exact
    classifier at t = 0.3 grows more confident of class 0 (exact problem, same noise)."""
    sde, mix = problem
    labels = torch.zeros(64, dtype=torch.long)
    centre = (mix.unconditional.weights[:, None] * mix.unconditional.means).sum(0)
    dist, conf = [], []
    for w in (0.0, 1.0, 4.0):
        guided = fastsde.CFGScore(mix, w, {"class_labels": mix.null_label})
        kw = dict(solver="dpmpp_2m", steps=20, seed=0, dtype=torch.float64, cond={"class_labels": labels})
        x = fastsde.sample(guided, sde, (64, 2), **kw).samples
        dist.append(float((x.mean(0) - centre).norm()))
        conf.append(float(torch.softmax(mix.logits(x, torch.full((64,), 0.3, dtype=torch.float64)), 1)[:, 0].mean()))
    assert dist[0] < dist[1] < dist[2] and conf[0] < conf[1] < conf[2]


def test_classifier_guidance_equals_the_analytic_guided_score(problem):
    """With the exact classifier p(y | x, t) of the mixture, s_u + γ ∇ log p(y | x, t) = s_u + γ (s_y − s_u),
    which is also CFG at w = γ."""
    sde, mix = problem
    x, t = _point(seed=3)
    gamma = 2.5
    cg = fastsde.ClassifierGuidance(mix.unconditional, mix.logits, gamma)
    got = cg(x, t, class_labels=LABELS)
    s_u, s_c = mix.unconditional(x, t), mix(x, t, LABELS)
    torch.testing.assert_close(got, s_u + gamma * (s_c - s_u), rtol=1e-9, atol=1e-9)
    # and under sample(), which runs under no_grad: the wrapper enables autograd itself
    kw = dict(solver="dpmpp_2m", steps=6, seed=2, dtype=torch.float64, cond={"class_labels": LABELS})
    a = fastsde.sample(cg, sde, (6, 2), **kw)
    b = fastsde.sample(fastsde.CFGScore(mix, gamma, {"class_labels": mix.null_label}), sde, (6, 2), **kw)
    torch.testing.assert_close(a.samples, b.samples, rtol=1e-8, atol=1e-9)
    assert a.network_evals == a.nfe  # the classifier is not a network evaluation of the score


def test_guidance_errors(problem):
    sde, mix = problem
    with pytest.raises(ValueError, match="scale must be a finite number"):
        fastsde.CFGScore(mix, float("nan"), {"class_labels": 3})
    with pytest.raises(ValueError, match="null_cond must name"):
        fastsde.CFGScore(mix, 2.0, {})
    with pytest.raises(ValueError, match=r"CFGScore needs the conditioning \['class_labels'\]"):
        fastsde.sample(fastsde.CFGScore(mix, 2.0, {"class_labels": 3}), sde, (2, 2), solver="ddim", steps=3)
    with pytest.raises(ValueError, match=r"ClassifierGuidance needs the labels as cond\['class_labels'\]"):
        fastsde.sample(
            fastsde.ClassifierGuidance(mix.unconditional, mix.logits, 1.0), sde, (2, 2), solver="ddim", steps=3
        )


@pytest.fixture(scope="module")
def cond_model(tmp_path_factory):
    """A class-conditional model trained by `fastsde train --conditional` for 2 steps on a tiny labelled .npz."""
    root = tmp_path_factory.mktemp("cond")
    data = root / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(data, images=rng.integers(0, 17, size=(20, 8, 8)).astype(np.uint8), labels=np.arange(20) % 4)
    out = root / "ck"
    args = ["train", "--data", str(data), "--out", str(out), "--channels", "8,16", "--batch-size", "4", "--conditional"]
    assert main([*args, "--steps", "2", "--quiet"]) == 0
    return out


def test_conditional_model_loads_and_samples_with_labels(cond_model, tmp_path):
    model = fastsde.load_model(cond_model)
    assert model.num_classes == 4 and model.null_cond == {"class_labels": 4}
    labels = torch.tensor([0, 1, 2, 3])
    res = fastsde.sample(
        model.score,
        model.sde,
        (4, *model.shape),
        solver="ddim",
        steps=3,
        seed=[10, 11, 12, 13],
        cond={"class_labels": labels},
    )
    assert res.samples.isfinite().all()
    one = fastsde.sample(
        model.score, model.sde, (1, *model.shape), solver="ddim", steps=3, seed=[10], cond={"class_labels": labels[:1]}
    )
    torch.testing.assert_close(res.samples[:1], one.samples, rtol=1e-4, atol=1e-3)
    other = fastsde.sample(
        model.score,
        model.sde,
        (4, *model.shape),
        solver="ddim",
        steps=3,
        seed=[10, 11, 12, 13],
        cond={"class_labels": labels.flip(0)},
    )
    assert not torch.equal(res.samples, other.samples)  # the labels reach the network
    guided = fastsde.sample(
        model.guided(2.0), model.sde, (4, *model.shape), solver="ddim", steps=3, seed=0, cond={"class_labels": labels}
    )
    assert guided.network_evals == 2 * guided.nfe == 6.0
    # the adapter of a plain diffusers UNet passes class_labels too
    adapter = fastsde.DiffusersUNetScore(model.network.unet, model.sde)
    x, t = torch.randn(4, *model.shape), torch.full((4,), 0.5)
    torch.testing.assert_close(
        adapter(x, t, class_labels=labels), model.score(x, t, class_labels=labels), rtol=1e-5, atol=1e-5
    )


def test_cli_samples_with_label_and_guidance(cond_model, tmp_path, capsys):
    out = tmp_path / "s.npz"
    args = ["sample", "--model", str(cond_model), "--solver", "ddim", "--steps", "3", "--n", "4", "--out", str(out)]
    assert main([*args, "--label", "0-3", "--guidance", "2", "--no-metric"]) == 0
    text = capsys.readouterr().out
    assert "network evaluations" in text
    record = json.loads((tmp_path / "s.npz.json").read_text())
    assert record["labels"] == [0, 1, 2, 3] and record["guidance"] == 2.0 and record["network_evals"] == 6.0
    assert main([*args, "--label", "7", "--no-metric"]) == 2  # a label the model does not know
    assert "--label" in capsys.readouterr().err


def test_iia_with_a_model_folder(cond_model, tmp_path, capsys):
    """fit-iia and sample --solver iia_* take --model PATH (the table is named after the folder)."""
    fit = ["fit-iia", "--model", str(cond_model), "--solver", "dpmpp_2m", "--steps", "3", "--n", "8"]
    assert main([*fit, "--fine-steps", "12", "--out", str(tmp_path), "--quiet"]) == 0
    table = tmp_path / "ck-dpmpp_2m-3.safetensors"
    assert table.is_file()
    out = tmp_path / "s.npz"
    args = ["sample", "--model", str(cond_model), "--solver", "iia_dpmpp_2m", "--steps", "3", "--n", "4"]
    assert main([*args, "--table", str(table), "--out", str(out), "--no-metric"]) == 0
    assert main([*args, "--out", str(out), "--no-metric"]) == 2  # no table: the hint names the command
    assert "fastsde fit-iia --model" in capsys.readouterr().err


def test_shipped_conditional_model(tmp_path, capsys):
    """digits-cond ships with its null label; `fastsde sample --model digits-cond --label 3 --guidance 2` runs."""
    model = fastsde.load_model("digits-cond")
    assert model.num_classes == 10 and model.null_cond == {"class_labels": 10}
    assert model.config["unet"]["num_class_embeds"] == 11
    out = tmp_path / "s.png"
    args = ["sample", "--model", "digits-cond", "--label", "3", "--guidance", "2", "--solver", "ddim", "--steps", "3"]
    assert main([*args, "--n", "4", "--out", str(out), "--no-metric"]) == 0
    text = capsys.readouterr().out
    assert "NFE 3.0" in text and "network evaluations 6.0" in text and out.is_file()

"""Samplers under classifier-free guidance on the shipped class-conditional digits model (the tables of
docs/benchmarks/guidance.md, "NFE to converged quality" and "Every run").

For guidance w in (1, 2, 4): 10 samples per class (labels 0..9, n = 100, the same seeds for every row),
each fixed-step solver at a few step counts and adaptive_sde_dpm_2m at two tolerances, against a
reference (dpmpp_2m, 60 steps, same noise). Columns: NFE (score evaluations per sample; each is 2
network evaluations under CFG), accuracy of the requested label (the shipped digits classifier),
per-class FD (samples of a class against the held-out images of that class, mean over classes),
the unconditional FD, and for deterministic solvers the RMSE to the reference from the same x_T.
"NFE to converged" is the smallest NFE whose per-class FD is within 10 % of the reference's and whose
accuracy is within 0.02 of it.

    nice -n 5 .venv-peers/bin/python benchmarks/guidance.py [--model digits-cond] [--write]

--write writes the tables to docs/bench/guidance.md, from which they are copied into the page.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import fastsde
from fastsde.metrics.digits import class_conditional_quality

TITLE = "# Classifier-free guidance on the class-conditional digits model"
OUT = Path(__file__).resolve().parent.parent / "docs" / "bench" / "guidance.md"
SCALES = (1.0, 2.0, 4.0)
FIXED = {s: (5, 10, 20) for s in ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "lms")}
#: peers given the same guided score (the labels fixed per row: peers always evaluate the whole batch)
PEERS = ("kdiff_dpmpp_2m", "kdiff_lms", "kdiff_heun", "diffusers_unipc_karras", "diffusers_dpmsolver_2m_karras")
PEER_BUDGETS = (5, 10, 20)
ADAPTIVE = {"adaptive_sde_dpm_2m": ({"eps_rel": 0.1, "eps_abs": 0.1}, {})}  # loose, and the defaults
REFERENCE = ("dpmpp_2m", {"steps": 60})
#: a deterministic sampler has converged when its RMSE to the reference (same x_T) is at most this
#: (pixels in [−1, 1]; 0.05 is about 1/40 of the range) and its accuracy within 0.02 of the reference's
RMSE_CONVERGED = 0.05


def run(model, scale: float, labels: torch.Tensor, solver: str, opts: dict) -> dict:
    score = model.guided(scale)
    start = time.perf_counter()
    res = fastsde.sample(
        score, model.sde, (labels.shape[0], *model.shape), solver=solver, seed=0, cond={"class_labels": labels}, **opts
    )
    wall = time.perf_counter() - start
    q = class_conditional_quality(res.samples, labels)
    return {"res": res, "q": q, "wall": wall}


def run_peer(model, scale: float, labels: torch.Tensor, name: str, budget: int) -> dict | None:
    """A peer (fastsde.bench.peers) on the guided score with the labels closed over, from the x_T
    fastsde.sample(seed=0) starts from; None when the peer is not installed."""
    from fastsde.bench.peers import PEERS as ALL
    from fastsde.noise import NoiseSource, Stream

    peer = ALL[name]
    if not peer.available()[0]:
        return None
    guided = model.guided(scale)

    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guided(x, t, class_labels=labels)

    n = labels.shape[0]
    x_T = model.sde.prior_sample(NoiseSource.from_seed(0, n).normal(model.shape, Stream.PRIOR, 0))
    start = time.perf_counter()
    out = peer.run(score, model.sde, x_T, budget, model.sde.default_t_end)
    wall = time.perf_counter() - start
    q = class_conditional_quality(out.samples, labels)
    return {"samples": out.samples, "nfe": out.nfe, "q": q, "wall": wall, "stochastic": peer.stochastic}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits-cond")
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--write", action="store_true", help="write the tables to docs/bench/guidance.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = fastsde.load_model(args.model)
    labels = torch.arange(10).repeat(args.per_class)
    lines = [
        TITLE,
        "",
        f"`nice -n 5 .venv-peers/bin/python benchmarks/guidance.py --write` on `{args.model}` "
        f"({model.config.get('training', {}).get('steps', '?')} training steps), n = {labels.shape[0]} "
        f"({args.per_class} per class, seed 0, float32, one CPU thread). NFE counts score evaluations per sample; "
        "under CFG each is one batched call of the conditional and the null-label rows, i.e. 2 network "
        "evaluations (`res.network_evals`). acc: share of samples the digits classifier assigns to the "
        "requested label. class FD: mean over classes of the FD between that class's samples and its "
        f"held-out images (real train images, {args.per_class} per class, score {{floor}} on it). "
        "RMSE: to the reference (dpmpp_2m, 60 steps) from the same x_T, deterministic solvers only. "
        f"converged: acc within 0.02 of the reference and, for deterministic samplers, RMSE to the reference "
        f"≤ {RMSE_CONVERGED:g}; for stochastic ones, class FD within 10 % of the reference's (noisy at this n). "
        "Peers (k-diffusion, diffusers via fastsde.bench.peers) get the same guided score with the labels "
        "fixed per row and start from the same x_T; their NFE is counted by the same wrapper.",
        "",
        "| w | solver | setting | NFE | network evals | acc | class FD | FD | RMSE to ref | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    from fastsde.data import digits_labels, load_digits

    real_idx = torch.cat([(digits_labels("train") == y).nonzero().squeeze(1)[: args.per_class] for y in range(10)])
    floor = class_conditional_quality(load_digits("train")[real_idx], digits_labels("train")[real_idx])
    lines[2] = lines[2].replace("{floor}", f"{floor['class_fd']:.1f} (acc {floor['accuracy']:.3f})")
    summary = []
    for w in SCALES:
        ref = run(model, w, labels, REFERENCE[0], REFERENCE[1])
        ref_q = ref["q"]
        rows = [(REFERENCE[0], f"steps={REFERENCE[1]['steps']} (reference)", ref)]
        for solver, steps in FIXED.items():
            for s in steps:
                rows.append((solver, f"steps={s}", run(model, w, labels, solver, {"steps": s})))
        for solver, settings in ADAPTIVE.items():
            for opts in settings:
                tag = ", ".join(f"{k}={v:g}" for k, v in opts.items()) or "defaults"
                rows.append((solver, tag, run(model, w, labels, solver, opts)))
        for name in PEERS:
            for b in PEER_BUDGETS:
                got = run_peer(model, w, labels, name, b)
                if got is not None:
                    rows.append((name, f"budget={b}", got))
        best: dict[str, float] = {}
        for solver, tag, r in rows:
            if "res" in r:
                samples, nfe, net = r["res"].samples, r["res"].nfe, r["res"].network_evals
                det = not fastsde.SOLVERS[solver].is_stochastic(r["res"].options)
            else:  # a peer: CFG is one batched call per evaluation, 2 network evaluations
                samples, nfe, net, det = r["samples"], r["nfe"], 2 * r["nfe"], not r["stochastic"]
            q = r["q"]
            rmse = float((samples - ref["res"].samples).pow(2).mean().sqrt()) if det and r is not ref else math.nan
            if det:  # deterministic: pathwise to the reference from the same x_T
                ok = rmse <= RMSE_CONVERGED and q["accuracy"] >= ref_q["accuracy"] - 0.02
            else:
                ok = q["class_fd"] <= 1.1 * ref_q["class_fd"] and q["accuracy"] >= ref_q["accuracy"] - 0.02
            if ok and r is not ref:
                best[solver] = min(best.get(solver, math.inf), nfe)
            rmse_s = "—" if math.isnan(rmse) else f"{rmse:.4f}"
            lines.append(
                f"| {w:g} | {solver} | {tag} | {nfe:.1f} | {net:.1f} | {q['accuracy']:.3f} | "
                f"{q['class_fd']:.1f} | {q['fd']:.2f} | {rmse_s} | {r['wall']:.1f} |"
            )
            print(lines[-1], flush=True)
        summary.append((w, best, ref_q))
    lines += [
        "",
        "NFE to converged quality (smallest NFE in the table meeting the rule; — : none of the settings):",
        "",
    ]
    names = [*FIXED, *ADAPTIVE, *PEERS]
    lines.append("| w | reference acc | reference class FD | " + " | ".join(names) + " |")
    lines.append("|---|---|---|" + "---|" * len(names))
    for w, best, ref_q in summary:
        cells = [f"{best[s]:.0f}" if s in best else "—" for s in names]
        lines.append(f"| {w:g} | {ref_q['accuracy']:.3f} | {ref_q['class_fd']:.1f} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(text)
        print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

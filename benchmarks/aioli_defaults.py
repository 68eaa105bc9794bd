#!/usr/bin/env python
"""Aioli's update defaults on a simulated linear mixing law: ``update="eg"`` vs ``update="ema"``.

Aioli (Chen, Hu, Lourie, Cho, Ré, "Aioli: A Unified Optimization Framework for Language
Model Data Mixing", ICLR 2025) assumes the per-domain losses follow a *linear dynamic
mixing law* over a round: ``L_{t+1} = L_t - A_t p_t``. This benchmark builds such a law and
lets :class:`mixflow.mixture.aioli.AioliPolicy` drive it through its real protocol (every
``Mixture.steps`` / ``eval_after`` honoured, sweep compositions reported as counts, eval
losses after every ``eval_after`` step), once with ``update="eg"`` (Algorithm 1: the new
mixture multiplies the previous one) and once with ``update="ema"`` (the reference
scripts' variant: an EMA of the estimates re-applied to the anchor), both with the
default ``normalize=True`` and the paper settings of the nearest m. The stratified
(uniform) mixture is the baseline.

The law, per step with mixture ``p`` (``n_j`` the steps' worth of domain j seen so far):

- ``fixed``: ``L <- L - lr * A p + noise``, ``A = diag(a) + off-diagonal transfer``, with
  ``a`` drawn per domain (some domains are worth more than others);
- ``saturating``: the same with column j of ``A`` scaled by ``1 / (1 + n_j / n0)``: data
  of a domain already seen a lot helps less, so the best mixture is interior rather than a
  vertex.

Metric: the mean over domains of the final loss, as the *share of stratified's loss drop*
that a policy adds: ``gain = (L_strat - L_policy) / (L_0 - L_strat)`` (positive: better
than stratified). Reported per law and m: mean ± sd of ``gain`` over seeds, how many
seeds beat stratified, and the L1 distance of the final mixture from uniform.

Usage::

    python benchmarks/aioli_defaults.py [--seeds 10] [--steps 2000] [--domains 2,3,4,7] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from mixflow.mixture.aioli import AioliPolicy  # noqa: E402
from mixflow.mixture.policy import Feedback  # noqa: E402
from mixflow.mixture.schedule import ExactSchedule  # noqa: E402

LAWS = ("fixed", "saturating")
BATCH = 16


def make_law(m: int, rng: np.random.Generator) -> np.ndarray:
    """``A``: a per-domain self-benefit between 0.2 and 2 plus weak non-negative transfer."""
    return np.diag(rng.uniform(0.2, 2.0, m)) + rng.uniform(0.0, 0.3, (m, m)) * (1 - np.eye(m))


def simulate(policy: AioliPolicy | None, A: np.ndarray, law: str, steps: int, seed: int,
             lr: float = 1e-3, noise: float = 1e-4, n0: float = 200.0) -> tuple[np.ndarray, np.ndarray]:
    """Final per-domain losses and the last trained mixture after ``steps`` training steps
    (policy None: stratified). Evaluation steps (``steps=0``) are free, as in the pipeline."""
    m = len(A)
    rng = np.random.default_rng([seed, 1])
    schedule = ExactSchedule(m, np.random.default_rng([seed, 2]))
    loss = np.full(m, 5.0)
    seen = np.zeros(m)
    used: dict[int, int] = {}
    trained = np.full(m, 1.0 / m)
    step = 0
    while step < steps:
        mix = policy.mixture() if policy is not None else None
        p = np.full(m, 1.0 / m) if mix is None else mix.p
        version = 0 if mix is None else mix.version
        empty = mix is not None and mix.steps == 0
        n = used.get(version, 0) + 1
        used[version] = n
        if not empty:
            schedule.set_mixture(p, version)
            counts = np.bincount(schedule.take(BATCH), minlength=m)
            q = counts / BATCH
            scale = 1.0 / (1.0 + seen / n0) if law == "saturating" else np.ones(m)
            loss = np.maximum(loss - lr * (A * scale[None, :]) @ q + rng.normal(0, noise, m), 0.0)
            seen += q
            trained = p
            if policy is not None:
                policy.observe(Feedback(version=version, step=step, train_loss=loss.copy(),
                                        counts=counts.astype(np.float64), tokens=counts * 128.0))
            step += 1
        if mix is not None and mix.eval_after and (mix.steps is None or n >= max(mix.steps, 1)):
            policy.observe(Feedback(version=version, step=step, eval_loss=loss + rng.normal(0, noise, m)))
    return loss, np.asarray(trained)


def run(seeds: int, steps: int, domains: list[int]) -> list[dict]:
    rows = []
    for law in LAWS:
        for m in domains:
            gains: dict[str, list[float]] = {"eg": [], "ema": []}
            moved: dict[str, list[float]] = {"eg": [], "ema": []}
            for seed in range(seeds):
                A = make_law(m, np.random.default_rng([seed, m]))
                strat, _ = simulate(None, A, law, steps, seed)
                drop = 5.0 - strat.mean()
                for update in gains:
                    policy = AioliPolicy(m, update=update, total_steps=steps, seed=seed)
                    final, p = simulate(policy, A, law, steps, seed)
                    gains[update].append(float((strat.mean() - final.mean()) / drop))
                    moved[update].append(float(np.abs(p - 1.0 / m).sum()))
            for update in gains:
                g = np.asarray(gains[update])
                rows.append({"law": law, "m": m, "update": update, "gain_mean": float(g.mean()),
                             "gain_sd": float(g.std(ddof=1)) if len(g) > 1 else 0.0,
                             "wins": int((g > 0).sum()), "seeds": seeds,
                             "l1_from_uniform": float(np.mean(moved[update]))})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--domains", default="2,3,4,7")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = run(args.seeds, args.steps, [int(x) for x in args.domains.split(",")])
    print("| law | m | update | gain vs stratified (mean ± sd) | seeds better | L1 of final p from uniform |")
    print("|---|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['law']} | {r['m']} | {r['update']} | {r['gain_mean']:+.3f} ± {r['gain_sd']:.3f} | "
              f"{r['wins']}/{r['seeds']} | {r['l1_from_uniform']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

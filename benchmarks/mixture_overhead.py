#!/usr/bin/env python
"""What online reweighting costs the data plane: tokens/s with a policy updating vs a static mixture.

Part A (same run, same Ray session, same shards): the token pipeline delivers batches
to 2 ranks that train the counting unigram model (real per-domain losses, almost no
compute, so the data plane is what is timed) — once with a static mixture and once
with each adaptive policy — alternating ``--repeats`` times; tokens/s is the median
over repeats and each policy is reported as a ratio to static (target >= 0.9x).

Part B: controller update latency at ``--domains`` (default 64) domains. A
``MixtureController`` actor for each policy is driven through its real protocol by two
simulated ranks: ``mixture_for_step`` for every step, a train report per rank, an eval
report when a step carries ``eval_after``; the losses follow a linear mixing law
``L <- L - A p`` with noise. Reported: the controller's own update latency (merge +
policy update + publication, p50 / p99; target p99 < 10 ms) and the round-trip latency
of a ``report`` call seen by a rank.

Usage::

    python benchmarks/mixture_overhead.py [--steps 300] [--repeats 3] [--domains 64]
        [--policies aioli,odm,...] [--out results.json]

Every adaptive policy gets its inputs (:func:`policy_inputs`), so each one updates (its
"mixture versions" column, the fewest over the repeats, is > 1); a row that did not is
marked "(no updates)" instead of PASS / MISS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from mixflow.config import validate_spec  # noqa: E402

LATENCY_TARGET_MS = 10.0
THROUGHPUT_TARGET = 0.9


DOMAINS = ["python", "c_headers", "docs", "licenses"]
ALL_ADAPTIVE = "aioli,odm,ado,tikmix_d,tikmix_m,doremi,doge,skill_it"


def policy_inputs(policy: str, ref_loss: list[float] | None) -> dict:
    """What each policy needs to move in a few hundred unigram steps: DoReMi a reference-loss
    table (the static run's final test losses: DoReMi's table route); DoGE a step size (the
    unigram model has no learning rate; DoGE scales by it). The others run on defaults: the
    unigram model reports gradient statistics for TiKMiX and DoGE, evals for Aioli and Skill-It."""
    if policy == "doremi":
        return {"ref_loss": ref_loss}
    if policy == "doge":
        return {"eta": 0.05}
    return {}


def pipeline_spec(shards: Path, run_dir: Path, policy: str, steps: int, seed: int, params: dict | None = None):
    return validate_spec({
        "kind": "tokens", "name": f"overhead_{policy}", "seed": seed, "run_dir": str(run_dir),
        "data": {"shards": str(shards), "machine_domains": DOMAINS,
                 "max_bytes_per_domain": "1MiB", "seq_len": 128, "eval_sequences": 32},
        "mixture": {"policy": policy, "params": params or {}},
        "channel": {"max_items": 4, "max_bytes": "4MiB"},
        "trainer": {"ranks": 2, "steps": steps, "batch_size": 16, "model": "unigram", "eval_every": 0},
    })


def throughput(policies: list[str], steps: int, repeats: int, work: Path, console: Console) -> dict:
    from mixflow.runtime.token_pipeline import TokenPipeline

    shards = work / "domains"
    runs: dict[str, list[float]] = {p: [] for p in ["static", *policies]}
    versions: dict[str, int] = {}
    ref_loss: list[float] | None = None
    for rep in range(repeats):
        for policy in runs:  # static first: its test losses are DoReMi's reference table
            name = "stratified" if policy == "static" else policy
            spec = pipeline_spec(shards, work / f"run_{policy}_{rep}", name, steps, seed=rep,
                                 params=policy_inputs(policy, ref_loss))
            summary = TokenPipeline(spec, console, show_progress=False).run()
            if policy == "static":
                ref_loss = summary.test_loss
            runs[policy].append(summary.tokens_per_s)
            versions[policy] = min(versions.get(policy, summary.controller["version"] + 1),
                                   summary.controller["version"] + 1)  # the fewest over repeats
            console.print(f"  repeat {rep}: {policy:>10} {summary.tokens_per_s:,.0f} tokens/s "
                          f"({versions[policy]} mixture versions)")
    base = statistics.median(runs["static"])
    return {p: {"tokens_per_s": statistics.median(v), "runs": v, "ratio": statistics.median(v) / base,
                "versions": versions[p]} for p, v in runs.items()}


def controller_latency(policies: list[str], m: int, steps: int, seed: int) -> dict:
    import ray

    from mixflow.mixture.schedule import ExactSchedule
    from mixflow.runtime.mixture_controller import MixtureController

    rng = np.random.default_rng(seed)
    a_true = np.diag(rng.uniform(0.5, 1.5, m)) * 1e-2 + rng.uniform(0, 2e-3, (m, m))
    out = {}
    # DoReMi gets a reference table below the simulated losses; Skill-It estimates its graph
    # with one step per skill (64 x 10 would outlast the run)
    params = {"doremi": {"ref_loss": [0.1] * m}, "skill_it": {"graph_steps": 1, "round_steps": 10}}
    for policy in policies:
        ctl = MixtureController.remote(policy, params.get(policy, {}), m, 2, None)
        loss = np.full(m, 5.0)
        round_trips = []
        schedules = [ExactSchedule(m, np.random.default_rng(rank)) for rank in range(2)]
        for step in range(steps):
            mix = ray.get([ctl.mixture_for_step.remote(step) for _ in range(2)])[0]
            p = np.asarray(mix["p"])
            if not mix["empty"]:
                loss = np.maximum(loss - a_true @ p + rng.normal(0, 1e-4, m), 0.1)
            for rank in range(2):
                msgs = []
                if not mix["empty"]:  # a batch of 32 sequences: the domains it holds report a loss
                    schedules[rank].set_mixture(p, mix["version"])
                    counts = np.bincount(schedules[rank].take(32), minlength=m)
                    seen = np.where(counts > 0, loss, np.nan)
                    # <grad L_val, grad L_d> of the law: domain d's benefit to the mean loss, noisy
                    grads = np.where(counts > 0, a_true.mean(axis=0) + rng.normal(0, 1e-4, m), np.nan)
                    msgs.append(("train", {"version": mix["version"], "step": step, "train_loss": seen.tolist(),
                                           "tokens": (counts * 128).tolist(), "counts": counts.tolist(),
                                           "grad_dot_val": grads.tolist()}))
                if mix["eval_after"]:
                    msgs.append(("eval", {"version": mix["version"], "step": step, "eval_loss": loss.tolist()}))
                for kind, msg in msgs:
                    t0 = time.perf_counter()
                    ray.get(ctl.report.remote(rank, kind, msg))
                    round_trips.append((time.perf_counter() - t0) * 1e3)
        stats = ray.get(ctl.stats.remote())
        ray.kill(ctl)
        out[policy] = {"updates": stats["updates"], "versions": stats["version"] + 1,
                       "update_p50_ms": stats["latency_ms_p50"], "update_p99_ms": stats["latency_ms_p99"],
                       "report_p99_ms": float(np.percentile(round_trips, 99))}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="steps per pipeline run (part A)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--domains", type=int, default=64, help="domains for the latency part (B)")
    parser.add_argument("--latency-steps", type=int, default=600)
    parser.add_argument("--policies", default=ALL_ADAPTIVE, help="adaptive policies to compare with static")
    parser.add_argument("--work", help="directory for shards and runs (default: a temp dir)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    console = Console()
    policies = [p for p in args.policies.split(",") if p]
    from mixflow.runtime.ray_session import ensure_ray

    ensure_ray(None)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        console.print(f"part A: tokens/s to 2 ranks, {args.steps} steps, {args.repeats} repeats")
        tput = throughput(policies, args.steps, args.repeats, work, console)
    console.print(f"part B: controller latency at {args.domains} domains, {args.latency_steps} steps")
    lat = controller_latency(policies, args.domains, args.latency_steps, seed=0)

    table = Table("policy", "tokens/s (median)", "vs static", "target", "mixture versions")
    for p, r in tput.items():
        verdict = ("-" if p == "static" else "(no updates)" if r["versions"] <= 1
                   else "PASS" if r["ratio"] >= THROUGHPUT_TARGET else "MISS")
        table.add_row(p, f"{r['tokens_per_s']:,.0f}", f"{r['ratio']:.2f}x", verdict, str(r["versions"]))
    console.print(table)
    table = Table(f"policy ({args.domains} domains)", "updates", "versions", "update p50 ms", "update p99 ms",
                  "target", "report round trip p99 ms")
    for p, r in lat.items():
        verdict = "PASS" if r["update_p99_ms"] < LATENCY_TARGET_MS else "MISS"
        table.add_row(p, str(r["updates"]), str(r["versions"]), f"{r['update_p50_ms']:.2f}",
                      f"{r['update_p99_ms']:.2f}", verdict, f"{r['report_p99_ms']:.2f}")
    console.print(table)
    if args.out:
        Path(args.out).write_text(json.dumps({"throughput": tput, "latency": lat}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Does online reweighting pay? Test perplexity per mixture policy at a fixed token budget.

For each domain set and seed, the token pipeline (2 ranks, byte-level GPT, real text
domains built from this machine) trains once per policy with the same budget
(``--steps`` x 16 sequences x 128 tokens x 2 ranks), the same model initialisation and
the same data order for a given seed. The reported metric is the mean over domains of
the *test* perplexity (held-out documents never shown to a policy; policies that
evaluate see a separate validation half). The table gives mean ± standard deviation
over seeds, the difference to stratified, and on how many seeds the policy beat
stratified. A PNG shows each policy's proportions over training (seed 0).

Aioli runs with the paper's settings for the nearest m (eta, one-hot factor), its default
``update="eg"``, and LearnParams scaled to the budget: one sweep (``lp_rounds`` 1) of
``--aioli-lp-steps`` (2) steps per domain, then ``--aioli-round`` (32) training steps, as
many rounds as fit ``--steps`` (the pipeline passes ``total_steps``), the last one training
on its learned mixture to the end. That keeps LearnParams at <= 25% of the steps (m = 4:
8 of every 40), where the paper's 250-step rounds would exceed the whole budget; each run's
share is printed and saved (``learn_params_share``). DoGE's step size is the model's
learning rate. DoReMi runs its two phases: each seed's stratified run is the reference
model (``trainer.save_model``), which the DoReMi run's ranks load (``trainer.reference_model``)
to report its per-domain loss on their batches. Skill-It estimates its skills graph in the
run (m x ``graph_steps`` steps).

Usage (``pip install -e '.[bench]'`` brings matplotlib for the plot)::

    python benchmarks/mixture_quality.py [--steps 200] [--seeds 0,1,2]
        [--policies stratified,aioli,odm,ado,tikmix_d,tikmix_m,doge,doremi,skill_it] [--sets all4,prose3,code2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from mixflow.config import validate_spec  # noqa: E402

DOMAIN_SETS = {
    "all4": ["python", "c_headers", "docs", "licenses"],
    "prose3": ["python", "docs", "licenses"],
    "code2": ["python", "c_headers"],
}
LR = 3e-3


def policy_params(policy: str, aioli_round: int, aioli_lp_steps: int = 2, aioli_eta: float | None = None) -> dict:
    if policy == "aioli":
        eta = {} if aioli_eta is None else {"eta": aioli_eta}  # None: the paper's for the nearest m
        return {"lp_rounds": 1, "lp_steps": aioli_lp_steps, "steps_per_round": aioli_round, **eta}
    if policy == "doge":
        return {"eta": LR}
    return {}


def run_one(domains: list[str], shards: Path, run_dir: Path, policy: str, seed: int, steps: int,
            aioli_round: int, console: Console, aioli_lp_steps: int = 2, aioli_eta: float | None = None):
    from mixflow.runtime.token_pipeline import TokenPipeline

    # DoReMi's two phases: the stratified run is the reference model, the DoReMi run its proxy
    reference = {"stratified": {"save_model": str(reference_path(run_dir, seed))},
                 "doremi": {"reference_model": str(reference_path(run_dir, seed))}}.get(policy, {})
    spec = validate_spec({
        "kind": "tokens", "name": f"quality_{policy}_{seed}", "seed": seed, "run_dir": str(run_dir),
        "data": {"shards": str(shards), "machine_domains": domains, "max_bytes_per_domain": "2MiB",
                 "seq_len": 128, "eval_sequences": 64},
        "mixture": {"policy": policy, "params": policy_params(policy, aioli_round, aioli_lp_steps, aioli_eta)},
        "channel": {"max_items": 4, "max_bytes": "4MiB"},
        "trainer": {"ranks": 2, "steps": steps, "batch_size": 16, "d_model": 128, "layers": 2, "heads": 4,
                    "lr": LR, "eval_every": 0, **reference},
    })
    return TokenPipeline(spec, console, show_progress=False).run()


def reference_path(run_dir: Path, seed: int) -> Path:
    """DoReMi's reference model of ``seed``: the stratified run of the same set and seed saves it."""
    return run_dir.parent / f"reference_{seed}.pt"


def plot_trajectories(results: dict, path: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(results)
    policies = list(next(iter(results.values())))
    fig, axes = plt.subplots(len(sets), len(policies), figsize=(3.2 * len(policies), 2.6 * len(sets)),
                             squeeze=False, sharey=True)
    for i, name in enumerate(sets):
        for j, policy in enumerate(policies):
            ax = axes[i][j]
            run = results[name][policy]["runs"][0]
            traj = run["trajectory"]
            xs = [t["step"] for t in traj] + [steps]
            for d, domain in enumerate(run["domains"]):
                ys = [t["p"][d] for t in traj] + [traj[-1]["p"][d]]
                ax.step(xs, ys, where="post", label=domain)
            ax.set_title(f"{name}: {policy}", fontsize=9)
            ax.set_ylim(0, 1)
            if i == len(sets) - 1:
                ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel("proportion")
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    try:  # before an hour of runs, not after them
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("benchmarks/mixture_quality.py plots the proportions with matplotlib: "
                         "pip install -e '.[bench]'") from None
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--policies", default="stratified,aioli,odm,ado,tikmix_d,tikmix_m,doge,doremi,skill_it")
    parser.add_argument("--sets", default="all4,prose3,code2", help=f"domain sets: {', '.join(DOMAIN_SETS)}")
    parser.add_argument("--aioli-round", type=int, default=32, help="Aioli steps_per_round")
    parser.add_argument("--aioli-lp-steps", type=int, default=2, help="Aioli lp_steps (one sweep per round)")
    parser.add_argument("--aioli-eta", type=float, help="Aioli's step size (default: the paper's for the nearest m)")
    parser.add_argument("--out", default="runs/mixture_quality", help="shards, runs, results.json, PNG")
    args = parser.parse_args(argv)
    console = Console()
    seeds = [int(s) for s in args.seeds.split(",")]
    policies = args.policies.split(",")
    if "stratified" not in policies:
        policies.insert(0, "stratified")
    out = Path(args.out)
    from mixflow.runtime.ray_session import ensure_ray

    ensure_ray(None)
    results: dict = {}
    started = time.perf_counter()
    for set_name in args.sets.split(","):
        domains = DOMAIN_SETS[set_name]
        results[set_name] = {p: {"runs": []} for p in policies}
        for seed in seeds:
            for policy in policies:
                s = run_one(domains, out / "shards", out / "runs" / set_name / f"{policy}_{seed}", policy, seed,
                            args.steps, args.aioli_round, console, args.aioli_lp_steps, args.aioli_eta)
                results[set_name][policy]["runs"].append(
                    {"seed": seed, "mean_perplexity": s.mean_perplexity, "test_perplexity": s.test_perplexity,
                     "domains": s.domains, "trajectory": s.trajectory, "tokens": s.tokens,
                     "learn_params_share": s.learn_params_share})
                console.print(f"{set_name} seed {seed} {policy:>10}: mean test perplexity {s.mean_perplexity:.3f} "
                              f"({len(s.trajectory)} versions"
                              + ("" if s.learn_params_share is None else
                                 f", LearnParams {100 * s.learn_params_share:.0f}% of steps")
                              + f", {time.perf_counter() - started:.0f} s so far)")
    for set_name, by_policy in results.items():
        base = {r["seed"]: r["mean_perplexity"] for r in by_policy["stratified"]["runs"]}
        table = Table(f"{set_name} ({len(DOMAIN_SETS[set_name])} domains)", "mean test ppl", "± sd",
                      "vs stratified", "seeds better than stratified")
        for policy, res in by_policy.items():
            ppl = [r["mean_perplexity"] for r in res["runs"]]
            wins = sum(r["mean_perplexity"] < base[r["seed"]] for r in res["runs"])
            res.update(mean=statistics.mean(ppl), sd=statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
                       delta=statistics.mean(ppl) - statistics.mean(base.values()), wins=wins)
            table.add_row(policy, f"{res['mean']:.3f}", f"{res['sd']:.3f}",
                          "-" if policy == "stratified" else f"{res['delta']:+.3f}",
                          "-" if policy == "stratified" else f"{wins}/{len(ppl)}")
        console.print(table)
    tokens = next(iter(next(iter(results.values())).values()))["runs"][0]["tokens"]
    console.print(f"budget: {args.steps} steps x 2 ranks x 16 x 128 = {tokens} tokens per run; seeds {seeds}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot_trajectories(results, out / "proportions.png", args.steps)
    console.print(f"results: {out / 'results.json'}, trajectories: {out / 'proportions.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Scaling on a simulated cluster: the cost of going multi-node, and of more mixer actors.

Every configuration runs the same image pipeline (the ``photos`` demo set of
``benchmarks/image_pipeline.py``: real ~500x375 JPEG photographs, decoded on CPU to ``--size``
RandomResizedCrop + flip, MixUp/CutMix, batches of ``--batch-size``, ``trainer.model: none``:
the ranks only touch their batches) on a fresh ``ray.cluster_utils.Cluster`` in its own
subprocess, so nothing carries over between configurations:

  nodes    1 node of ``2C`` logical CPUs vs 2 nodes of ``C`` each (``--cpus``: the same total
           budget), 2 ranks. With two nodes mixflow places each rank (trainer, mixer, channel,
           its fused reader) on its own node (``runtime.placement: colocate``) and every stage
           asks for the CPUs it uses; on one node nothing is reserved.
  mixers   1, 2 and 4 ranks on one node: each rank has its own mixer actor (which decodes its
           rank's reader), so this is the data plane's throughput with 1, 2, 4 mixers.
  path     2 ranks on one node: batches through the shared-memory ring (the default), through
           the object store (``channel.shared_memory: false``), and with two separate decoder
           actors per rank (``runtime.readers_per_rank: 2``: decoded batches cross the object
           store to the mixer).

Reported per configuration: samples/s over the streaming time (the summary's ``wall_s``;
actor start-up excluded), its ratio to the configuration's baseline in the same run (1 node;
1 mixer), the share of batches that took the shared-memory ring, and the object-store bytes
created per sample (Ray's cumulative ``cumulative_created_bytes`` over all nodes, before vs
after the run: what went through Plasma besides the rings). Then the mixture controller's load:
one controller actor serving R simulated ranks that each ask for their step's mixture and send
their report every step, for R in 2, 8, 32 and 4 or 32 domains (calls/s it sustains, and so the
steps/s a run of R ranks can go before the controller is the bottleneck). Rounds alternate the
configurations (``--rounds``); the table shows each one's median. This machine has 2 physical
cores: logical CPUs beyond them are shared, so the ratios show overheads (placement, object-store
traffic, scheduling), not how much faster real extra cores would be. Every run must be exactly
once (exit status 2 otherwise).

Usage::

    pip install -e '.[cluster]'   # Ray's object-store statistics need ray[default] (grpcio)
    python benchmarks/scaling.py [--samples 512] [--size 160] [--batch-size 32] [--cpus 4]
        [--rounds 2] [--json benchmarks/results/scaling.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from benchmarks.image_pipeline import num_classes_of, prepare_shards  # noqa: E402

# One configuration, in a fresh process: argv[1] is a JSON object with nodes, cpus, spec.
CHILD = r'''
import json, sys
import ray
from ray.cluster_utils import Cluster
from ray._private.internal_api import get_memory_info_reply, get_state_from_address
from mixflow.config import validate_spec
from mixflow.runtime.image_pipeline import ImagePipeline

cfg = json.loads(sys.argv[1])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cfg["cpus"],
                                                        "object_store_memory": 400 * 2**20})
for _ in range(cfg["nodes"] - 1):
    cluster.add_node(num_cpus=cfg["cpus"], object_store_memory=400 * 2**20)
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)

def created() -> int:
    return get_memory_info_reply(get_state_from_address(cluster.address)).store_stats.cumulative_created_bytes

before = created()
s = ImagePipeline(validate_spec(cfg["spec"]), show_progress=False).run()
after = created()
print("RESULT " + json.dumps({"samples": s.samples, "wall_s": s.wall_s, "exactly_once": s.exactly_once,
                              "ring": sum(r.shared_memory_steps for r in s.ranks),
                              "steps": sum(r.steps for r in s.ranks), "colocated": s.colocated,
                              "nodes": len({p["trainer"] for p in s.placement}),
                              "plasma_bytes": after - before}))
ray.shutdown()
cluster.shutdown()
'''


# The mixture controller's load, in a fresh process: for each (ranks, domains), STEPS steps in
# which every rank asks for its step's mixture and sends its train report (what producers and
# trainers do per step); the controller actor journals every report and merges each step's.
CONTROLLER = r'''
import json, sys, tempfile, time
import numpy as np
import ray
from mixflow.runtime.mixture_controller import MixtureController

steps, grid = json.loads(sys.argv[1])
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
rows = []
for ranks, domains in grid:
    with tempfile.TemporaryDirectory() as d:
        c = MixtureController.remote("static", {"p": [1 / domains] * domains}, domains, ranks, f"{d}/state.json")
        ray.get(c.stats.remote())
        loss = np.linspace(1.0, 2.0, domains).tolist()
        t0 = time.perf_counter()
        for step in range(steps):
            mixes = ray.get([c.mixture_for_step.remote(step) for _ in range(ranks)])
            msg = {"version": mixes[0]["version"], "step": step, "train_loss": loss,
                   "tokens": [64.0] * domains}
            ray.get([c.report.remote(r, "train", msg) for r in range(ranks)])
        wall = time.perf_counter() - t0
        rows.append({"ranks": ranks, "domains": domains, "calls_per_s": 2 * ranks * steps / wall,
                     "steps_per_s": steps / wall})
        ray.kill(c)
print("RESULT " + json.dumps(rows))
'''


def controller_load(args) -> list[dict]:
    grid = [[r, m] for r in (2, 8, 32) for m in (4, 32)]
    proc = subprocess.run([sys.executable, "-c", CONTROLLER, json.dumps([args.controller_steps, grid])],
                          capture_output=True, text=True, timeout=900, cwd=_ROOT,
                          env={**os.environ, "PYTHONPATH": str(_ROOT)})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"controller load failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].split(" ", 1)[1])


def spec(shards: Path, run_dir: Path, cfg: dict, args) -> dict:
    return {"name": "scaling", "seed": 1, "run_dir": str(run_dir),
            "data": {"shards": str(shards), "num_classes": num_classes_of(shards)},
            "decode": {"size": [args.size, args.size], "threads": 1},
            "mix": {"method": "mixup_cutmix"},
            "channel": {"max_items": 4, "max_bytes": "64MiB", "shared_memory": cfg.get("ring", True)},
            "runtime": {"readers_per_rank": cfg.get("readers", 1)},
            "trainer": {"ranks": cfg["ranks"], "epochs": 1, "batch_size": args.batch_size, "model": "none"}}


def configurations(args) -> dict[str, dict]:
    return {"1 node x 2C, 2 ranks": {"group": "nodes", "nodes": 1, "cpus": 2 * args.cpus, "ranks": 2},
            "2 nodes x C, 2 ranks": {"group": "nodes", "nodes": 2, "cpus": args.cpus, "ranks": 2},
            "1 mixer": {"group": "mixers", "nodes": 1, "cpus": 2 * args.cpus, "ranks": 1},
            "2 mixers": {"group": "mixers", "nodes": 1, "cpus": 2 * args.cpus, "ranks": 2},
            "4 mixers": {"group": "mixers", "nodes": 1, "cpus": 2 * args.cpus, "ranks": 4},
            "ring, fused reader": {"group": "path", "nodes": 1, "cpus": 2 * args.cpus, "ranks": 2},
            "no ring (object store)": {"group": "path", "nodes": 1, "cpus": 2 * args.cpus, "ranks": 2, "ring": False},
            "ring, 2 decoder actors per rank": {"group": "path", "nodes": 1, "cpus": 2 * args.cpus, "ranks": 2,
                                                "readers": 2}}


def run_one(cfg: dict, shards: Path, work: Path, args) -> dict:
    child = {"nodes": cfg["nodes"], "cpus": cfg["cpus"], "spec": spec(shards, work / "run", cfg, args)}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(child)], capture_output=True, text=True,
                          timeout=900, cwd=_ROOT, env={**os.environ, "PYTHONPATH": str(_ROOT)})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"configuration {cfg} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1].split(" ", 1)[1])
    if not out["exactly_once"] or out["samples"] != args.samples:
        print(f"not exactly once: {out}", file=sys.stderr)
        sys.exit(2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs per node of the 2-node cluster (C)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--controller-steps", type=int, default=50)
    parser.add_argument("--out", default=None, help="where the shards are built (default: a temp dir)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    root = Path(args.out or Path(tempfile.gettempdir()) / "mixflow-bench")
    shards = prepare_shards(root, args.samples)
    configs = configurations(args)
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as work:
        for round_ in range(args.rounds):
            for name, cfg in configs.items():
                runs[name].append(run_one(cfg, shards, Path(work), args))
                print(f"round {round_ + 1}: {name}: {runs[name][-1]['samples'] / runs[name][-1]['wall_s']:.0f} "
                      "samples/s", flush=True)
    rows = []
    baseline = {"nodes": "1 node x 2C, 2 ranks", "mixers": "1 mixer", "path": "ring, fused reader"}
    median_rate = {name: statistics.median(r["samples"] / r["wall_s"] for r in rs) for name, rs in runs.items()}
    print(f"\n{args.samples} photos -> {args.size}x{args.size}, batch {args.batch_size}, C = {args.cpus} logical "
          f"CPUs, {args.rounds} rounds (medians)\n")
    print("| configuration | samples/s | vs baseline | nodes used | shared-memory ring | object store / sample |")
    print("|---|---|---|---|---|---|")
    for name, cfg in configs.items():
        last = runs[name][-1]
        ratio = median_rate[name] / median_rate[baseline[cfg["group"]]]
        plasma = statistics.median(r["plasma_bytes"] / r["samples"] for r in runs[name])
        row = {"configuration": name, "samples_per_s": median_rate[name], "ratio": ratio, "nodes": last["nodes"],
               "ring_share": last["ring"] / last["steps"], "plasma_bytes_per_sample": plasma,
               "colocated": last["colocated"]}
        rows.append(row)
        print(f"| {name} | {median_rate[name]:.0f} | {ratio:.2f}x | {last['nodes']} | "
              f"{100 * row['ring_share']:.0f}% of batches | {plasma / 1024:.1f} KiB |")
    control = controller_load(args)
    base = control[0]["calls_per_s"]
    print(f"\nmixture controller (one actor, policy static, journal on): {args.controller_steps} steps, each rank "
          "asking for its mixture and reporting once per step\n")
    print("| ranks | domains | controller calls/s | vs 2 ranks x 4 domains | steps/s it sustains |")
    print("|---|---|---|---|---|")
    for row in control:
        print(f"| {row['ranks']} | {row['domains']} | {row['calls_per_s']:.0f} | {row['calls_per_s'] / base:.2f}x | "
              f"{row['steps_per_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "runs": runs,
                                               "controller": control}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run a pipeline on a simulated multi-node Ray cluster on this machine.

``ray.cluster_utils.Cluster`` starts a head node and worker nodes as separate raylets, and
the pipeline places its actors as on real nodes (``runtime.placement``: each rank's trainer,
mixer, channel and readers on one node, ranks spread over the nodes; every stage asks for the
CPUs it uses, so each node needs room for a rank: ``--cpus-per-node``). The summary says which
node ran what.

    python cluster/local_multinode.py pipelines/digits_mixup.yaml --nodes 2 --set trainer.epochs=1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from rich.console import Console

from mixflow.config import load_spec
from mixflow.runtime.image_pipeline import ImagePipeline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("--nodes", type=int, default=2, help="nodes including the head")
    parser.add_argument("--cpus-per-node", type=int, default=4,
                        help="CPUs each simulated node offers (a rank asks for about 2 + decode.threads)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus_per_node})
    for _ in range(args.nodes - 1):
        cluster.add_node(num_cpus=args.cpus_per_node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    console = Console()
    console.print(f"simulated cluster: {len(ray.nodes())} nodes at {cluster.address}")
    try:
        summary = ImagePipeline(load_spec(args.spec, args.set, base=Path.cwd()), console).run()
        summary.render(console)
        return 0 if summary.exactly_once else 3
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())

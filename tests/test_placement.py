"""Resources and placement from the spec: what each stage asks Ray for, and, on a (simulated)
two-node cluster, each rank's trainer, mixer, channel and readers on one node, so batches take
the shared-memory ring; readers pinned by a custom resource to the node that holds the data."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mixflow.errors import ConfigError
from mixflow.runtime.placement import stage_options
from tests.conftest import make_spec


def test_stage_resources_default_to_nothing_on_one_node_and_to_what_they_use_on_a_cluster(digits_shards, tmp_path):
    spec = make_spec(digits_shards, tmp_path, decode={"size": [24, 24], "threads": 3},
                     runtime={"readers_per_rank": 2})
    assert [stage_options(spec, s, cluster=False, gpus=False) for s in ("decoder", "mixer", "trainer")] == [{}] * 3
    assert stage_options(spec, "decoder", cluster=True, gpus=False) == {"num_cpus": 3}
    assert stage_options(spec, "mixer", cluster=True, gpus=False) == {"num_cpus": 1}
    assert stage_options(spec, "trainer", cluster=True, gpus=True) == {"num_cpus": 1, "num_gpus": 1}
    fused = make_spec(digits_shards, tmp_path, decode={"size": [24, 24], "threads": 3})
    assert stage_options(fused, "mixer", cluster=True, gpus=False) == {"num_cpus": 4}  # it decodes too
    given = make_spec(digits_shards, tmp_path, runtime={"resources": {
        "decoder": {"num_cpus": 0.5, "memory": "1GiB", "resources": {"data": 0.01}}, "trainer": {"num_gpus": 0.5}}})
    assert stage_options(given, "decoder", cluster=True, gpus=False) == {"num_cpus": 0.5, "memory": 2**30,
                                                                          "resources": {"data": 0.01}}
    assert stage_options(given, "trainer", cluster=True, gpus=True) == {"num_cpus": 1, "num_gpus": 0.5}
    assert stage_options(given, "decoder", cluster=False, gpus=False)["resources"] == {"data": 0.01}


def test_bad_stage_resources_name_the_field(digits_shards, tmp_path):
    with pytest.raises(ConfigError, match=r"runtime.resources.reader"):
        make_spec(digits_shards, tmp_path, runtime={"resources": {"reader": {"num_cpus": 1}}})
    with pytest.raises(ConfigError, match=r"runtime.resources.mixer.num_cpus"):
        make_spec(digits_shards, tmp_path, runtime={"resources": {"mixer": {"num_cpus": -1}}})
    with pytest.raises(ConfigError, match=r"custom resources need a name other than CPU"):
        make_spec(digits_shards, tmp_path, runtime={"resources": {"decoder": {"resources": {"CPU": 1}}}})


TWO_NODES = textwrap.dedent('''
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from mixflow.config import validate_spec
    from mixflow.runtime.image_pipeline import ImagePipeline

    raw = json.loads(sys.argv[1])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 6, "object_store_memory": 120 * 2**20})
    node_b = cluster.add_node(num_cpus=6, object_store_memory=120 * 2**20, resources={"data": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    out = {"head": ray.get_runtime_context().get_node_id(), "node_b": node_b.node_id, "runs": []}
    for pin in (False, True):
        spec = dict(raw)
        if pin:  # the readers go where the data is: the node with the custom resource
            spec["runtime"] = {**spec["runtime"], "resources": {"decoder": {"num_cpus": 0.5, "resources": {"data": 0.01}}}}
        s = ImagePipeline(validate_spec(spec), show_progress=False).run()
        out["runs"].append({"placement": s.placement, "colocated": s.colocated, "exactly_once": s.exactly_once,
                            "ring": [r.shared_memory_steps for r in s.ranks], "steps": [r.steps for r in s.ranks]})

    # Your own trainers (here Ray tasks pinned to a node each, as Ray Train places its workers):
    # each rank's mixer is rebuilt on its feed's node when it began elsewhere.
    import mixflow
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=1)
    def consume(name, rank):
        feed = mixflow.connect(name).feed(rank=rank, world_size=2)
        for epoch in range(feed.epochs):
            for batch in feed.epoch(epoch):
                batch.x.view(-1)[0].item()
        feed.close()

    pipe = mixflow.start(validate_spec(raw), name="placed")
    ray.get([consume.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote("placed", r)
             for r, node in enumerate([out["node_b"], out["head"]])])
    s = pipe.close()
    out["hosted"] = {"placement": s.placement, "colocated": s.colocated, "exactly_once": s.exactly_once,
                     "ring": [r.shared_memory_steps for r in s.ranks], "steps": [r.steps for r in s.ranks]}

    # The token pipeline: each rank's producer, channel and trainer on one node.
    from mixflow.runtime.token_pipeline import TokenPipeline
    tokens = validate_spec({"kind": "tokens", "name": "tok", "run_dir": raw["run_dir"] + "-tok",
                            "data": {"shards": sys.argv[2], "seq_len": 32, "eval_sequences": 8},
                            "trainer": {"ranks": 2, "steps": 6, "batch_size": 4}})
    out["tokens"] = TokenPipeline(tokens, show_progress=False).run().placement
    print(json.dumps(out))
''')


def test_each_ranks_stages_share_a_node_and_readers_follow_the_data(digits_shards, text_domains, tmp_path):
    spec = make_spec(digits_shards, tmp_path, runtime={"readers_per_rank": 2})
    raw = json.loads(spec.model_dump_json())
    proc = subprocess.run([sys.executable, "-c", TWO_NODES, json.dumps(raw), str(text_domains)],
                          capture_output=True, text=True,
                          timeout=400, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    nodes = {out["head"], out["node_b"]}
    colocate, pinned = out["runs"]
    for run in (colocate, pinned):
        assert run["exactly_once"] and run["colocated"] == [True, True], run
        assert {p["trainer"] for p in run["placement"]} == nodes  # one rank per node
        assert all(p["channel"] == p["trainer"] for p in run["placement"])
        assert run["ring"] == run["steps"], run  # every batch went through the shared-memory ring
    assert all(p["readers"] == [p["trainer"]] * 2 for p in colocate["placement"])  # readers with their rank
    assert all(p["readers"] == [out["node_b"]] * 2 for p in pinned["placement"])  # readers where the data is
    hosted = out["hosted"]
    assert hosted["exactly_once"] and hosted["colocated"] == [True, True], hosted
    assert [p["trainer"] for p in hosted["placement"]] == [out["node_b"], out["head"]]
    assert hosted["ring"] == hosted["steps"], hosted
    assert {p["trainer"] for p in out["tokens"]} == nodes, out["tokens"]
    assert all(p["producer"] == p["channel"] == p["trainer"] for p in out["tokens"]), out["tokens"]


def test_a_stage_no_node_can_take_fails_the_start_by_name(ray_session, digits_shards, tmp_path):
    """Resources nothing can give (a GPU on this CPU-only Ray) never make the run wait forever."""
    from mixflow.errors import PipelineError
    from mixflow.runtime.image_pipeline import ImagePipeline

    spec = make_spec(digits_shards, tmp_path, runtime={"start_timeout": 20,
                                                       "resources": {"trainer": {"num_gpus": 1}}})
    pipe = ImagePipeline(spec, show_progress=False)
    # (On a loaded machine a mixer still building its DALI pipeline may be named after them.)
    with pytest.raises(PipelineError, match=r"not started after 20 s: trainer r0, trainer r1\b.*The cluster has "
                                            r"no room for what they ask \(runtime.resources; free now: \{'CPU'"):
        pipe.run()
    assert not pipe.trainers and not pipe.mixers and not pipe.channels


def test_the_local_multinode_script_places_each_rank_on_its_own_node(digits_shards, tmp_path):
    """``cluster/local_multinode.py`` (the README's simulated cluster): two raylets, one rank each,
    every batch through the shared-memory ring, exactly once."""
    import yaml

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "sim", "seed": 3, "run_dir": str(tmp_path / "run"),
                                    "data": {"shards": str(digits_shards), "num_classes": 10},
                                    "decode": {"size": [24, 24]}, "mix": {"method": "cutmix", "alpha": 1.0},
                                    "channel": {"max_items": 4, "max_bytes": "1MiB"},
                                    "trainer": {"ranks": 2, "epochs": 1, "batch_size": 64, "model": "none"}}))
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "cluster/local_multinode.py", str(spec), "--nodes", "2"],
                          capture_output=True, text=True, timeout=400, cwd=repo)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "simulated cluster: 2 nodes" in proc.stdout and "epoch 0: 1797 keys delivered exactly once" in proc.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["exactly_once"] and summary["colocated"] == [True, True]
    assert len({p["trainer"] for p in summary["placement"]}) == 2  # one rank per node
    assert all(r["shared_memory_steps"] == r["steps"] > 0 for r in summary["ranks"])

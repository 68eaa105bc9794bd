"""Checkpoint/resume, elastic resume and actor/node failure of the image pipeline (real Ray, DALI, shards).

Digests are ``(step, keys, crc32 of pixels, crc32 of soft targets)`` per delivered batch,
so "equal digests" means the same batches, key for key and tensor for tensor.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mixflow.data.listing import dataset_keys, list_shards
from mixflow.runtime import image_checkpoint as ckpt
from mixflow.runtime.image_pipeline import ImagePipeline
from tests.conftest import make_spec

SECTIONS = {"trainer": {"ranks": 2, "epochs": 2, "batch_size": 32, "model": "none"},
            "runtime": {"readers_per_rank": 2, "prefetch": 2}}


def _spec(shards, tmp_path, **over):
    sections = {k: {**v, **over.pop(k, {})} for k, v in SECTIONS.items()}
    return make_spec(shards, tmp_path, **sections, **over)


@pytest.fixture(scope="module")
def uninterrupted(ray_session, digits_shards, tmp_path_factory):
    pipe = ImagePipeline(_spec(digits_shards, tmp_path_factory.mktemp("full")), show_progress=False,
                         record_digests=True)
    summary = pipe.run()
    assert summary.exactly_once
    return pipe.digests


def _keys(digests: list) -> list[str]:
    return [k for d in digests for k in d[1]]


# --- pure parts of the state -------------------------------------------------------------


def test_elastic_cuts_split_the_rest_of_the_epoch_without_loss_or_repeat(digits_shards):
    shards = list_shards(digits_shards)
    rows4 = ckpt.epoch_rows(shards, 7, 4, 1, 4, [])
    total = sum(len(r) for r in rows4)
    assert total == 1797
    consumed = [5, 0, 17, len(rows4[3])]
    rows3 = ckpt.epoch_rows(shards, 7, 4, 1, 3, [{"readers": 4, "consumed": consumed}])
    assert [len(r) for r in rows3] == [len(x) for x in np.array_split(np.zeros(total - sum(consumed)), 3)]
    # A second cut on top of the first: the three stages together hold every row exactly once.
    second = [3, 0, 1]
    rows2 = ckpt.epoch_rows(shards, 7, 4, 1, 2, [{"readers": 4, "consumed": consumed},
                                                 {"readers": 3, "consumed": second}])
    seen = [tuple(x) for r, c in zip(rows4, consumed) for x in r[:c]]
    seen += [tuple(x) for r, c in zip(rows3, second) for x in r[:c]]
    seen += [tuple(x) for r in rows2 for x in r]
    assert len(seen) == len(set(seen)) == 1797
    # The rest keeps reader order: the first reader's unread rows come first.
    assert np.array_equal(rows3[0][:len(rows4[0]) - 5], rows4[0][5:])


def test_state_checks_name_the_differing_fields(digits_shards, tmp_path):
    shards = list_shards(digits_shards)
    state = ckpt.initial_state(_spec(digits_shards, tmp_path), shards)
    other = _spec(digits_shards, tmp_path, seed=8, decode={"size": [32, 32]})
    with pytest.raises(ValueError) as err:
        ckpt.check_resumable(state, other, shards)
    assert "seed (state: 7, spec: 8)" in str(err.value)
    assert "decode.size (state: [24, 24], spec: [32, 32])" in str(err.value)
    with pytest.raises(ValueError, match="format must be 'mixflow.image-pipeline-state/1'"):
        ckpt.check_resumable({"format": "x"}, other, shards)
    with pytest.raises(ValueError, match="epoch 2 but trainer.epochs is 2"):
        ckpt.check_resumable({**state, "epoch": 2}, _spec(digits_shards, tmp_path), shards)
    with pytest.raises(ValueError, match="unknown actor kind"):
        ImagePipeline(_spec(digits_shards, tmp_path), actor_options={"reader": {}})


def test_state_of_ranks_that_finished_points_at_the_next_epoch(digits_shards, tmp_path):
    spec, shards = _spec(digits_shards, tmp_path), list_shards(digits_shards)
    done = {"rank": 0, "position": {"epoch": 0, "step": 28, "cursor": 30, "starts": [458, 441], "done": True},
            "skipped": [], "cuts": [], "skipped_before_cuts": []}
    mid = {"rank": 1, "position": {"epoch": 0, "step": 3, "cursor": 3, "starts": [64, 32]}, "skipped": [],
           "cuts": [], "skipped_before_cuts": []}
    state = ckpt.build_state(spec, shards, [done, mid])
    assert state["epoch"] == 0 and state["rank_states"][0]["position"]["done"]
    # Rank 0 consumed all of its readers' rows, rank 1 its first 64 + 32.
    rows = ckpt.epoch_rows(shards, 7, 4, 0, 4, [])
    assert ckpt.consumed_counts(state, rows) == [len(rows[0]), len(rows[1]), 64, 32]
    assert len(ckpt.delivered_before(state, shards)) == len(rows[0]) + len(rows[1]) + 96
    ahead = {**mid, "position": {"epoch": 1, "step": 2, "cursor": 2, "starts": [64, 0]}}
    state = ckpt.build_state(spec, shards, [done, ahead])
    assert state["epoch"] == 1
    assert state["rank_states"][0]["position"] == ckpt.fresh_position(1)
    with pytest.raises(ValueError, match="rank 1 is at .* the state.s epoch is 0"):
        ckpt.build_state(spec, shards, [{**mid, "rank": 0}, ahead])


def test_state_from_rank_checkpoint_files(digits_shards, tmp_path):
    import torch

    spec, shards = _spec(digits_shards, tmp_path), list_shards(digits_shards)
    skip = {"shard": "s.tar", "key": "k1", "reason": "bad", "offset": None, "epoch": 1}
    streams = [{"rank": r, "position": {"epoch": 1, "step": 4 + r, "cursor": 4 + r, "starts": [64 + 32 * r, 64]},
                "skipped": [skip] if r else [], "cuts": [], "skipped_before_cuts": []} for r in (0, 1)]
    paths = []
    for r in (1, 0):  # any order
        paths.append(tmp_path / f"rank{r}.pt")
        torch.save({"rank": r, "world_size": 2, "stream": streams[r], "model": None, "optimizer": None}, paths[-1])
    state = ckpt.state_from_checkpoints(paths, spec, shards)
    assert state["epoch"] == 1 and state["checkpoints"] == [str(tmp_path / "rank0.pt"), str(tmp_path / "rank1.pt")]
    assert [rs["position"]["step"] for rs in state["rank_states"]] == [4, 5]
    assert [r.key for r in ckpt.skipped_records(state)] == ["k1"]
    ckpt.check_resumable(json.loads(json.dumps(state)), spec, shards)  # JSON round trip keeps it valid
    with pytest.raises(ValueError, match=r"one file per rank 0..1, got ranks \[1\]"):
        ckpt.state_from_checkpoints(paths[:1], spec, shards)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json is not a pipeline state"):
        ckpt.load_state(tmp_path / "bad.json")


# --- Ray: the pieces a restart relies on ------------------------------------------------------


def test_opened_channel_keeps_each_batch_of_the_stream_once(ray_session):
    import ray

    from mixflow.runtime.channel import Channel, ChannelReader

    ch = Channel.remote("t", 8, 2**20)
    assert ray.get(ch.open.remote({"epoch": 3, "step": 5, "cursor": 6, "starts": [1, 2]}))["step"] == 5
    # A second open (a restarted producer) gets the tracked position, not its own start.
    assert ray.get(ch.open.remote({"epoch": 0, "step": 0, "cursor": 0, "starts": None}))["epoch"] == 3
    pos = lambda step: {"epoch": 3, "step": step, "cursor": step + 1, "starts": [0, 0]}  # noqa: E731
    assert ray.get(ch.put.remote({"keys": ["a"], "step": 5}, 10, pos(6)))
    assert not ray.get(ch.put.remote({"keys": ["a"], "step": 5}, 10, pos(6)))  # a repeat: dropped
    assert not ray.get(ch.put.remote({"keys": ["c"], "step": 7}, 10, pos(8)))  # not the next one: dropped
    assert ray.get(ch.put.remote({"keys": ["b"], "step": 6}, 10, pos(7)))
    ray.get(ch.end.remote({"epoch": 3, "skipped": []}))
    ray.get(ch.end.remote({"epoch": 3, "skipped": []}))  # repeated end marker: dropped
    assert ray.get(ch.open.remote({}))["epoch"] == 4
    reader = ChannelReader(ch)
    assert [reader.get()["keys"], reader.get()["keys"], reader.get()] == [["a"], ["b"], None]
    assert reader.last["step"] == 6 and reader.end_info["epoch"] == 3
    assert ray.get(ch.stats.remote())["puts"] == 2


def test_rank_checkpoint_restores_model_and_optimizer(ray_session, digits_shards, tmp_path):
    """A rank checkpoint holds the stream state and what the built-in loop registered (model and
    optimizer): another rank (other seed, so other initial weights) resumed from it has them back.
    Stopped at step 0, the ranks consume nothing (their channel stays empty)."""
    import ray
    import torch

    from mixflow.runtime.channel import Channel
    from mixflow.runtime.trainer_actor import TrainerRank

    def rank(seed=7, model="digits_cnn", checkpoint=None):
        actor = TrainerRank.remote(_spec(digits_shards, tmp_path, seed=seed, trainer={"model": model})
                                   .model_dump_json(), 0, 1, ch)
        ray.get(actor.setup.remote("127.0.0.1", 0, checkpoint))
        ray.get(actor.run.remote((0, 0)))
        return actor

    ch = Channel.remote("t", 2, 2**20)
    saved, restored = tmp_path / "a.pt", tmp_path / "b.pt"
    a = rank()
    ray.get(a.save_checkpoint.remote(str(saved)))
    b = rank(seed=99, checkpoint=str(saved))
    ray.get(b.save_checkpoint.remote(str(restored)))
    one, two = (torch.load(p, weights_only=True)["entrypoint"] for p in (saved, restored))
    assert one["model"].keys() == two["model"].keys() and "optimizer" in two
    assert all(torch.equal(one["model"][k], two["model"][k]) for k in one["model"])
    assert torch.load(saved, weights_only=True)["stream"]["position"] == {"epoch": 0, "step": 0, "cursor": 0,
                                                                           "starts": [0, 0]}
    none = rank(model="none")
    ray.get(none.save_checkpoint.remote(str(tmp_path / "c.pt")))
    with pytest.raises(Exception, match="holds no model weights"):
        rank(checkpoint=str(tmp_path / "c.pt"))
    (tmp_path / "code.pt").write_bytes(b"not a checkpoint")
    c = TrainerRank.remote(_spec(digits_shards, tmp_path, trainer={"model": "digits_cnn"}).model_dump_json(), 0, 1, ch)
    with pytest.raises(Exception, match=r"checkpoint .*code\.pt: not a plain-data mixflow rank checkpoint"):
        ray.get(c.setup.remote("127.0.0.1", 0, str(tmp_path / "code.pt")))
    for actor in (a, b, none, c, ch):
        ray.kill(actor)


# --- Ray: exact resume, elastic resume -----------------------------------------------------


def test_resume_at_random_cut_points_continues_the_exact_stream(uninterrupted, digits_shards, tmp_path):
    rng = np.random.default_rng(2024)
    cuts = [(0, int(rng.integers(1, 27))), (1, int(rng.integers(1, 27)))]
    parts: dict[int, list] = {0: [], 1: []}
    resume = None
    for i, cut in enumerate([*cuts, None]):
        pipe = ImagePipeline(_spec(digits_shards, tmp_path / str(i)), show_progress=False, record_digests=True,
                             resume_from=resume)
        summary = pipe.run(stop_at=cut)
        for rank, digests in pipe.digests.items():
            parts[rank] += digests
            if cut is not None:  # every rank stopped right after its cut's step
                assert digests[-1][0] == cut[1] - 1
        for ledger in summary.ledgers:
            assert ledger.exactly_once, ledger.describe()
            assert ledger.delivered == 1797
        if i == 1:  # epoch 0 was resumed in this run: its first part came from the state
            assert summary.ledgers[0].before_resume == 2 * 32 * cuts[0][1]
        if cut is not None:
            resume = tmp_path / str(i) / "run" / "pipeline_state.json"  # resumed from the saved file
            state = json.loads(resume.read_text())
            assert state["epoch"] == cut[0]
            assert [rs["position"]["step"] for rs in state["rank_states"]] == [cut[1], cut[1]]
    for rank in (0, 1):
        assert parts[rank] == uninterrupted[rank]  # keys, pixel crc, target crc: batch for batch


def _corrupt(shard_dir: Path, rows: list[tuple[int, int]]) -> list[str]:
    """Overwrite the JPEG start of the samples at ``rows`` ``(shard, sample)``; returns their keys."""
    from mixflow.data.tar_index import read_index

    shards, keys = list_shards(shard_dir), []
    for shard, row in rows:
        sample = read_index(shards[shard].index_path)[row]
        with open(shards[shard].path, "r+b") as fh:
            fh.seek(sample.components["jpg"].offset)
            fh.write(b"\0" * 16)
        keys.append(sample.key)
    return keys


def test_elastic_resume_two_ranks_to_one_delivers_the_epoch_once(ray_session, digits_shards, tmp_path):
    import shutil

    shard_dir = Path(shutil.copytree(digits_shards, tmp_path / "shards"))
    # Two bad samples (skipped and quarantined): rank 0's first reader reads one before the cut, one after.
    rows = ckpt.epoch_rows(list_shards(shard_dir), 7, 4, 0, 4, [])[0]
    bad = _corrupt(shard_dir, [tuple(rows[3]), tuple(rows[len(rows) - 5])])
    first = ImagePipeline(_spec(shard_dir, tmp_path / "a", on_error="skip"), show_progress=False,
                          record_digests=True)
    first.run(stop_at=(0, 10))
    state = first.state_dict()
    before = _keys([d for digests in first.digests.values() for d in digests])
    assert len(before) == 2 * 10 * 32 and not set(bad) & set(before)
    assert [r["key"] for rs in state["rank_states"] for r in rs["skipped"]] == bad[:1]  # came with a batch
    one = _spec(shard_dir, tmp_path / "b", trainer={"ranks": 1}, on_error="skip")
    second = ImagePipeline(one, show_progress=False, record_digests=True, resume_from=state)
    summary = second.run()
    assert list(second.digests) == [0]
    ledger0, ledger1 = summary.ledgers
    assert ledger0.exactly_once and ledger1.exactly_once, (ledger0.describe(), ledger1.describe())
    assert ledger0.skipped == ledger1.skipped == sorted(bad)
    assert ledger0.before_resume == len(before) and ledger0.per_rank == {0: 1795 - len(before)}
    assert ledger1.per_rank == {0: 1795}
    # Independently of the ledger: before + after + bad is the dataset, each key once.
    after0 = _keys(second.digests[0])[:1795 - len(before)]
    assert sorted(before + after0 + bad) == sorted(dataset_keys(list_shards(shard_dir)))


# --- Ray: actor failure ---------------------------------------------------------------------


def _kill_when(pipe: ImagePipeline, samples: int, kinds: list[str], killed: list,
               rebuilds: bool = True) -> threading.Thread:
    """Kill (with restart) one actor of each kind in ``kinds`` once rank 0 consumed ``samples``;
    ``killed`` gets ``(kind, pid before, pid after the restart, samples consumed at the kill, batches
    the restarted actor rebuilt for tickets its dead self left in the channel (mixers))``; with
    ``rebuilds``, a mixer's entry waits (up to a minute) until it has rebuilt one."""
    import ray

    def work():
        while not pipe.trainers:
            time.sleep(0.05)
        trainer = pipe.trainers[0]
        while ray.get(trainer.progress.remote())["samples"] < samples:
            time.sleep(0.05)
        for kind in kinds:
            actor = pipe.decoders[1] if kind == "decoder" else pipe.mixers[0]
            pid = ray.get(actor.placement.remote())["pid"]
            at = ray.get(trainer.progress.remote())["samples"]
            ray.kill(actor, no_restart=False)
            new, deadline = pid, time.time() + 120
            while new == pid and time.time() < deadline:  # a call may still reach the dying process
                try:
                    new = ray.get(actor.placement.remote(), timeout=10)["pid"]
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    pass
                time.sleep(0.1)
            rebuilt, deadline = 0, time.time() + 60
            while kind == "mixer" and rebuilds and not rebuilt and time.time() < deadline:
                rebuilt = ray.get(actor.stats.remote())["rebuilt"]
                time.sleep(0.1)
            killed.append((kind, pid, new, at, rebuilt))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_killed_reader_and_mixer_restart_and_the_stream_goes_on_unchanged(uninterrupted, digits_shards,
                                                                         tmp_path):
    # Slow ranks so the kills land mid-epoch with batches queued in the channel and in flight.
    # Through the object store, the dead mixer's queued tickets name batches of its lost outbox.
    spec = _spec(digits_shards, tmp_path, trainer={"throttle": {0: 0.03, 1: 0.03}}, channel={"shared_memory": False})
    pipe = ImagePipeline(spec, show_progress=False, record_digests=True)
    killed: list = []
    thread = _kill_when(pipe, 8 * 32, ["decoder", "mixer"], killed)
    summary = pipe.run()
    thread.join(timeout=5)
    assert [k[0] for k in killed] == ["decoder", "mixer"]
    assert all(before != after for _, before, after, *_ in killed)  # both were restarted
    total0 = len(_keys(uninterrupted[0]))
    assert all(at < total0 - 2 * 32 for *_, at, _ in killed)  # mid-run: rank 0 had batches left to get
    assert killed[1][4] > 0  # the channel held tickets of the dead mixer: their batches were rebuilt
    for ledger in summary.ledgers:
        assert ledger.exactly_once, ledger.describe()
    assert pipe.digests[0] == uninterrupted[0] and pipe.digests[1] == uninterrupted[1]


def test_killed_fused_mixer_restarts_and_the_stream_goes_on_unchanged(ray_session, digits_shards, tmp_path):
    """One reader per rank runs inside the mixer (``runtime.fuse_reader``): killing that mixer
    loses its reader and its ring. The tickets queued in the channel carry their batches, and
    the trainer, which has the dead mixer's ring mapped, reads their pixels from it: nothing is
    rebuilt, the restarted mixer goes on with a new ring, and the stream is the uninterrupted one."""
    runtime = {"readers_per_rank": 1}
    pipe = ImagePipeline(_spec(digits_shards, tmp_path / "full", runtime=runtime), show_progress=False,
                         record_digests=True)
    pipe.run()
    uninterrupted = pipe.digests
    spec = _spec(digits_shards, tmp_path / "killed", runtime=runtime, trainer={"throttle": {0: 0.03, 1: 0.03}})
    pipe = ImagePipeline(spec, show_progress=False, record_digests=True)
    killed: list = []
    thread = _kill_when(pipe, 8 * 32, ["mixer"], killed, rebuilds=False)
    summary = pipe.run()
    thread.join(timeout=5)
    assert len(killed) == 1
    kind, before, after, at, rebuilt = killed[0]
    assert before != after and at < len(_keys(uninterrupted[0])) - 2 * 32
    assert [r.shared_memory_steps for r in summary.ranks] == [r.steps for r in summary.ranks]
    for ledger in summary.ledgers:
        assert ledger.exactly_once, ledger.describe()
    assert pipe.digests == uninterrupted


# --- Ray: losing the node that runs the readers ---------------------------------------------

NODE_FAILURE = textwrap.dedent('''
    import json, os, signal, sys, threading, time
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from mixflow.config import validate_spec
    from mixflow.runtime.image_pipeline import ImagePipeline

    raw = json.loads(sys.argv[1])
    # The head holds both ranks' trainers and mixers, which on a multi-node cluster ask for a CPU each.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 6, "object_store_memory": 120 * 2**20})
    node_b = cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    node_b_id = node_b.node_id
    head_id = ray.get_runtime_context().get_node_id()
    # Soft affinity places an actor only if it asks for some resource (zero-CPU actors go elsewhere).
    readers = {"num_cpus": 0.01, "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_b_id, soft=True)}
    head = {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=head_id, soft=False)}
    pipe = ImagePipeline(validate_spec(raw), show_progress=False,
                         actor_options={"decoder": readers, "mixer": head, "trainer": head, "channel": head})
    seen = {}

    def remove_b():
        while not pipe.trainers:
            time.sleep(0.05)
        while ray.get(pipe.trainers[0].progress.remote())["samples"] < 6 * 32:
            time.sleep(0.05)
        places = [ray.get(d.placement.remote()) for d in pipe.decoders]
        seen["before"] = [p["node_id"] for p in places]
        seen["removed_at"] = ray.get(pipe.trainers[0].progress.remote())["samples"]
        # The machine goes away: its raylet and (on one host, they would linger) its worker processes.
        cluster.remove_node(node_b, allow_graceful=False)
        for p in places:
            os.kill(p["pid"], signal.SIGKILL)
        after, deadline = {}, time.time() + 120
        while len(after) < len(pipe.decoders) and time.time() < deadline:  # until every reader restarted elsewhere
            for i, d in enumerate(pipe.decoders):
                try:
                    node = ray.get(d.placement.remote(), timeout=5)["node_id"]
                except Exception:
                    continue
                if node != node_b_id:
                    after[i] = node
            time.sleep(0.2)
        seen["after"] = [after.get(i) for i in range(len(pipe.decoders))]

    watcher = threading.Thread(target=remove_b, daemon=True)
    watcher.start()
    summary = pipe.run()
    watcher.join(timeout=130)  # the readers' new placements are read while the run still goes on
    print(json.dumps({"before": seen["before"], "after": seen.get("after"), "removed_at": seen["removed_at"],
                      "rank0": summary.ranks[0].samples,
                      "node_b": node_b_id, "head": head_id, "ledgers": [l.describe() for l in summary.ledgers],
                      "exactly_once": summary.exactly_once, "samples": summary.samples}))
    ray.shutdown()
    cluster.shutdown()
''')


def test_losing_the_readers_node_continues_on_the_other(digits_shards, tmp_path):
    # Slow enough ranks that the run outlasts the readers' restart on the head, however loaded the machine.
    spec = _spec(digits_shards, tmp_path, trainer={"epochs": 1, "throttle": {0: 0.1, 1: 0.1}})
    raw = json.loads(spec.model_dump_json())
    proc = subprocess.run([sys.executable, "-c", NODE_FAILURE, json.dumps(raw)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["before"] == [out["node_b"]] * 4  # every reader ran on node B
    assert out["after"] == [out["head"]] * 4  # ... and was restarted on the head node
    # When node B went, at most a full channel (4), the mixer's requests in flight (2 per reader)
    # and the trainer's next get were decoded already; rank 0 got far more after that, so the rest
    # of its stream came from the readers restarted on the head node.
    assert out["removed_at"] + (4 + 2 * 2 + 1) * 32 < out["rank0"]
    assert out["exactly_once"], out["ledgers"]
    assert out["samples"] == 1797

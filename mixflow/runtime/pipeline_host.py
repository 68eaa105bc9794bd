"""The pipeline host: one named Ray actor that runs a pipeline's data plane for trainers it does not own.

``mixflow.start`` creates it (named in the ``mixflow`` namespace, so any process on the
cluster finds it with ``mixflow.connect(name)``) and the host starts the data plane: for
an image pipeline every rank's channel, mixer and readers (:mod:`mixflow.runtime.image_stages`);
for a token pipeline the channels and the mixture controller. It owns those actors (they
end with it), and it keeps the books a pipeline needs when the training loop is the
user's:

- *Claims.* Each rank has at most one consumer, a :class:`~mixflow.runtime.rank_feed.RankFeed`.
  A feed holds its claim through a *lease*, an object it put into Ray's object store: when
  the feed's process ends, Ray frees the object, and the next feed for that rank may take
  the rank over (a Ray Train or torchrun worker restarted after a failure).
- *Where each rank's stream begins.* A rank's producer starts when its feed asks for its
  first epoch, at the feed's position (its loaded state, or the epoch's start). A feed that
  begins a rank whose producer has already run (a take-over, or a state loaded mid-run)
  gets a new channel and a new producer at its position; the old ones are stopped.
- *The ledger.* A feed reports the keys of every epoch it finishes; the host adds the keys
  delivered before the position a rank began at (a resumed epoch) and checks, per epoch,
  that every sample reached exactly one rank once (:func:`~mixflow.runtime.ledger.check_epoch`).
- *Failures.* A watcher thread waits on the producers' tasks: a stage that fails or dies
  fails every channel with its name, so every feed raises it instead of hanging; a rank
  that has not connected within ``runtime.connect_timeout`` does the same.

Calls that can be refused return ``{"error": [exception class name, message]}``; the
client raises that :mod:`mixflow.errors` class, so the user sees a one-line error, not a
remote traceback.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import ray

from mixflow.config import PipelineSpec, TokenPipelineSpec, validate_spec
from mixflow.data.bad_samples import BadSamplePolicy, SkipRecord, write_quarantine
from mixflow.data.listing import dataset_keys, lost_keys
from mixflow.decode.device import resolve_decode_device
from mixflow.runtime import image_checkpoint as ckpt
from mixflow.runtime.actor_names import named, new_name
from mixflow.runtime.batch_ring import remove_rings
from mixflow.runtime.placement import multi_node, rank_placement, stage_names, wait_started, where
from mixflow.runtime.channel import Channel
from mixflow.runtime.image_pipeline import prepare_shards
from mixflow.runtime.image_stages import start_image_stages, start_rank_stage
from mixflow.runtime.ledger import check_epoch
from mixflow.runtime.mixture_controller import MixtureController
from mixflow.runtime.stage_failure import stage_error, stop_stages
from mixflow.runtime.summary import RankSummary, RunSummary
from mixflow.runtime.token_pipeline import (TokenRunSummary, grad_stats_every, held_out_sets, policy_params,
                                            prepare_domains,
                                            token_stream_fields)
from mixflow.runtime.token_producer import TokenProducer
from mixflow.data.token_shard_writer import read_manifest

NAMESPACE = "mixflow"
ACTOR_PREFIX = "pipeline:"
WATCH_S = 0.5


def host_actor_name(name: str) -> str:
    return ACTOR_PREFIX + name


def refused(kind: str, message: str) -> dict:
    return {"error": [kind, message]}


def _lease_alive(lease: list) -> bool:
    """Whether the process that put ``lease[0]`` is still alive (its objects die with it)."""
    try:
        ray.get(lease[0], timeout=10)
        return True
    except (ray.exceptions.OwnerDiedError, ray.exceptions.ObjectLostError):
        return False
    except ray.exceptions.GetTimeoutError:
        return True


@ray.remote(num_cpus=0, max_concurrency=32)
class PipelineHost:
    def __init__(self, spec_json: str, name: str):
        import json

        self.spec: PipelineSpec | TokenPipelineSpec = validate_spec(json.loads(spec_json))
        self.name = name
        self.kind = self.spec.kind
        self.world_size = self.spec.trainer.ranks
        self._lock = threading.RLock()
        self._claims: dict[int, dict] = {}  # rank -> {"id", "lease", "where"}
        self._connected: set[int] = set()
        self._failure: list[str] | None = None  # [error class, message]
        self._watch: dict = {}  # producer task ref -> stage name
        self._begun: dict[int, dict] = {}  # rank -> where its current stream began
        self._results: dict[int, dict[int, dict]] = {}  # epoch -> rank -> what its feed reported
        self._generation = [0] * self.world_size  # rebuilds per rank (names rings, orders reports)
        self._stopped = False
        self._first_begin: float | None = None
        self._last_done: float | None = None
        self.ring_tag = f"h{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.channels: list = []
        self.producers: list = [None] * self.world_size  # mixers (image) or token producers, by rank
        self.decoders: list = []
        self.controller = None
        self._channel_names: dict = {}  # rank -> ActorName of its current channel (token producers look it up)
        self._decoder_names: list = []
        self._feed_nodes: dict[int, str | None] = {}  # rank -> node its current feed runs on
        self.startup_s = 0.0
        self._kind_info: dict = {}

    # --- start -----------------------------------------------------------------------------

    def start(self) -> dict:
        """Start the data plane (no trainers); returns what a client needs to know."""
        start = time.perf_counter()
        try:
            info = self._start_image() if self.kind == "image" else self._start_tokens()
        except Exception as exc:  # noqa: BLE001 - returned to the caller, named
            from mixflow.errors import MixflowError

            kind = type(exc).__name__ if isinstance(exc, MixflowError) else "PipelineError"
            return refused(kind, f"pipeline {self.name!r} could not start: {exc}")
        self._kind_info = info  # the token pipeline's vocab_size, pad_id, grad_stats_every
        self.startup_s = time.perf_counter() - start
        self._started_at = time.monotonic()
        threading.Thread(target=self._watch_loop, daemon=True, name="mixflow-host-watch").start()
        return self.info()

    def info(self) -> dict:
        """What every client of the pipeline gets (``mixflow.start`` and ``mixflow.connect`` alike)."""
        return {**self._kind_info, "name": self.name, "kind": self.kind, "world_size": self.world_size,
                "spec_json": self.spec.model_dump_json(), "stream": self._stream,
                "epochs": self.spec.trainer.epochs if self.kind == "image" else 1,
                "node_id": ray.get_runtime_context().get_node_id()}

    def _start_image(self) -> dict:
        spec = self.spec
        listing = BadSamplePolicy(spec.on_error)
        shards = prepare_shards(spec, None, listing)
        self._listed = listing.drain()  # shard-wide losses: their keys miss every epoch
        self._lost = lost_keys(self._listed, shards)
        self._shards = shards
        self._expected = set(dataset_keys(shards)) | set(self._lost)
        self._stream = ckpt.stream_fields(spec, shards)
        self.device = resolve_decode_device(spec.decode.device, ray.cluster_resources().get("GPU", 0) > 0)
        state = ckpt.initial_state(spec, shards)
        stages = start_image_stages(spec, shards, self.device, state, self._ring(0), {})
        self.channels, self.producers, self.decoders = stages.channels, stages.mixers, stages.decoders
        self._decoder_names = stages.decoder_names
        wait_started(stage_names(mixer=self.producers, channel=self.channels, reader=self.decoders),
                     spec.runtime.start_timeout)
        return {}

    def _ring(self, rank: int) -> str:
        """The ring tag of ``rank``'s current stage (every rebuild gets a new ring)."""
        return f"{self.ring_tag}-g{self._generation[rank]}"

    def _start_tokens(self) -> dict:
        spec, t = self.spec, self.spec.trainer
        self._domain_dirs = prepare_domains(spec, None)
        val, _test = held_out_sets(self._domain_dirs, spec.data.seq_len, spec.data.eval_sequences)
        self._val = val
        manifest = read_manifest(self._domain_dirs[0] / "train")
        self._stream = token_stream_fields(spec, self._domain_dirs)
        spec.run_path.mkdir(parents=True, exist_ok=True)
        self._controller_origin: int | None = None  # the step the controller's state was loaded at
        self.controller = self._new_controller(None)
        self.channels = [self._new_channel(r) for r in range(t.ranks)]
        wait_started(stage_names(self.controller, channel=self.channels), spec.runtime.start_timeout)
        return {"vocab_size": manifest.vocab_size, "pad_id": manifest.pad_id,
                "grad_stats_every": grad_stats_every(spec)}

    def _new_controller(self, state: dict | None):
        from mixflow.runtime.state_journal import StateJournal

        spec = self.spec
        params = policy_params(spec)
        path = spec.run_path / "controller_state.json"
        StateJournal(path).remove()
        self._controller_name = new_name("controller")
        return MixtureController.options(**named(self._controller_name)).remote(
            spec.mixture.policy, params, len(self._domain_dirs), self.world_size,
                                        str(path), state)

    def _new_channel(self, rank: int):
        name = new_name(f"channel-r{rank}")
        self._channel_names[rank] = name
        return Channel.options(**named(name)).remote(f"r{rank}", self.spec.channel.max_items,
                                                     self.spec.channel.max_bytes)

    # --- claims ----------------------------------------------------------------------------

    def claim(self, rank: int, world_size: int, feed_id: str, lease: list, where: str) -> dict:
        """Make the feed ``feed_id`` the consumer of ``rank``; refused for a wrong world size or
        rank, or while another live feed holds the rank."""
        if self._failure:
            return refused(*self._failure)
        if world_size != self.world_size:
            return refused("WorldSizeError", f"pipeline {self.name!r} was started with trainer.ranks="
                           f"{self.world_size}; this feed asked for world_size={world_size}")
        if not (isinstance(rank, int) and 0 <= rank < self.world_size):
            return refused("WorldSizeError", f"pipeline {self.name!r} has ranks 0..{self.world_size - 1}; "
                           f"this feed asked for rank {rank!r}")
        with self._lock:
            held = self._claims.get(rank)
        if held is not None and held["id"] != feed_id and _lease_alive(held["lease"]):
            return refused("RankInUseError", f"rank {rank} of pipeline {self.name!r} already has a consumer "
                           f"({held['where']}); one feed per rank: close() that feed first (a feed whose "
                           "process has ended is replaced)")
        with self._lock:
            self._claims[rank] = {"id": feed_id, "lease": lease, "where": where}
            self._connected.add(rank)
        return {"ok": True}

    def release(self, rank: int, feed_id: str) -> None:
        with self._lock:
            if self._claims.get(rank, {}).get("id") == feed_id:
                del self._claims[rank]

    def _holds(self, rank: int, feed_id: str) -> dict | None:
        if self._failure:
            return refused(*self._failure)
        with self._lock:
            if self._claims.get(rank, {}).get("id") != feed_id:
                return refused("RankInUseError", f"rank {rank} of pipeline {self.name!r} was taken over by "
                               "another feed; this one can no longer consume it")
        return None

    # --- where a rank's stream begins ------------------------------------------------------

    def begin(self, rank: int, feed_id: str, start: dict) -> dict:
        """Start (or restart) ``rank``'s producer at ``start`` and return the rank's channel (and
        the producer that hands out ticketed batches). ``start``: image ``{"position",
        "skipped"}``; tokens ``{"step", "producer", "controller"}`` (the last consumed step)."""
        refusal = self._holds(rank, feed_id)
        if refusal:
            return refusal
        with self._lock:
            if self._first_begin is None:
                self._first_begin = time.perf_counter()
            if self.kind == "image":
                return self._begin_image(rank, start)
            return self._begin_tokens(rank, start)

    def _stop_rank(self, rank: int, reason: str) -> None:
        """Stop rank's producer and channel (its old feed, if alive, sees ``reason``)."""
        self._watch = {ref: name for ref, name in self._watch.items() if name != self._stage_name(rank)}
        old_channel, old_producer = self.channels[rank], self.producers[rank]
        old_channel.fail.remote(reason)
        if old_producer is not None:
            if self.kind == "image":
                ray.wait([old_producer.close_ring.remote()], timeout=2.0)
            ray.kill(old_producer, no_restart=True)
        ray.kill(old_channel, no_restart=True)
        self._generation[rank] += 1

    def _stage_name(self, rank: int) -> str:
        return f"{'mixer' if self.kind == 'image' else 'producer'} r{rank}"

    def _apart(self, rank: int, node: str | None) -> bool:
        """Whether ``rank``'s mixer runs on another node than its feed's ``node`` while the spec
        wants them together (``runtime.placement: colocate``, a cluster of several nodes)."""
        if node is None or self.spec.runtime.placement != "colocate" or not multi_node():
            return False
        return ray.get(self.producers[rank].placement.remote())["node_id"] != node

    def _begin_image(self, rank: int, start: dict) -> dict:
        position = start["position"]
        node = start.get("node")  # where the feed runs: the rank's new stage goes there (the ring)
        apart = rank not in self._begun and self._apart(rank, node)
        if rank in self._begun or apart:  # a new stage at the position (on the feed's node when apart)
            self._stop_rank(rank, f"rank {rank} of pipeline {self.name!r} began again at epoch "
                                  f"{position['epoch']} step {position['step']} (a resumed or new feed)")
            k = self.spec.runtime.readers_per_rank
            state = ckpt.initial_state(self.spec, self._shards)
            state["rank_states"][rank]["position"] = position
            state["epoch"] = position["epoch"]
            channel, mixer = start_rank_stage(self.spec, self._shards, self.device, state, rank,
                                              self._decoder_names[rank * k:(rank + 1) * k], self._ring(rank), {},
                                              node=node if self.spec.runtime.placement == "colocate" else None)
            self.channels[rank], self.producers[rank] = channel, mixer
        self._feed_nodes[rank] = node
        ref = self.producers[rank].run.remote(self.spec.trainer.epochs - 1, position)
        self._watch[ref] = self._stage_name(rank)
        self._begun[rank] = {"position": dict(position), "skipped": list(start.get("skipped", []))}
        for epoch in list(self._results):  # what this rank reported from its position's epoch on is redone
            if epoch >= position["epoch"]:
                self._results[epoch].pop(rank, None)
        return {"channel": self.channels[rank], "holder": self.producers[rank]}

    def _begin_tokens(self, rank: int, start: dict) -> dict:
        t = self.spec.trainer
        last = start.get("step")
        first_step = 0 if last is None else last + 1
        snapshot = start.get("controller")
        origin = None if snapshot is None else first_step
        if origin != self._controller_origin or (snapshot is None and rank in self._begun):
            # A stream from another point: a new controller there, every rank begins again from it.
            for r in range(self.world_size):
                if self.producers[r] is not None:
                    self._stop_rank(r, f"rank {rank} of pipeline {self.name!r} began the stream again at step "
                                       f"{first_step}; every rank must begin there (load the state saved "
                                       "at the same step)")
                    self.channels[r] = self._new_channel(r)
                    self.producers[r] = None
            ray.kill(self.controller, no_restart=True)
            self.controller = self._new_controller(snapshot)
            self._controller_origin = origin
            self._begun.clear()
        elif self.producers[rank] is not None:
            self._stop_rank(rank, f"rank {rank} of pipeline {self.name!r} began again at step {first_step}")
            self.channels[rank] = self._new_channel(rank)
        producer = TokenProducer.remote(rank, t.ranks, [d / "train" for d in self._domain_dirs],
                                        self.spec.data.seq_len, t.batch_size, self.spec.seed, self.spec.on_error,
                                        self._controller_name, self._channel_names[rank], start.get("producer"),
                                        first_step)
        self.producers[rank] = producer
        ref = producer.run.remote(first_step, t.steps)
        self._watch[ref] = self._stage_name(rank)
        self._begun[rank] = {"step": first_step}
        self._results.get(0, {}).pop(rank, None)
        return {"channel": self.channels[rank], "controller": self.controller,
                "val": [v[rank::self.world_size] for v in self._val]}

    # --- what the feeds report -------------------------------------------------------------

    def epoch_done(self, rank: int, feed_id: str, epoch: int, result: dict) -> dict:
        """A feed finished ``epoch``: its keys, quarantine records and timings."""
        refusal = self._holds(rank, feed_id)
        if refusal:
            return refusal
        with self._lock:
            self._results.setdefault(epoch, {})[rank] = result
            self._last_done = time.perf_counter()
        return {"ok": True}

    def stages(self) -> dict:
        """The data plane's actors by kind (for tools and tests that inspect or kill them)."""
        return {"channels": list(self.channels), "producers": list(self.producers), "decoders": list(self.decoders),
                "controller": self.controller}

    def failure(self) -> list[str] | None:
        return self._failure

    def _fail(self, kind: str, message: str) -> None:
        with self._lock:
            if self._failure is not None:
                return
            self._failure = [kind, message]
        for ch in self.channels:
            ch.fail.remote(message)

    def _watch_loop(self) -> None:
        timeout = self.spec.runtime.connect_timeout
        while not self._stopped:
            refs = list(self._watch)
            if refs:
                ready, _ = ray.wait(refs, num_returns=1, timeout=WATCH_S)
            else:
                ready = []
                time.sleep(WATCH_S)
            for ref in ready:
                name = self._watch.pop(ref, None)
                if name is None:
                    continue  # a stage stopped on purpose (rebuilt)
                try:
                    ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - every feed gets it, named
                    if not self._stopped:
                        self._fail("PipelineError", str(stage_error(name, exc)))
            missing = sorted(set(range(self.world_size)) - self._connected)
            if missing and time.monotonic() - self._started_at > timeout and self._failure is None:
                self._fail("RankNotConnectedError",
                           f"pipeline {self.name!r}: rank(s) {', '.join(map(str, missing))} of {self.world_size} "
                           f"never connected within {timeout:g} s (runtime.connect_timeout); "
                           "start a feed for every rank")

    # --- the end ---------------------------------------------------------------------------

    def close(self) -> dict:
        """Stop the data plane; returns the summary (ledger per epoch) and the failure, if any."""
        self._stopped = True
        with self._lock:
            summary = self._image_summary() if self.kind == "image" else self._token_summary()
            others = [p for p in self.producers if p is not None] + self.decoders
            if self.controller is not None:
                others.append(self.controller)
            if self.kind == "image":
                ray.wait([m.close_ring.remote() for m in self.producers], num_returns=len(self.producers),
                         timeout=2.0)
            stop_stages(None, self.channels, [], others)
            remove_rings(self.ring_tag)
            self.channels, self.producers, self.decoders, self.controller = [], [], [], None
        return {"summary": summary, "failure": self._failure}

    def _image_summary(self) -> RunSummary:
        spec = self.spec
        ranks = [RankSummary(r) for r in range(self.world_size)]
        ledgers, skipped, suspects = [], list(self._listed), []
        peaks = ray.get([ch.stats.remote() for ch in self.channels])
        for epoch in sorted(self._results):
            results = self._results[epoch]
            for r, res in results.items():
                ranks[r].add_epoch(res)
                suspects += [SkipRecord(**rec) for rec in res.get("suspect", [])]
            if len(results) < self.world_size:
                continue  # not every rank finished this epoch: no verdict for it
            epoch_skips = [SkipRecord(**rec) for res in results.values() for rec in res["skipped"]]
            state = self._epoch_start_state(epoch)
            before_skips = ckpt.skipped_records(state)
            skipped += before_skips + epoch_skips
            ledgers.append(check_epoch(epoch, self._expected, {r: res["keys"] for r, res in results.items()},
                                       [s.key for s in before_skips + epoch_skips if s.key is not None]
                                       + self._lost, ckpt.delivered_before(state, self._shards)))
        start, end = self._first_begin, self._last_done
        wall_s = (end - start) if start is not None and end is not None else 0.0
        summary = RunSummary(self.name, getattr(self, "device", "cpu"), self.startup_s, wall_s,
                             sum(r.samples for r in ranks), ranks, ledgers, len(skipped), peaks,
                             placement=self._placement(), suspect=len(suspects))
        summary.save(spec.run_path / "summary.json")
        if skipped:
            write_quarantine(spec.run_path / "quarantine.jsonl", skipped)
        if suspects:
            write_quarantine(spec.run_path / "suspect.jsonl", suspects)
        return summary

    def _placement(self) -> list[dict]:
        """Per rank, the node of its feed (the trainer: the user's process), mixer, channel, readers."""
        nodes = where(stage_names(mixer=self.producers, channel=self.channels, reader=self.decoders))
        return rank_placement(nodes, self.world_size, self.spec.runtime.readers_per_rank if self.decoders else 0,
                              trainers=self._feed_nodes)

    def _epoch_start_state(self, epoch: int) -> dict:
        """The pipeline state at the points the ranks began ``epoch`` from (their starts when
        they began in it, else the epoch's start): what was delivered before comes from it."""
        state = ckpt.initial_state(self.spec, self._shards)
        state["epoch"] = epoch
        for r, begun in self._begun.items():
            if begun["position"]["epoch"] == epoch:
                state["rank_states"][r] = {"position": begun["position"], "skipped": begun["skipped"]}
            else:
                state["rank_states"][r] = {"position": ckpt.fresh_position(epoch), "skipped": []}
        for rs in state["rank_states"]:
            rs["position"] = {**ckpt.fresh_position(epoch), **rs["position"]}
        return state

    def _token_summary(self) -> TokenRunSummary:
        spec = self.spec
        results = self._results.get(0, {})
        ranks = [results.get(r, {}) for r in range(self.world_size)]
        trajectory, stats, reports = [], {}, []
        if self.controller is not None:
            trajectory, stats, reports = ray.get([self.controller.get_trajectory.remote(),
                                                  self.controller.stats.remote(),
                                                  self.controller.get_merged_log.remote()])
        skipped = [SkipRecord(**rec) for r in ranks for rec in r.get("skipped", [])]
        start, end = self._first_begin, self._last_done
        summary = TokenRunSummary(spec.name, spec.mixture.policy, [d.name for d in self._domain_dirs],
                                  self.startup_s, (end - start) if start and end else 0.0,
                                  sum(r.get("tokens", 0) for r in ranks), max((r.get("steps", 0) for r in ranks),
                                                                              default=0),
                                  [r.get("wait_s", 0.0) for r in ranks], [], trajectory, stats, len(skipped),
                                  [], [r.get("batches", []) for r in ranks], reports)
        summary.save(spec.run_path / "summary.json")
        summary.warn_missing_inputs()
        if skipped:
            write_quarantine(spec.run_path / "quarantine.jsonl", skipped)
        return summary

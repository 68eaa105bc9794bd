"""The image pipeline graph: shards -> decoder actors -> mixer actors -> channels -> trainer ranks.

Each trainer rank runs the spec's entrypoint on its feed: a user's ``trainer.entrypoint``, or
the built-in loop that ``trainer.model`` names (:mod:`mixflow.demos`); both are run alike.

Each trainer rank owns ``readers_per_rank`` decoder actors (disjoint shards, reassigned
each epoch), one mixer actor and one credit-based channel, so a slow rank only slows
its own producers. With one reader per rank (and ``runtime.fuse_reader``) the mixer runs
that reader itself and there are no decoder actors. Mixers produce straight through all epochs; the driver
shows progress while the ranks train and checks the delivery ledger of every epoch from the
ranks' feeds' accounts.

Checkpoint and resume (:mod:`mixflow.runtime.image_checkpoint`): ``state_dict()`` is
built from what the trainers consumed; ``ImagePipeline(spec, resume_from=state)``
continues the exact stream (same ranks and readers per rank) or, with other
numbers, re-splits the rest of the epoch (elastic: nothing lost or repeated, order
differs). ``run(stop_at=(epoch, step))`` stops once every rank consumed ``step``
batches of ``epoch`` (their feeds end there), saving the state and each rank's checkpoint
(stream state and what its entrypoint registered with ``context.on_checkpoint``) in the run
directory. Readers and mixers are restartable Ray actors whose requests name the
batch, so killing one (or losing the node that runs readers) loses and repeats
nothing; the ledger of every epoch says so.
"""

from __future__ import annotations

import os
import time
import uuid
import warnings
from pathlib import Path

import ray
from rich.console import Console
from rich.markup import escape

from mixflow.config import PipelineSpec
from mixflow.data.bad_samples import BadSamplePolicy, SkipRecord, write_quarantine
from mixflow.data.demo_sets import build_demo
from mixflow.data.label_check import check_num_classes
from mixflow.data.shard_assignment import starved_warning
from mixflow.data.listing import ShardInfo, dataset_keys, list_shards, lost_keys
from mixflow.data.object_store import PROCESS_STATS, index_dir, is_url, stats_since
from mixflow.decode.device import resolve_decode_device
from mixflow.runtime.batch_ring import remove_rings
from mixflow.runtime import image_checkpoint as ckpt
from mixflow.runtime.ledger import EpochLedger, check_epoch
from mixflow.runtime.image_stages import start_image_stages
from mixflow.runtime.placement import (actor_options, rank_nodes, rank_placement, stage_names, stage_options,
                                      wait_started)
from mixflow.runtime.progress import PipelineProgress
from mixflow.runtime.ray_session import ensure_ray
from mixflow.runtime.stage_failure import stop_stages, wait_for_stages
from mixflow.errors import PipelineError
from mixflow.runtime.entrypoint import entrypoint_of
from mixflow.runtime.summary import RankSummary, RunSummary, store_total
from mixflow.runtime.trainer_actor import TrainerRank


def prepare_shards(spec: PipelineSpec, console: Console | None = None,
                   policy: BadSamplePolicy | None = None) -> list[ShardInfo]:
    """List the spec's shards, building the demo set first if asked and absent; unusable shards
    go through ``policy`` (raise when None). Then the shards are checked against the spec:
    ``data.num_classes`` against their labels (a :class:`~mixflow.errors.ConfigError`), and
    ranks or readers the layout leaves without data are warned about (on ``console``, else
    with :func:`warnings.warn`)."""
    if is_url(spec.data.shards):  # object storage: listing, indexes and classes.json come from the bucket
        store = spec.data.store
        shards = list_shards(spec.data.shards, policy, store)
        check_num_classes(index_dir(spec.data.shards, store), shards, spec.data.num_classes)
    else:
        shard_dir = Path(spec.data.shards)
        if spec.data.demo and not any(shard_dir.glob("*.tar")):
            if console:
                console.print(f"building demo set '{spec.data.demo}' into {escape(str(shard_dir))}")
            build_demo(spec.data.demo, shard_dir, max_bytes=spec.data.shard_size)
        shards = list_shards(shard_dir, policy)
        check_num_classes(shard_dir, shards, spec.data.num_classes)
    starved = starved_warning([s.num_samples for s in shards], spec.trainer.ranks, spec.runtime.readers_per_rank,
                              spec.seed, spec.trainer.epochs)
    if starved and console:
        console.print(f"[yellow]warning:[/] data.shards: {escape(starved)}", markup=True, highlight=False)
    elif starved:
        warnings.warn(f"data.shards: {starved}", stacklevel=2)
    return shards


class ImagePipeline:
    """``resume_from``: a state from :meth:`state_dict` (or the path of one saved as JSON).
    ``actor_options``: extra Ray ``.options()`` per actor kind (``"decoder"``, ``"mixer"``,
    ``"trainer"``, ``"channel"``), e.g. ``{"decoder": {"resources": {"storage": 0.01}}}`` to
    place the readers on the nodes that hold the data."""

    ACTOR_KINDS = ("decoder", "mixer", "trainer", "channel")

    def __init__(self, spec: PipelineSpec, console: Console | None = None, show_progress: bool = True,
                 record_digests: bool = False, resume_from: dict | str | Path | None = None,
                 actor_options: dict[str, dict] | None = None):
        unknown = set(actor_options or {}) - set(self.ACTOR_KINDS)
        if unknown:
            raise ValueError(f"actor_options: unknown actor kind(s) {sorted(unknown)}; "
                             f"allowed: {', '.join(self.ACTOR_KINDS)}")
        self.spec = spec
        self.resume_from = ckpt.load_state(resume_from) if isinstance(resume_from, (str, Path)) else resume_from
        self.actor_options = {kind: dict((actor_options or {}).get(kind, {})) for kind in self.ACTOR_KINDS}
        self._state: dict | None = None
        self._shards: list[ShardInfo] = []
        self.record_digests = record_digests
        self.digests: dict[int, list] = {}
        self.rank_results: list = []  # what each rank's entrypoint returned, by rank
        self.placement: list[dict] = []  # per rank, the node of each of its actors
        self.console = console or Console()
        self.show_progress = show_progress
        self.decoders: list = []
        self.mixers: list = []
        self.channels: list = []
        self.trainers: list = []
        self.ring_tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # names this pipeline's shared-memory rings

    def _gpus_in_cluster(self) -> bool:
        return ray.cluster_resources().get("GPU", 0) > 0

    def _start_state(self, shards: list[ShardInfo]) -> dict:
        """Where this run starts: the beginning, or the resumed state (re-cut when elastic)."""
        if self.resume_from is None:
            return ckpt.initial_state(self.spec, shards)
        ckpt.check_resumable(self.resume_from, self.spec, shards)
        return ckpt.elastic_state(self.resume_from, self.spec, shards)

    def _start_actors(self, shards: list[ShardInfo], device: str, state: dict) -> None:
        spec, ranks = self.spec, self.spec.trainer.ranks
        spec_json = spec.model_dump_json()
        opts = self.actor_options
        nodes = rank_nodes(spec, stage_options(spec, "trainer"))  # multi-node: a rank's actors on one node
        stages = start_image_stages(spec, shards, device, state, self.ring_tag, opts, nodes)
        self.channels, self.mixers, self.decoders = stages.channels, stages.mixers, stages.decoders
        context = {"cuts": state["cuts"], "skipped_before_cuts": state["skipped_before_cuts"]}
        stream = ckpt.stream_fields(spec, shards)
        self.trainers = [TrainerRank.options(**actor_options(spec, "trainer", device, nodes[r], opts)).remote(
            spec_json, r, ranks, self.channels[r], self.record_digests, {**state["rank_states"][r], **context},
            self.mixers[r], stream, [os.getcwd()])
            for r in range(ranks)]
        # Start-up ends when every stage is up: mixers and readers build their DALI pipelines and
        # load the compiled mixing kernels in their constructors.
        started = wait_started(self._named_actors(), spec.runtime.start_timeout)
        saved = state.get("checkpoints")
        if saved and len(saved) != ranks:
            saved = [saved[0]] * ranks  # elastic: data-parallel ranks hold the same weights
        master_addr, master_port = ray.get(self.trainers[0].address.remote())
        ray.get([t.setup.remote(master_addr, master_port, saved[r] if saved else None)
                 for r, t in enumerate(self.trainers)])
        self.placement = rank_placement(started, ranks, spec.runtime.readers_per_rank if self.decoders else 0)

    def _named_actors(self) -> dict:
        """Stage name (as errors name them) -> actor, for every actor of the pipeline."""
        return stage_names(trainer=self.trainers, mixer=self.mixers, channel=self.channels, reader=self.decoders)

    def state_dict(self) -> dict:
        """The pipeline state: from the trainers while running, else as the last run left it."""
        if self.trainers:
            return ckpt.build_state(self.spec, self._shards,
                                    ray.get([t.stream_state.remote() for t in self.trainers]))
        if self._state is None:
            raise ValueError("state_dict: the pipeline has not run yet")
        return self._state

    def _checkpoint(self, run_dir: Path) -> dict:
        """Every rank saves model + stream state (one call each); the state is saved beside them."""
        paths = ray.get([t.save_checkpoint.remote(str(run_dir / "checkpoints" / f"rank{r}.pt"))
                         for r, t in enumerate(self.trainers)])
        state = ckpt.build_state(self.spec, self._shards, ray.get([t.stream_state.remote() for t in self.trainers]),
                                 paths)
        ckpt.save_state(state, run_dir / "pipeline_state.json")
        return state

    def _store_stats(self, listed: dict) -> dict:
        """The object-store counts of this run: the driver's listing plus every reader's process
        (decoder actors, or mixers running their reader; a restarted actor counts from its restart)."""
        readers = self.decoders or self.mixers
        return store_total(listed, ray.get([actor.store_stats.remote() for actor in readers]))

    def _stop(self, reason: str | None = None) -> None:
        # Mixers on other nodes unlink their own rings (best effort: a dead mixer cannot answer).
        ray.wait([m.close_ring.remote() for m in self.mixers], num_returns=len(self.mixers), timeout=2.0)
        stop_stages(reason, self.channels, self.trainers, self.mixers + self.decoders)
        self.trainers, self.mixers, self.decoders, self.channels = [], [], [], []
        remove_rings(self.ring_tag)  # rings of mixers killed before their trainer mapped them

    def _wait(self, refs: dict, progress: PipelineProgress, until_done: set) -> dict:
        """Wait for the refs in ``until_done``; any ref in ``refs`` that fails stops the pipeline."""
        return wait_for_stages(refs, until_done, self.channels, self.trainers, progress, "samples")

    def run(self, stop_at: tuple[int, int] | None = None) -> RunSummary:
        """Run to the end of ``trainer.epochs``, or, with ``stop_at=(epoch, step)``, until every rank
        has consumed ``step`` batches of ``epoch`` (or all of it): then the state and the ranks'
        checkpoints are saved in the run directory (``pipeline_state.json``, ``checkpoints/``) and
        the run stops. The summary's ledgers cover the epochs completed in this run."""
        spec = self.spec
        listing = BadSamplePolicy(spec.on_error)
        before = PROCESS_STATS.as_dict()
        shards = prepare_shards(spec, self.console, listing)
        listed_stats = stats_since(before)
        # Shard-wide losses found by the listing (records without an epoch): their keys miss every epoch.
        listed = listing.drain()
        lost = lost_keys(listed, shards)
        self._shards = shards
        state = self._start_state(shards)
        if stop_at is not None and not (state["epoch"] <= stop_at[0] < spec.trainer.epochs and stop_at[1] >= 0):
            raise ValueError(f"stop_at: epoch must be in {state['epoch']}..{spec.trainer.epochs - 1} and step >= 0, "
                             f"got {stop_at}")
        last_epoch = stop_at[0] if stop_at is not None else spec.trainer.epochs - 1
        expected = set(dataset_keys(shards)) | set(lost)
        ensure_ray(spec.runtime.address, spec.runtime.runtime_env)
        device = resolve_decode_device(spec.decode.device, self._gpus_in_cluster())
        run_dir = spec.run_path
        ranks = [RankSummary(r) for r in range(spec.trainer.ranks)]
        ledgers: list[EpochLedger] = []
        skipped: list[SkipRecord] = list(listed)
        suspects: list[SkipRecord] = []  # delivered, but libjpeg warns about their scan data
        start = time.perf_counter()
        try:
            self._start_actors(shards, device, state)
            startup_s = time.perf_counter() - start
            start = time.perf_counter()
            total = len(expected) * (last_epoch + 1 - state["epoch"])
            with PipelineProgress(total, self.show_progress, self.console) as progress:
                producers = {m.run.remote(last_epoch): f"mixer r{r}" for r, m in enumerate(self.mixers)}
                consumers = {t.run.remote(stop_at): f"trainer r{r}" for r, t in enumerate(self.trainers)}
                results = self._wait(producers | consumers, progress, set(consumers))
            rank_runs = sorted((results[ref] for ref in consumers), key=lambda res: res["rank"])
            self.rank_results = [res["result"] for res in rank_runs]
            by_rank = [{e["epoch"]: e for e in res["epochs"]} for res in rank_runs]
            for epoch in range(state["epoch"], last_epoch + 1):
                short = [r for r, epochs in enumerate(by_rank) if epoch not in epochs]
                if short:
                    raise PipelineError(f"trainer r{short[0]}: {entrypoint_of(spec)} returned before its feed "
                                        f"finished epoch {epoch} (an entrypoint consumes every epoch of its feed, "
                                        f"from feed.current_epoch to feed.epochs - 1, each to its end)")
                trainer_results = [epochs[epoch] for epochs in by_rank]
                epoch_skips = [SkipRecord(**rec) for res in trainer_results for rec in res["skipped"]]
                skipped += epoch_skips
                suspects += [SkipRecord(**rec) for res in trainer_results for rec in res.get("suspect", [])]
                for res in trainer_results:
                    self.digests.setdefault(res["rank"], []).extend(res["digests"])
                    ranks[res["rank"]].add_epoch(res)
                if stop_at is not None and epoch == stop_at[0]:
                    break
                if epoch == state["epoch"]:  # what this epoch delivered before the resumed state
                    epoch_skips = ckpt.skipped_records(state) + epoch_skips
                    before = ckpt.delivered_before(state, shards)
                else:
                    before = []
                ledgers.append(check_epoch(epoch, expected, {r["rank"]: r["keys"] for r in trainer_results},
                                           [s.key for s in epoch_skips if s.key is not None] + lost, before))
            wall_s = time.perf_counter() - start
            if stop_at is None:
                ray.get(list(producers))
            peaks = ray.get([ch.stats.remote() for ch in self.channels])
            store = self._store_stats(listed_stats) if is_url(spec.data.shards) else {}
            self._state = self._checkpoint(run_dir) if stop_at is not None else ckpt.build_state(
                spec, shards, ray.get([t.stream_state.remote() for t in self.trainers]))
        except BaseException as exc:
            self._stop(f"pipeline stopping: {exc or type(exc).__name__}")
            raise
        self._stop()
        summary = RunSummary(spec.name, device, startup_s, wall_s, sum(r.samples for r in ranks),
                             ranks, ledgers, len(skipped), peaks, sum(1 for r in skipped if r.key is None),
                             self.placement, store, len(suspects))
        summary.save(run_dir / "summary.json")
        if skipped:
            write_quarantine(run_dir / "quarantine.jsonl", skipped)
        if suspects:
            write_quarantine(run_dir / "suspect.jsonl", suspects)
        return summary

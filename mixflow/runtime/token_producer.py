"""Token producer actor: one per trainer rank, builds mixed-domain batches into the rank's channel.

For every global step it asks the controller which mixture the step uses
(``mixture_for_step``: the same answer for every rank), draws the step's domain
sequence from its exact schedule, packs sequences from its per-domain token sources
(its own disjoint shards), tags the batch with the version and realised counts, and
puts it into its credit-based channel (which blocks when the rank is behind).

Each put is tagged with the step and the producer's state after it; the channel keeps
the next batch of the stream only, so a producer killed and restarted by Ray resumes
from the channel's position: nothing lost, nothing twice. Skipped documents travel
with their batch, so their quarantine records are not lost with the actor either.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict

import ray

from mixflow.data.bad_samples import BadSamplePolicy
from mixflow.data.mixed_token_batches import MixedTokenBatcher
from mixflow.data.token_source import TokenSource
from mixflow.mixture.schedule import ExactSchedule
from mixflow.runtime.actor_names import resolve
from mixflow.runtime.mix_stage import batch_nbytes
from mixflow.runtime.placement import Placed
from mixflow.seeding import numpy_rng


# Two threads: ``store_stats`` answers while ``run`` waits on a full channel (a stopped run's summary).
@ray.remote(num_cpus=0, max_concurrency=2, max_restarts=-1, max_task_retries=-1)
class TokenProducer(Placed):
    def __init__(self, rank: int, world_size: int, domain_dirs: list, seq_len: int, batch_size: int,
                 seed: int, on_error: str, controller, channel, state: dict | None = None, first_step: int = 0):
        self.rank = rank
        # Restartable: its peers come by name (ActorName) so a restart needs no handle.
        controller, channel = resolve(controller), resolve(channel)
        self.policy = BadSamplePolicy(on_error)
        sources = [TokenSource(d, seq_len, seed=seed, reader=rank, num_readers=world_size, policy=self.policy)
                   for d in domain_dirs]
        self.batcher = MixedTokenBatcher(sources, ExactSchedule(len(sources), numpy_rng(seed, 0, "schedule", rank), rule="tijdeman"), batch_size)
        # Where the stream stands: the channel tracks the step and producer state after the last
        # batch it accepted, so a restarted producer (Ray restarts it) goes on from there.
        at = ray.get(channel.open.remote({"epoch": 0, "step": first_step - 1, "state": state}))
        if at["state"] is not None:
            self.batcher.load_state_dict(at["state"])
        self.next_step = at["step"] + 1
        self.controller = controller
        self.channel = channel
        self.progress = {"steps": 0, "sequences": 0, "put_wait_s": 0.0, "mixture_wait_s": 0.0}

    def run(self, first_step: int, last_step: int) -> dict:
        """Produce global steps ``first_step .. last_step - 1``, then an end marker."""
        p = self.progress
        for step in range(max(first_step, self.next_step), last_step):
            t0 = time.perf_counter()
            mixture = ray.get(self.controller.mixture_for_step.remote(step))
            t1 = time.perf_counter()
            batch = self.batcher.build(step, mixture)
            batch["skipped"] = [asdict(r) for r in self.policy.drain()]
            # by value: queued batches must outlive this actor (an ObjectRef dies with its owner)
            ray.get(self.channel.put.remote(batch, batch_nbytes(batch),
                                            {"epoch": 0, "step": step, "state": batch["state"]}))
            p["mixture_wait_s"] += t1 - t0
            p["put_wait_s"] += time.perf_counter() - t1
            p["steps"] += 1
            p["sequences"] += len(batch["keys"])
        ray.get(self.channel.end.remote({"epoch": 0, "rank": self.rank, "steps": last_step - first_step}))
        return {**p, "rank": self.rank}

    def store_stats(self) -> dict:
        """What this actor's process did with the object store (shard downloads, cache hits, retries;
        a restarted producer counts from its restart)."""
        from mixflow.data.object_store import process_stats  # the module's, not a copy pickled with the class

        return process_stats()

    def pid(self) -> int:
        return os.getpid()

"""Token producer actor: one per trainer rank, builds mixed-domain batches into the rank's channel.

For every global step it asks the controller which mixture the step uses
(``mixture_for_step``: the same answer for every rank), draws the step's domain
sequence from its exact schedule, packs sequences from its per-domain token sources
(its own disjoint shards), tags the batch with the version and realised counts, and
puts it into its credit-based channel (which blocks when the rank is behind).
"""

from __future__ import annotations

import time

import ray

from mixflow.data.bad_samples import BadSamplePolicy
from mixflow.data.mixed_token_batches import MixedTokenBatcher
from mixflow.data.token_source import TokenSource
from mixflow.mixture.schedule import ExactSchedule
from mixflow.runtime.mix_stage import batch_nbytes
from mixflow.seeding import numpy_rng


@ray.remote(num_cpus=0)
class TokenProducer:
    def __init__(self, rank: int, world_size: int, domain_dirs: list[str], seq_len: int, batch_size: int,
                 seed: int, on_error: str, controller, channel, state: dict | None = None):
        self.rank = rank
        self.policy = BadSamplePolicy(on_error)
        sources = [TokenSource(d, seq_len, seed=seed, reader=rank, num_readers=world_size, policy=self.policy)
                   for d in domain_dirs]
        self.batcher = MixedTokenBatcher(sources, ExactSchedule(len(sources), numpy_rng(seed, 0, "schedule", rank), rule="tijdeman"), batch_size)
        if state is not None:
            self.batcher.load_state_dict(state)
        self.controller = controller
        self.channel = channel
        self.progress = {"steps": 0, "sequences": 0, "put_wait_s": 0.0, "mixture_wait_s": 0.0}

    def run(self, first_step: int, last_step: int) -> dict:
        """Produce global steps ``first_step .. last_step - 1``, then an end marker."""
        p = self.progress
        for step in range(first_step, last_step):
            t0 = time.perf_counter()
            mixture = ray.get(self.controller.mixture_for_step.remote(step))
            t1 = time.perf_counter()
            batch = self.batcher.build(step, mixture)
            ray.get(self.channel.put.remote([ray.put(batch)], batch_nbytes(batch)))
            p["mixture_wait_s"] += t1 - t0
            p["put_wait_s"] += time.perf_counter() - t1
            p["steps"] += 1
            p["sequences"] += len(batch["keys"])
        ray.get(self.channel.end.remote({"rank": self.rank, "steps": last_step - first_step}))
        return {**p, "rank": self.rank, "skipped": self.policy.drain()}

    def state_dict(self) -> dict:
        return self.batcher.state_dict()

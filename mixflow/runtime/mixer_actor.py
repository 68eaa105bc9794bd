"""Mixer actor: pulls decoded batches from its rank's readers, mixes, pushes into the rank's channel.

Readers are visited round-robin in a fixed order with ``prefetch`` requests in
flight; Ray runs one caller's requests to an actor in order, so the batch sequence
is a pure function of the seed whatever the timing.
"""

from __future__ import annotations

import time
from collections import deque

import ray

from mixflow.config import PipelineSpec
from mixflow.runtime.mix_stage import MixStage, batch_nbytes


@ray.remote(num_cpus=0, max_concurrency=2)
class MixerActor:
    def __init__(self, spec_json: str, rank: int, decoders: list, channel, device: str = "cpu"):
        import torch

        torch.set_num_threads(1)
        spec = PipelineSpec.model_validate_json(spec_json)
        params = spec.mix.model_dump(exclude={"method"})
        self.stage = MixStage(spec.mix.method, params, spec.data.num_classes, spec.seed, rank, device)
        self.rank = rank
        self.decoders = decoders
        self.channel = channel
        self.prefetch = spec.runtime.prefetch
        self.progress = {"batches": 0, "samples": 0, "mix_s": 0.0, "put_wait_s": 0.0}

    def run_epoch(self, epoch: int) -> dict:
        """Produce the rank's whole epoch into its channel; returns counts and timings."""
        active = list(range(len(self.decoders)))
        pending: deque = deque()
        turn = 0

        def request() -> None:
            nonlocal turn
            if active:
                reader = active[turn % len(active)]
                turn += 1
                pending.append((reader, self.decoders[reader].next_batch.remote()))

        for _ in range(self.prefetch * max(1, len(active))):
            request()
        step = 0
        while pending:
            reader, ref = pending.popleft()
            decoded = ray.get(ref)
            if decoded is None:
                if reader in active:
                    active.remove(reader)
                continue
            request()
            start = time.perf_counter()
            mixed = self.stage(decoded, epoch, step)
            mid = time.perf_counter()
            nbytes = batch_nbytes(mixed)
            ray.get(self.channel.put.remote([ray.put(mixed)], nbytes))
            self.progress["mix_s"] += mid - start
            self.progress["put_wait_s"] += time.perf_counter() - mid
            self.progress["batches"] += 1
            self.progress["samples"] += len(mixed["keys"])
            step += 1
        ray.get(self.channel.end.remote({"epoch": epoch, "rank": self.rank, "batches": step}))
        return {"rank": self.rank, "epoch": epoch, "batches": step, **self.progress}

    def stats(self) -> dict:
        return dict(self.progress)

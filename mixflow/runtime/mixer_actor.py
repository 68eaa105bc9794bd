"""Mixer actor: pulls decoded batches from its rank's readers, mixes, pushes into the rank's channel.

Readers are visited round-robin in a fixed order with ``prefetch`` requests in
flight; Ray runs one caller's requests to an actor in order, so the batch sequence
is a pure function of the seed whatever the timing. Production runs straight across
epoch boundaries: a reader is moved to the next epoch as soon as it reports the end
of the current one, and an end marker per epoch goes into the channel, so no rank
waits for a pipeline to refill between epochs (memory stays bounded by the channel).
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
        self.progress = {"epoch": None, "batches": 0, "samples": 0, "mix_s": 0.0, "put_wait_s": 0.0}

    def run(self, first_epoch: int, num_epochs: int) -> list[dict]:
        """Produce epochs ``first_epoch .. first_epoch + num_epochs - 1`` into the channel."""
        last = first_epoch + num_epochs - 1
        epoch_of = {r: first_epoch for r in range(len(self.decoders))}
        ray.get([d.start_epoch.remote(first_epoch) for d in self.decoders])
        active = {first_epoch: list(range(len(self.decoders)))}
        pending: deque = deque()
        turns = {first_epoch: 0}
        reports = []

        def request(epoch: int) -> None:
            readers = active.get(epoch, [])
            if readers:
                reader = readers[turns[epoch] % len(readers)]
                turns[epoch] += 1
                pending.append((epoch, reader, self.decoders[reader].next_batch.remote()))

        for _ in range(self.prefetch * len(self.decoders)):
            request(first_epoch)
        epoch, step = first_epoch, 0
        while pending:
            req_epoch, reader, ref = pending.popleft()
            decoded = ray.get(ref)
            if decoded is None:
                if reader in active.get(req_epoch, []):
                    active[req_epoch].remove(reader)
                    if req_epoch < last and epoch_of[reader] == req_epoch:
                        # Ordered after this caller's earlier requests: the reader finishes
                        # its epoch, then starts the next while this rank drains the current one.
                        epoch_of[reader] = req_epoch + 1
                        self.decoders[reader].start_epoch.remote(req_epoch + 1)
                        active.setdefault(req_epoch + 1, []).append(reader)
                        turns.setdefault(req_epoch + 1, 0)
                if not active.get(req_epoch) and req_epoch == epoch:
                    self._end_epoch(epoch, step, reports)
                    epoch, step = epoch + 1, 0
                    for _ in range(self.prefetch * len(active.get(epoch, []))):
                        request(epoch)
                continue
            request(req_epoch)
            self._push(decoded, req_epoch, step)
            step += 1
        if epoch <= last:
            self._end_epoch(epoch, step, reports)
        return reports

    def _push(self, decoded: dict, epoch: int, step: int) -> None:
        start = time.perf_counter()
        mixed = self.stage(decoded, epoch, step)
        mid = time.perf_counter()
        ray.get(self.channel.put.remote([ray.put(mixed)], batch_nbytes(mixed)))
        p = self.progress
        p["mix_s"] += mid - start
        p["put_wait_s"] += time.perf_counter() - mid
        p["batches"] += 1
        p["samples"] += len(mixed["keys"])
        p["epoch"] = epoch

    def _end_epoch(self, epoch: int, steps: int, reports: list) -> None:
        ray.get(self.channel.end.remote({"epoch": epoch, "rank": self.rank, "batches": steps}))
        reports.append({"rank": self.rank, "epoch": epoch, "batches": steps, **self.progress})

    def stats(self) -> dict:
        return dict(self.progress)

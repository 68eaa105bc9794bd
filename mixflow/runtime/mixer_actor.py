"""Mixer actor: pulls decoded batches from its rank's readers, mixes, pushes into the rank's channel.

The rank's stream of an epoch is a fixed walk over *entries*: entry ``t`` is batch
``t // k`` of reader slot ``t % k`` (``k`` readers per rank), i.e. round-robin over
the readers, round after round. An entry past a reader's last batch is empty, as is
one whose samples were all bad; every other entry becomes the next mixed batch
(``step``), mixed with the generator of ``(seed, epoch, "mix", rank, step)``. The
stream is therefore a pure function of the seed, the shards, ``batch_size`` and
``k``: not of timing, prefetch depth, restarts or where a run was resumed.

``prefetch`` requests per reader are kept in flight. Each mixed batch carries its
*position*, the state after it: ``epoch``, ``step`` (batches so far), ``cursor``
(next entry) and ``starts`` (where each slot's next batch starts in its reader's
sequence). A trainer that saves the position of the last batch it consumed can
resume exactly there; batches in flight are simply produced again.

Restarts: the actor is restartable and its ``run`` is retried; a restarted mixer
asks the channel where the stream stands (``Channel.open``) and goes on from the
batch after the last one the channel accepted, so nothing is lost or repeated.
Batches go to the channel by value, so the ones queued there survive the mixer.
A reader that dies mid-request is restarted by Ray and the request retried; a
request whose result is lost with its node is sent again (requests name the batch).
"""

from __future__ import annotations

import os
import time
from collections import deque

import ray

from mixflow.config import PipelineSpec
from mixflow.errors import PipelineError
from mixflow.runtime.mix_stage import MixStage, batch_nbytes

RESTARTS = {"max_restarts": -1, "max_task_retries": -1}
RETRY_S = 120.0  # how long a reader request is re-sent before the pipeline gives up on that reader
RETRY_PAUSE_S = 0.5


def start_position(epoch: int, slots: int, step: int = 0, cursor: int = 0, starts: list[int] | None = None) -> dict:
    """A rank's stream position: ``step`` batches of ``epoch`` delivered, next entry ``cursor``."""
    return {"epoch": epoch, "step": step, "cursor": cursor, "starts": list(starts or [0] * slots)}


@ray.remote(num_cpus=0, max_concurrency=2, **RESTARTS)
class MixerActor:
    def __init__(self, spec_json: str, rank: int, decoders: list, channel, start: dict, device: str = "cpu"):
        import torch

        torch.set_num_threads(1)
        spec = PipelineSpec.model_validate_json(spec_json)
        params = spec.mix.model_dump(exclude={"method"})
        self.stage = MixStage(spec.mix.method, params, spec.data.num_classes, spec.seed, rank, device)
        self.rank = rank
        self.decoders = decoders
        self.channel = channel
        self.start = start
        self.prefetch = spec.runtime.prefetch
        self.progress = {"epoch": None, "batches": 0, "samples": 0, "mix_s": 0.0, "put_wait_s": 0.0, "retries": 0}

    def run(self, last_epoch: int) -> int:
        """Produce from where the channel's stream stands through the end of ``last_epoch``;
        returns the number of batches this call put."""
        position = ray.get(self.channel.open.remote(self.start))
        put_before = self.progress["batches"]
        for epoch in range(position["epoch"], last_epoch + 1):
            if epoch != position["epoch"]:
                position = start_position(epoch, len(self.decoders))
            self._produce_epoch(position)
        return self.progress["batches"] - put_before

    def _produce_epoch(self, position: dict) -> None:
        k = len(self.decoders)
        if position.get("done"):  # resumed after this rank had finished the epoch: only its end marker
            ray.get(self.channel.end.remote({"epoch": position["epoch"], "rank": self.rank,
                                             "batches": position["step"], "skipped": []}))
            return
        epoch, step, cursor = position["epoch"], position["step"], position["cursor"]
        starts = list(position["starts"] or [0] * k)
        next_index = [cursor // k + (1 if slot < cursor % k else 0) for slot in range(k)]
        ends = [None] * k  # first index past each slot's last batch, once seen
        pending: deque = deque()
        issue_at = cursor
        carried: list = []  # quarantine records of empty entries, delivered with the next batch

        def issue() -> None:
            nonlocal issue_at
            while len(pending) < self.prefetch * k and any(e is None for e in ends):
                slot, index = issue_at % k, issue_at // k
                issue_at += 1
                if ends[slot] is not None and index >= ends[slot]:
                    continue
                hint = starts[slot] if index == next_index[slot] else None
                request = (epoch, index, hint)
                pending.append((issue_at, slot, request, self.decoders[slot].batch.remote(*request)))

        issue()
        while pending:
            after, slot, request, ref = pending.popleft()
            decoded = self._fetch(slot, request, ref)
            index = request[1]
            if decoded is None:
                ends[slot] = index if ends[slot] is None else min(ends[slot], index)
            else:
                starts[slot] = decoded["end"]
                next_index[slot] = index + 1
                carried += decoded["skipped"]
                if decoded["keys"]:
                    step += 1
                    self._push(decoded, start_position(epoch, k, step, after, starts), carried)
                    carried = []
            issue()
        info = {"epoch": epoch, "rank": self.rank, "batches": step, "skipped": carried}
        ray.get(self.channel.end.remote(info))

    def _fetch(self, slot: int, request: tuple, ref):
        """The reader's answer to ``request``; sent again if the reader or its node was lost."""
        deadline = time.monotonic() + RETRY_S
        while True:
            try:
                return ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as exc:
                if time.monotonic() > deadline:
                    raise PipelineError(f"reader slot {slot} of rank {self.rank} did not answer batch "
                                        f"{request[1]} of epoch {request[0]} for {RETRY_S:.0f} s: {exc}") from exc
                self.progress["retries"] += 1
                time.sleep(RETRY_PAUSE_S)
                ref = self.decoders[slot].batch.remote(*request)

    def _push(self, decoded: dict, position: dict, skipped: list) -> None:
        start = time.perf_counter()
        mixed = self.stage(decoded, position["epoch"], position["step"] - 1)
        mixed["position"] = position
        mixed["skipped"] = skipped
        mid = time.perf_counter()
        ray.get(self.channel.put.remote(mixed, batch_nbytes(mixed), position))
        p = self.progress
        p["mix_s"] += mid - start
        p["put_wait_s"] += time.perf_counter() - mid
        p["batches"] += 1
        p["samples"] += len(mixed["keys"])
        p["epoch"] = position["epoch"]

    def stats(self) -> dict:
        return dict(self.progress)
    def placement(self) -> dict:
        """Where this actor runs now (node id and process id): a restart changes the pid."""
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

"""Mixer actor: pulls decoded batches from its rank's readers, mixes, pushes into the rank's channel.

The rank's stream of an epoch is a fixed walk over *entries*: entry ``t`` is batch
``t // k`` of reader slot ``t % k`` (``k`` readers per rank), i.e. round-robin over
the readers, round after round. An entry past a reader's last batch is empty, as is
one whose samples were all bad; every other entry becomes the next mixed batch
(``step``), mixed with the generator of ``(seed, epoch, "mix", rank, step)``. The
stream is therefore a pure function of the seed, the shards, ``batch_size`` and
``k``: not of timing, prefetch depth, restarts or where a run was resumed.

``prefetch`` requests per reader are kept in flight. A *fused* mixer (``reader=`` given:
one reader per rank) runs that reader's :class:`DecodeStage` itself and decodes each
batch when it is due, which saves a process and one object-store copy per batch. Each mixed batch carries its
*position*, the state after it: ``epoch``, ``step`` (batches so far), ``cursor``
(next entry) and ``starts`` (where each slot's next batch starts in its reader's
sequence). A trainer that saves the position of the last batch it consumed can
resume exactly there; batches in flight are simply produced again.

Delivery: the channel gets a *ticket* (position, quarantine records, size, source
request). Its pixels go into a slot of the mixer's shared-memory ring
(:mod:`mixflow.runtime.batch_ring`) and the ticket carries the rest of the batch (keys,
labels, plan), pickled (:func:`~mixflow.runtime.batch_ring.carry`, so the channel never unpacks torch objects), with
the slot's descriptor: a trainer on the mixer's node reads the whole batch without
calling the mixer or copying the pixels. A batch with no ring slot stays in the mixer's
outbox, and the trainer takes it with the ticket (:meth:`MixerActor.take`), so it is
serialised once, into an object the trainer owns; a trainer that cannot map the ring
takes a copy of the slot the same way.

Restarts: the actor is restartable and its ``run`` is retried; a restarted mixer
asks the channel where the stream stands (``Channel.open``) and goes on from the
batch after the last one the channel accepted, so nothing is lost or repeated.
Tickets queued in the channel outlive the mixer. Those of its ring are read from the ring
by a trainer that still maps it (or can map it: its file is removed when the trainer maps
it or the restarted mixer makes its own); for the others the restarted mixer rebuilds the
batch from the source request on ``take`` (the same batch: reads and mixes are pure).
A reader that dies mid-request is restarted by Ray and the request retried; a
request whose result is lost with its node is sent again (requests name the batch).
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import deque

import ray

from mixflow.config import PipelineSpec
from mixflow.errors import PipelineError
from mixflow.runtime.actor_names import resolve
from mixflow.runtime.batch_ring import BatchRing, carry, uncarry
from mixflow.runtime.channel import TICKET
from mixflow.runtime.decoder_actor import reader_stage
from mixflow.runtime.mix_stage import MixStage, batch_nbytes
from mixflow.runtime.placement import Placed

RESTARTS = {"max_restarts": -1, "max_task_retries": -1}
RETRY_S = 120.0  # how long a reader request is re-sent before the pipeline gives up on that reader
RETRY_PAUSE_S = 0.5


def start_position(epoch: int, slots: int, step: int = 0, cursor: int = 0, starts: list[int] | None = None) -> dict:
    """A rank's stream position: ``step`` batches of ``epoch`` delivered, next entry ``cursor``."""
    return {"epoch": epoch, "step": step, "cursor": cursor, "starts": list(starts or [0] * slots)}


@ray.remote(num_cpus=0, max_concurrency=4, **RESTARTS)
class MixerActor(Placed):
    def __init__(self, spec_json: str, rank: int, decoders: list, channel, start: dict, device: str = "cpu",
                 reader: dict | None = None, ring_tag: str | None = None):
        """``decoders``: the rank's decoder actors (their :class:`~mixflow.runtime.actor_names.ActorName`,
        or handles); or none, with ``reader`` the arguments of
        :func:`reader_stage` (after the spec) for the one reader this mixer runs itself.
        ``ring_tag``: name mixed batches' shared-memory ring with it (:mod:`batch_ring`); ``None``:
        no ring, every batch goes through the object store."""
        import torch

        torch.set_num_threads(1)
        spec = PipelineSpec.model_validate_json(spec_json)
        params = spec.mix.model_dump(exclude={"method"})
        self.stage = MixStage(spec.mix.method, params, spec.data.num_classes, spec.seed, rank, device)
        self.rank = rank
        if (reader is None) == (not decoders):
            raise ValueError("MixerActor needs decoder actors or a fused reader, not both or neither")
        self.local = reader_stage(spec, **reader) if reader is not None else None
        self.decoders = [resolve(d) for d in decoders]  # by name: a restart must not need handles
        self.slots = len(decoders) or 1
        self.channel = resolve(channel)
        self.start = start
        self.prefetch = spec.runtime.prefetch
        self._put = None  # (outbox key, ring slot or None, ref) of the channel put in flight
        self.outbox: dict[tuple[int, int], dict] = {}  # (epoch, step) -> mixed batch, until taken
        self.ring_tag = ring_tag
        self.ring: BatchRing | None = None  # created with the first batch
        height, width = spec.decode.size
        self.ring_slot_bytes = spec.trainer.batch_size * height * width * 3 * (4 if spec.decode.normalize else 1)
        # held by the trainer + fetched ahead by it + queued + put in flight + the new one
        queued = min(spec.channel.max_items, max(1, spec.channel.max_bytes // self.ring_slot_bytes))
        self.ring_slots = queued + 4
        self._reader_lock = threading.Lock()
        self.progress = {"epoch": None, "batches": 0, "samples": 0, "mix_s": 0.0, "put_wait_s": 0.0, "retries": 0,
                         "rebuilt": 0, "ring_batches": 0, "ring_misses": 0}

    def run(self, last_epoch: int, start: dict | None = None) -> int:
        """Produce from where the channel's stream stands (on a new channel: ``start``, else the
        position given at construction) through the end of ``last_epoch``; returns the number of
        batches this call put."""
        position = ray.get(self.channel.open.remote(start or self.start))
        put_before = self.progress["batches"]
        for epoch in range(position["epoch"], last_epoch + 1):
            if epoch != position["epoch"]:
                position = start_position(epoch, self.slots)
            self._produce_epoch(position)
        return self.progress["batches"] - put_before

    def _produce_epoch(self, position: dict) -> None:
        k = self.slots
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
                pending.append((issue_at, slot, request, self._request(slot, request)))

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
                    source = (slot, (epoch, index, decoded["start"]))
                    self._push(decoded, start_position(epoch, k, step, after, starts), carried, source)
                    carried = []
            issue()
        info = {"epoch": epoch, "rank": self.rank, "batches": step, "skipped": carried}
        self._flush()
        ray.get(self.channel.end.remote(info))

    def _request(self, slot: int, request: tuple):
        """Send ``request`` to the reader of ``slot``: its ref, or None for the fused reader
        (decoded when fetched)."""
        return None if self.local is not None else self.decoders[slot].batch.remote(*request)

    def _fetch(self, slot: int, request: tuple, ref):
        """The reader's answer to ``request``; sent again if the reader or its node was lost."""
        if self.local is not None:
            with self._reader_lock:  # take() may rebuild a batch beside run()
                return self.local.batch(*request)
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
                ref = self._request(slot, request)

    def _mix(self, decoded: dict, position: dict, skipped: list) -> dict:
        start = time.perf_counter()
        mixed = self.stage(decoded, position["epoch"], position["step"] - 1)
        mixed["position"] = position
        mixed["skipped"] = skipped
        mixed["suspect"] = decoded.get("suspect", [])  # delivered samples libjpeg warns about
        self.progress["mix_s"] += time.perf_counter() - start
        return mixed

    def _push(self, decoded: dict, position: dict, skipped: list, source: tuple) -> None:
        """Mix the batch and send the channel its *ticket*: position, quarantine records, size
        and where it came from (``source``: reader slot and request), plus the batch itself
        when its pixels went into a ring slot; else the batch waits in the outbox for the
        trainer to take it with the ticket (:meth:`take`). The put stays in flight while the
        next batch is decoded and mixed; it is waited for before the next put, so the channel
        sees one put at a time, in order."""
        mixed = self._mix(decoded, position, skipped)
        nbytes = batch_nbytes(mixed)
        key = (position["epoch"], position["step"])
        ticket = {TICKET: True, "source": source, "position": position, "skipped": skipped}
        carried = self._into_ring(mixed)
        if carried is None:
            self.outbox[key] = mixed
        else:
            ticket["batch"] = carry(carried)
        self._flush()
        slot = carried["ring"]["slot"] if carried is not None else None
        self._put = (key, slot, self.channel.put.remote(ticket, nbytes, position))
        p = self.progress
        p["batches"] += 1
        p["samples"] += len(mixed["keys"])
        p["epoch"] = position["epoch"]

    def _flush(self) -> None:
        """Wait for the put in flight, if any."""
        if self._put is not None:
            start = time.perf_counter()
            key, slot, ref = self._put
            if not ray.get(ref):  # a repeat the channel dropped: nobody will take it
                self.outbox.pop(key, None)
                if slot is not None:
                    self.ring.release(slot)
            self._put = None
            self.progress["put_wait_s"] += time.perf_counter() - start

    def _into_ring(self, mixed: dict) -> dict | None:
        """``mixed`` with its pixels moved into a free slot of this mixer's ring (``x`` None,
        ``ring`` the slot's descriptor); None when the ring has no slot for it."""
        if self.ring_tag is None:
            return None
        if self.ring is None:
            try:
                self.ring = BatchRing(f"{self.ring_tag}-r{self.rank}", self.ring_slots, self.ring_slot_bytes,
                                      ray.get_runtime_context().get_node_id())
            except OSError as exc:  # no (or too little) shared memory: the object store it is
                warnings.warn(f"mixer r{self.rank}: no shared-memory ring ({exc}); batches go through "
                              "Ray's object store", RuntimeWarning)
                self.ring_tag = None
                return None
        descriptor = self.ring.put(mixed["x"])
        if descriptor is None:
            self.progress["ring_misses"] += 1
            return None
        self.progress["ring_batches"] += 1
        return {**mixed, "x": None, "ring": descriptor}

    def close_ring(self) -> None:
        """No more ring batches; the ring's file goes (memory mapped by a trainer stays valid)."""
        self.ring_tag = None
        if self.ring is not None:
            self.ring.close()

    def take(self, ticket: dict, node_id: str | None = None) -> dict:
        """The batch of ``ticket``, pixels included (the return value is owned by the caller, so it
        outlives this actor). A ticket whose pixels are in this mixer's ring comes from a caller
        that cannot map it: it gets a copy of the slot, the slot is freed, and the ring is turned
        off when the caller is on another node (``node_id``), where the ring only adds copies.
        A restarted mixer has lost its outbox and its ring: it rebuilds the batch from its source,
        which gives the same batch (reader requests and mixes are pure functions of the seed)."""
        position = ticket["position"]
        carried = uncarry(ticket)
        if carried is not None and self.ring is not None and carried["ring"]["path"] == str(self.ring.path):
            x = self.ring.read(carried["ring"])  # before the slot is free for run() to refill
            self.ring.release(carried["ring"]["slot"])
            if node_id != self.ring.node_id:
                self.close_ring()
            return {**carried, "x": x, "ring": None}
        batch = self.outbox.pop((position["epoch"], position["step"]), None)
        if batch is not None:
            return batch
        self.progress["rebuilt"] += 1
        slot, request = ticket["source"]
        request = tuple(request)
        return self._mix(self._fetch(slot, request, self._request(slot, request)), position, ticket["skipped"])

    def stats(self) -> dict:
        return dict(self.progress)

    def store_stats(self) -> dict:
        """What this actor's process did with the object store (its fused reader's downloads, retries)."""
        from mixflow.data.object_store import process_stats  # the module's, not a copy pickled with the class

        return process_stats()

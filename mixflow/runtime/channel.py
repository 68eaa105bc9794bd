"""Credit-based channels: one per trainer rank, bounded by item count AND bytes.

Producers ``put`` a batch (or its ObjectRef wrapped in a list, so Ray does not resolve
it, or a ticket: see below) and wait until the channel has credit: fewer than ``max_items`` queued and the bytes
queued plus this batch within ``max_bytes`` (a single batch larger than the bound
is let through an empty channel so nothing can deadlock). A slow rank therefore
slows exactly its own producers while every other rank's channel keeps flowing.

A producer that may be restarted (the image mixer) ``open``s the channel with its
start position and tags every ``put`` with the stream position after that batch
(``epoch``, ``step``, ...). The channel keeps only the batch that comes next in the
stream and drops a repeat, so a put sent by a producer that then died, and the same
batch sent again by its restarted self, land once; ``open`` tells the restarted
producer where the stream stands.

What the channel queues: a batch by value (token producers), its ObjectRef in a list, or
a *ticket* (the image mixer): a small dict marked ``TICKET`` with the batch's position,
size and source. Either the ticket carries the batch's small arrays and its pixels stay
in a slot of the producer's shared-memory ring (:mod:`mixflow.runtime.batch_ring`),
which a reader on the producer's node reads in place; or the batch stays with its
producer and the reader takes it (``holder.take(ticket)``): the return value is owned by
the reader, so the batch is copied into Ray's object store once, not once per hop, and
survives its producer. A restarted producer has lost the batches its dead self held in
its outbox; it rebuilds them from their source on ``take``. Credit counts the ticketed batch's bytes.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import ray

from mixflow.errors import PipelineError
from mixflow.runtime.batch_ring import RingReader, uncarry
from mixflow.runtime.placement import Placed

END = "end"
BATCH = "batch"
TICKET = "ticket"  # marks a ticket: the batch rides with it (pixels in a ring slot) or stays with its producer


# A threaded actor (an asyncio one cost ~70% more CPU per call on the 2-core machine). Waiting
# puts and gets hold a thread each, in groups of their own so that neither can starve the other
# or the control calls (end, open, fail, stats). Every producer and consumer has one call in flight.
# The per-batch calls record no Ray task events (dashboard task list, timeline): ~10% less CPU
# per call on both sides, and no flood of per-batch tasks in the dashboard.
@ray.remote(num_cpus=0, max_concurrency=4, concurrency_groups={"put": 16, "get": 4})
class Channel(Placed):
    def __init__(self, name: str, max_items: int, max_bytes: int):
        self.name = name
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._queue: deque[tuple[str, Any, int]] = deque()
        self._bytes = 0
        self._items = 0  # batches queued (end markers excluded)
        self._pending = 0  # bytes of batches whose producer is waiting for credit
        self._cond = threading.Condition()
        self._error: str | None = None
        self._produced: dict | None = None  # stream position after the last batch accepted (opened channels)
        self._stats = {"puts": 0, "gets": 0, "peak_items": 0, "peak_bytes": 0, "peak_in_flight": 0,
                       "max_batch_bytes": 0, "put_wait_s": 0.0, "get_wait_s": 0.0}

    def _has_credit(self, nbytes: int) -> bool:
        if self._items == 0:
            return True
        return self._items < self.max_items and self._bytes + nbytes <= self.max_bytes

    def _check(self) -> None:
        if self._error is not None:
            raise PipelineError(f"channel {self.name} closed: {self._error}")

    def open(self, start: dict) -> dict:
        """Track the stream position, starting at ``start`` unless already tracked; returns the
        position after the last batch accepted (where a restarted producer goes on)."""
        with self._cond:
            if self._produced is None:
                self._produced = dict(start)
            return dict(self._produced)

    def _follows(self, position: dict | None) -> bool:
        """Whether the batch ending at ``position`` is the next one of the stream (always, untracked)."""
        if self._produced is None or position is None:
            return True
        p = self._produced
        return position["epoch"] == p["epoch"] and position["step"] == p["step"] + 1

    @ray.method(concurrency_group="put", enable_task_events=False)
    def put(self, item: Any, nbytes: int, position: dict | None = None) -> bool:
        """Enqueue ``item`` (a batch, or ``[ObjectRef]`` of one) once credit allows.

        ``position`` is the stream position after this batch; on an opened channel a batch
        that is not the next one (a repeat from a restarted producer) is dropped. Returns
        whether the batch was enqueued.
        """
        start = time.perf_counter()
        with self._cond:
            self._pending += nbytes
            self._stats["peak_in_flight"] = max(self._stats["peak_in_flight"], self._bytes + self._pending)
            self._cond.wait_for(lambda: self._error is not None or self._has_credit(nbytes))
            self._pending -= nbytes
            self._check()
            if not self._follows(position):
                return False
            if position is not None and self._produced is not None:
                self._produced = dict(position)
            self._queue.append((BATCH, item, nbytes))
            self._bytes += nbytes
            self._items += 1
            s = self._stats
            s["puts"] += 1
            s["peak_items"] = max(s["peak_items"], self._items)
            s["peak_bytes"] = max(s["peak_bytes"], self._bytes)
            s["max_batch_bytes"] = max(s["max_batch_bytes"], nbytes)
            s["put_wait_s"] += time.perf_counter() - start
            self._cond.notify_all()
            return True

    def end(self, info: dict | None = None) -> None:
        """Mark the end of the producer's epoch (not counted against credit).

        On an opened channel ``info["epoch"]`` must be the epoch being produced (else the
        marker is a repeat and is dropped); the position moves to the next epoch's start.
        """
        with self._cond:
            if self._produced is not None:
                if info is None or info.get("epoch") != self._produced["epoch"]:
                    return
                self._produced = {"epoch": info["epoch"] + 1, "step": 0, "cursor": 0, "starts": None}
            self._queue.append((END, info or {}, 0))
            self._cond.notify_all()

    @ray.method(concurrency_group="get", enable_task_events=False)
    def get(self) -> tuple[str, Any, int]:
        """Next ``("batch", item, nbytes)`` or ``("end", info, 0)``; raises if the channel failed."""
        start = time.perf_counter()
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None or bool(self._queue))
            self._check()
            kind, payload, nbytes = self._queue.popleft()
            self._bytes -= nbytes
            if kind == BATCH:
                self._items -= 1
                self._stats["gets"] += 1
            self._stats["get_wait_s"] += time.perf_counter() - start
            self._cond.notify_all()
            return kind, payload, nbytes

    def fail(self, reason: str) -> None:
        """Wake every waiter with an error: the pipeline is stopping."""
        with self._cond:
            self._error = reason
            self._cond.notify_all()

    def stats(self) -> dict:
        with self._cond:
            return {**self._stats, "items": self._items, "bytes": self._bytes, "max_items": self.max_items,
                    "max_bytes": self.max_bytes}


class ChannelReader:
    """Trainer-side end of a channel: yields batch dicts, one ``get`` kept in flight ahead.
    A ticket whose pixels are in the holder's shared-memory ring (:mod:`mixflow.runtime.batch_ring`)
    is read in place, so its ``x`` is valid until the next :meth:`get` (which frees the slot);
    any other ticket is exchanged for its batch with ``holder.take(ticket)``.

    ``last`` is the batch most recently returned and ``end_info`` the payload of the
    last end marker: what the trainer has consumed, for its position in the stream.
    """

    def __init__(self, channel, holder=None):
        self.channel = channel
        self.holder = holder  # the producer that hands out ticketed batches (take(ticket)), if any
        self.ring = RingReader(ray.get_runtime_context().get_node_id()) if holder is not None else None
        self.ring_batches = 0  # batches read from the holder's shared-memory ring
        self._next = None
        self.wait_s = 0.0
        self.last: dict | None = None
        self.end_info: dict | None = None

    def get(self) -> dict | None:
        """The next batch of the epoch, or ``None`` at its end."""
        start = time.perf_counter()
        if self.ring is not None:
            self.ring.release()  # the previous batch's slot: its pixels are no longer used
        request = self._next if self._next is not None else self.channel.get.remote()
        kind, payload, _ = ray.get(request)
        if kind == END:
            self._next = None
            self.end_info = payload
            self.wait_s += time.perf_counter() - start
            return None
        self._next = self.channel.get.remote()
        batch = ray.get(payload[0]) if isinstance(payload, list) else payload
        if TICKET in batch:
            batch = self._redeem(batch)
        self.last = batch
        self.wait_s += time.perf_counter() - start
        return batch

    def _redeem(self, ticket: dict) -> dict:
        """The batch of ``ticket``: read from the holder's ring in place when it is there and
        mappable from here, else taken from the holder (a copy owned by this reader)."""
        if self.holder is None:
            raise PipelineError(f"channel {self.channel} sent a ticket (position {ticket.get('position')}), "
                                "but this reader has no producer to take it from")
        carried = uncarry(ticket)
        if carried is not None:
            try:
                x = self.ring.view(carried["ring"])
            except OSError:  # another node, or the ring is gone (its producer restarted)
                pass
            else:
                self.ring_batches += 1
                return {**carried, "x": x}
        return ray.get(self.holder.take.remote(ticket, self.ring.node_id))

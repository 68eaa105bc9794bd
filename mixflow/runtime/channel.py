"""Credit-based channels: one per trainer rank, bounded by item count AND bytes.

Producers ``put`` a batch's ObjectRef (the data stays in Ray's object store) and
wait until the channel has credit: fewer than ``max_items`` queued and the bytes
queued plus this batch within ``max_bytes`` (a single batch larger than the bound
is let through an empty channel so nothing can deadlock). A slow rank therefore
slows exactly its own producers while every other rank's channel keeps flowing.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import ray

from mixflow.errors import PipelineError

END = "end"
BATCH = "batch"


@ray.remote(num_cpus=0)
class Channel:
    def __init__(self, name: str, max_items: int, max_bytes: int):
        self.name = name
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._queue: deque[tuple[str, Any, int]] = deque()
        self._bytes = 0
        self._items = 0  # batches queued (end markers excluded)
        self._pending = 0  # bytes of batches whose producer is waiting for credit
        self._cond = asyncio.Condition()
        self._error: str | None = None
        self._stats = {"puts": 0, "gets": 0, "peak_items": 0, "peak_bytes": 0, "peak_in_flight": 0,
                       "max_batch_bytes": 0, "put_wait_s": 0.0, "get_wait_s": 0.0}

    def _has_credit(self, nbytes: int) -> bool:
        if self._items == 0:
            return True
        return self._items < self.max_items and self._bytes + nbytes <= self.max_bytes

    def _check(self) -> None:
        if self._error is not None:
            raise PipelineError(f"channel {self.name} closed: {self._error}")

    async def put(self, refs: list, nbytes: int) -> None:
        """Enqueue ``refs[0]`` (an ObjectRef, wrapped so Ray does not resolve it) once credit allows."""
        start = time.perf_counter()
        async with self._cond:
            self._pending += nbytes
            self._stats["peak_in_flight"] = max(self._stats["peak_in_flight"], self._bytes + self._pending)
            await self._cond.wait_for(lambda: self._error is not None or self._has_credit(nbytes))
            self._pending -= nbytes
            self._check()
            self._queue.append((BATCH, refs, nbytes))
            self._bytes += nbytes
            self._items += 1
            s = self._stats
            s["puts"] += 1
            s["peak_items"] = max(s["peak_items"], self._items)
            s["peak_bytes"] = max(s["peak_bytes"], self._bytes)
            s["max_batch_bytes"] = max(s["max_batch_bytes"], nbytes)
            s["put_wait_s"] += time.perf_counter() - start
            self._cond.notify_all()

    async def end(self, info: dict | None = None) -> None:
        """Mark the end of the producer's epoch (not counted against credit)."""
        async with self._cond:
            self._queue.append((END, info or {}, 0))
            self._cond.notify_all()

    async def get(self) -> tuple[str, Any, int]:
        """Next ``("batch", [ref], nbytes)`` or ``("end", info, 0)``; raises if the channel failed."""
        start = time.perf_counter()
        async with self._cond:
            await self._cond.wait_for(lambda: self._error is not None or bool(self._queue))
            self._check()
            kind, payload, nbytes = self._queue.popleft()
            self._bytes -= nbytes
            if kind == BATCH:
                self._items -= 1
                self._stats["gets"] += 1
            self._stats["get_wait_s"] += time.perf_counter() - start
            self._cond.notify_all()
            return kind, payload, nbytes

    async def fail(self, reason: str) -> None:
        """Wake every waiter with an error: the pipeline is stopping."""
        async with self._cond:
            self._error = reason
            self._cond.notify_all()

    def stats(self) -> dict:
        return {**self._stats, "items": self._items, "bytes": self._bytes, "max_items": self.max_items,
                "max_bytes": self.max_bytes}


class ChannelReader:
    """Trainer-side end of a channel: yields batch dicts, one ``get`` kept in flight ahead."""

    def __init__(self, channel):
        self.channel = channel
        self._next = None
        self.wait_s = 0.0

    def get(self) -> dict | None:
        """The next batch of the epoch, or ``None`` at its end."""
        start = time.perf_counter()
        request = self._next if self._next is not None else self.channel.get.remote()
        kind, payload, _ = ray.get(request)
        if kind == END:
            self._next = None
            self.wait_s += time.perf_counter() - start
            return None
        self._next = self.channel.get.remote()
        batch = ray.get(payload[0])
        self.wait_s += time.perf_counter() - start
        return batch

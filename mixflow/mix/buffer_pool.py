"""Recycled output buffers for the CPU mixing kernels.

Every mixing method writes a fresh batch (inputs are never modified). A fresh
batch-sized buffer costs its page faults: the OS zeroes each page on its first write,
which for a ``128x3x224x224`` float32 batch (77 MB) took about as long as the blend
itself on the development machine, huge pages (:mod:`mixflow.mix.huge_pages`) or not.
Mixing runs batch after batch of one shape, and by the time the next batch is mixed the
previous output is usually gone (serialised into the object store, or dropped by the
trainer), so :func:`output_like` hands that memory out again instead of returning it to
the OS and faulting it back in. PyTorch's CUDA caching allocator does the same for GPU
memory.

A buffer is handed out again only when nothing can see it: the pool keeps a numpy array
per buffer and hands out ``torch.from_numpy`` of it; every tensor, view or numpy view
made from the handed-out tensor keeps that array referenced through the tensor's
storage, so the array's reference count says whether any of them is alive. The check is
calibrated at import; if the interpreter counts references differently, pooling is off.

The pool holds at most :data:`MAX_POOLED_BYTES` (256 MiB by default, the
``MIXFLOW_BUFFER_POOL_MB`` environment variable overrides, 0 turns pooling off) of
CPU buffers of at least :data:`MIN_POOLED_BYTES`; beyond that, outputs are fresh.
"""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import torch

from mixflow.mix.huge_pages import empty_like

MIN_POOLED_BYTES = 4 * 2**20  # smaller buffers come from malloc's own free lists
MAX_POOLED_BYTES = int(float(os.environ.get("MIXFLOW_BUFFER_POOL_MB", "256")) * 2**20)


def _refs(arrays: list[np.ndarray], k: int) -> int:
    return sys.getrefcount(arrays[k])


def _calibrate() -> int | None:
    """References to a pooled array that nothing else holds, as :func:`_refs` counts them;
    ``None`` when a live tensor does not add exactly one (pooling would be unsafe)."""
    arrays = [np.empty(4, np.float32)]
    idle = _refs(arrays, 0)
    held = torch.from_numpy(arrays[0])[1:]
    busy = _refs(arrays, 0)
    del held
    return idle if busy == idle + 1 and _refs(arrays, 0) == idle else None


IDLE_REFS = _calibrate()


class BufferPool:
    """Buffers by ``(shape, dtype)``, handed out again once no tensor refers to them."""

    def __init__(self, max_bytes: int = MAX_POOLED_BYTES):
        self.max_bytes = max_bytes
        self.arrays: dict[tuple, list[np.ndarray]] = {}
        self.nbytes = 0
        self.reused = 0
        self._lock = threading.Lock()

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """An uninitialised contiguous tensor shaped like ``x`` on ``x``'s device."""
        nbytes = x.numel() * x.element_size()
        if IDLE_REFS is None or x.device.type != "cpu" or nbytes < MIN_POOLED_BYTES:
            return empty_like(x)
        key = (tuple(x.shape), x.dtype)
        with self._lock:
            arrays = self.arrays.get(key, [])
            for k in range(len(arrays)):
                if _refs(arrays, k) == IDLE_REFS:
                    self.reused += 1
                    return torch.from_numpy(arrays[k])
            out = empty_like(x)
            if self.nbytes + nbytes > self.max_bytes and not self._evict_idle(nbytes):
                return out
            try:
                array = out.numpy()
            except TypeError:  # a dtype numpy lacks (bfloat16): not pooled
                return out
            self.arrays.setdefault(key, []).append(array)
            self.nbytes += nbytes
            return torch.from_numpy(array)

    def _evict_idle(self, need: int) -> bool:
        """Drop idle buffers (of other shapes: the caller found none idle of its own) until ``need``
        more bytes fit; whether they do."""
        for key in list(self.arrays):
            arrays = self.arrays[key]
            k = 0
            while k < len(arrays) and self.nbytes + need > self.max_bytes:
                if _refs(arrays, k) == IDLE_REFS:
                    self.nbytes -= arrays.pop(k).nbytes
                else:
                    k += 1
            if not arrays:
                del self.arrays[key]
        return self.nbytes + need <= self.max_bytes

    def clear(self) -> None:
        """Forget every buffer; the memory goes back once the tensors still using it are gone."""
        with self._lock:
            self.arrays.clear()
            self.nbytes = 0


POOL = BufferPool()


def output_like(x: torch.Tensor) -> torch.Tensor:
    """An output batch shaped like ``x`` (contiguous, uninitialised), from :data:`POOL`."""
    return POOL.take(x)

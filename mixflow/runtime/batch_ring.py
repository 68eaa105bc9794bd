"""Shared-memory slots for mixed image batches going from a mixer to its trainer on the same node.

Through Ray's object store, each mixed batch is serialised into a fresh object when
the trainer takes it and mapped again on the trainer's side. For a 64x224x224x3 batch
that hop cost about a fifth of the image pipeline's throughput on the 2-core
development machine. A ring is one file of fixed-size slots in ``/dev/shm`` that the
mixer creates: it copies each mixed batch into a free slot, the ticket it sends carries
the slot's descriptor (and the batch's small arrays) instead of the pixels, and the
trainer reads the pixels in place, with no call to the mixer at all.

Who owns a slot is a one-byte flag per slot at the head of the file (0 free, 1 taken):
only the mixer takes a slot, and only a free one; the slot's one holder frees it when
done — the trainer when it fetches its next batch (:meth:`RingReader.release`), so a
slot's pixels are valid until the reader's next ``get`` (the contract DALI's own output
buffers have), or the mixer for a slot no reader holds (copied for a reader that cannot
map the ring, or a repeat the channel dropped). A slot has one holder at a time, so no
lock spans the two processes. One ring has one reader.

A batch goes through the object store instead when the ring cannot serve it: no slot
free, no ``/dev/shm`` or too little room in it (space is reserved up front, so a full
``/dev/shm`` is an error at creation, never a crash when pages are touched), a trainer
on another node (the mixer then turns its ring off), or a batch rebuilt by a restarted
mixer. Files are named ``mixflow-ring-<tag>-r<rank>-<id>``; the trainer unlinks a ring
once it has mapped it, a mixer unlinks its ring when asked to stop and the rings of its
dead predecessors when it makes its own, and the pipeline removes what is left on the
driver's node (:func:`remove_rings`).
"""

from __future__ import annotations

import glob
import os
import pickle
import threading
import uuid
from pathlib import Path

import numpy as np

PREFIX = "mixflow-ring-"


def ring_dir() -> Path:
    """``/dev/shm`` (memory-backed); :class:`BatchRing` refuses to start without it."""
    return Path("/dev/shm")


FREE, TAKEN = 0, 1
PAGE = 4096


def whole_pages(nbytes: int) -> int:
    """``nbytes`` rounded up to whole pages: the flags and every slot start on a page."""
    return -(-nbytes // PAGE) * PAGE


class BatchRing:
    """The producer's side: ``slots`` slots of ``slot_bytes`` each, in one shared file."""

    def __init__(self, tag: str, slots: int, slot_bytes: int, node_id: str):
        folder = ring_dir()
        if not (folder.is_dir() and os.access(folder, os.W_OK)):
            raise OSError(f"{folder} is not a writable directory")
        remove_rings(tag)  # left by this producer's dead predecessors
        self.path = folder / f"{PREFIX}{tag}-{uuid.uuid4().hex[:12]}"
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.node_id = node_id
        self.stride = whole_pages(slot_bytes)
        self.first = whole_pages(slots)  # offset of slot 0, after the flags
        size = self.first + slots * self.stride
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)  # ENOSPC here, not SIGBUS later
        except OSError:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)
        self.memory = np.memmap(self.path, dtype=np.uint8, mode="r+", shape=(size,))
        self.flags = self.memory[:slots]  # FREE or TAKEN per slot, shared with the reader
        self._lock = threading.Lock()  # the producer's thread puts while take() releases

    @property
    def free(self) -> list[int]:
        """The slots free now (the reader frees its slots without telling this process)."""
        return np.flatnonzero(self.flags == FREE).tolist()

    def put(self, array: np.ndarray) -> dict | None:
        """Copy ``array`` into a free slot: its descriptor, or ``None`` (no slot free, or too big)."""
        if array.nbytes > self.slot_bytes:
            return None
        with self._lock:
            free = self.free
            if not free:
                return None
            slot = free[0]
            self.flags[slot] = TAKEN
        start = self.first + slot * self.stride
        np.copyto(self.memory[start:start + array.nbytes].view(array.dtype).reshape(array.shape), array)
        return {"path": str(self.path), "node_id": self.node_id, "slot": slot, "offset": start,
                "shape": list(array.shape), "dtype": array.dtype.str}

    def read(self, descriptor: dict) -> np.ndarray:
        """A copy of a slot's array (for a reader that cannot map the ring)."""
        return np.array(_view(self.memory, descriptor))

    def release(self, slot: int) -> None:
        """Free a slot that no reader holds (copied for it, or never handed out)."""
        with self._lock:
            if 0 <= slot < self.slots:
                self.flags[slot] = FREE

    def close(self) -> None:
        """Remove the file's name (mappings stay valid); its memory is freed once nobody maps it."""
        self.path.unlink(missing_ok=True)


class RingReader:
    """The consumer's side: maps the rings its batches name, and frees the slots it is done with."""

    def __init__(self, node_id: str):
        self.node_id = node_id
        self._maps: dict[str, np.memmap] = {}
        self._held: list[tuple[str, int]] = []

    def view(self, descriptor: dict) -> np.ndarray:
        """The slot's array, in place (valid until :meth:`release`); holds the slot.
        Raises ``OSError`` when the ring cannot be mapped here."""
        path = descriptor["path"]
        if descriptor["node_id"] != self.node_id:
            raise OSError(f"ring {path} is on node {descriptor['node_id']}, this reader on {self.node_id}")
        if path not in self._maps:
            mapping = np.memmap(path, dtype=np.uint8, mode="r+")
            self._maps = {path: mapping}  # a new ring replaces its restarted producer's old one
            Path(path).unlink(missing_ok=True)  # both ends have it mapped: the name is not needed
        self._held.append((path, descriptor["slot"]))
        return _view(self._maps[path], descriptor)

    def release(self) -> int:
        """Free the slots this reader holds (its previous batch's) for the producer to refill;
        returns how many it freed. A slot of a ring let go (its producer restarted) is left.
        The reads of the slot's pixels precede this store in program order, with a training step's
        worth of lock operations (the GIL's, Ray's) between them: x86 keeps that order anyway; on
        a weakly ordered CPU those locks' barriers are what keep it."""
        held, self._held = self._held, []
        freed = 0
        for path, slot in held:
            mapping = self._maps.get(path)
            if mapping is not None:
                mapping[slot] = FREE
                freed += 1
        return freed


def _view(memory: np.ndarray, d: dict) -> np.ndarray:
    dtype = np.dtype(d["dtype"])
    nbytes = int(np.prod(d["shape"])) * dtype.itemsize
    return memory[d["offset"]:d["offset"] + nbytes].view(dtype).reshape(d["shape"])


def carry(batch: dict) -> bytes:
    """A ring batch as its ticket carries it: pickled, so that the channel passes it on without
    unpacking (plans may hold torch objects; the channel actor does not import torch)."""
    return pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)


def uncarry(ticket: dict) -> dict | None:
    """The batch a ticket carries (its pixels in a ring slot), or None."""
    carried = ticket.get("batch")
    return None if carried is None else pickle.loads(carried)


def remove_rings(tag: str) -> int:
    """Delete the ring files of ``tag`` left behind (by actors killed before their reader mapped
    them); returns how many."""
    paths = glob.glob(str(ring_dir() / f"{PREFIX}{tag}-*"))
    for p in paths:
        Path(p).unlink(missing_ok=True)
    return len(paths)

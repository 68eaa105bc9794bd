"""Shared-memory slots for mixed image batches going from a mixer to its trainer on the same node.

Through Ray's object store, each mixed batch is serialised into a fresh object when
the trainer takes it and mapped again on the trainer's side. For a 64x224x224x3 batch
that hop cost about a fifth of the image pipeline's throughput on the 2-core
development machine. A ring is one file of fixed-size slots in ``/dev/shm`` that the
mixer creates: it copies each mixed batch into a free slot, the batch it hands out
carries the slot's descriptor instead of the pixels, and the trainer reads the pixels
in place. The trainer hands a slot back when it takes its next batch
(:meth:`RingReader.release_list`), so a slot's pixels are valid until the reader's next
``get`` — the contract DALI's own output buffers have. One ring has one reader.

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
import threading
import uuid
from pathlib import Path

import numpy as np

PREFIX = "mixflow-ring-"


def ring_dir() -> Path:
    """``/dev/shm`` (memory-backed); :class:`BatchRing` refuses to start without it."""
    return Path("/dev/shm")


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
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, slots * slot_bytes)  # ENOSPC here, not SIGBUS later
        except OSError:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)
        self.memory = np.memmap(self.path, dtype=np.uint8, mode="r+", shape=(slots * slot_bytes,))
        self.free = list(range(slots))
        self._lock = threading.Lock()  # the producer's thread puts while take() calls release

    def put(self, array: np.ndarray) -> dict | None:
        """Copy ``array`` into a free slot: its descriptor, or ``None`` (no slot free, or too big)."""
        with self._lock:
            if not self.free or array.nbytes > self.slot_bytes:
                return None
            slot = self.free.pop(0)
        start = slot * self.slot_bytes
        np.copyto(self.memory[start:start + array.nbytes].view(array.dtype).reshape(array.shape), array)
        return {"path": str(self.path), "node_id": self.node_id, "slot": slot, "offset": start,
                "shape": list(array.shape), "dtype": array.dtype.str}

    def read(self, descriptor: dict) -> np.ndarray:
        """A copy of a slot's array (for a reader that cannot map the ring)."""
        return np.array(_view(self.memory, descriptor))

    def release(self, slot: int) -> None:
        with self._lock:
            if 0 <= slot < self.slots and slot not in self.free:
                self.free.append(slot)

    def close(self) -> None:
        """Remove the file's name (mappings stay valid); its memory is freed once nobody maps it."""
        self.path.unlink(missing_ok=True)


class RingReader:
    """The consumer's side: maps the rings its batches name, and remembers which slot to hand back."""

    def __init__(self, node_id: str):
        self.node_id = node_id
        self._maps: dict[str, np.memmap] = {}
        self._held: list[tuple[str, int]] = []

    def view(self, descriptor: dict) -> np.ndarray:
        """The slot's array, in place (valid until the slot is released); holds the slot.
        Raises ``OSError`` when the ring cannot be mapped here."""
        path = descriptor["path"]
        if path not in self._maps:
            mapping = np.memmap(path, dtype=np.uint8, mode="r+")
            self._maps = {path: mapping}  # a new ring replaces its restarted producer's old one
            Path(path).unlink(missing_ok=True)  # both ends have it mapped: the name is not needed
        self.hold(descriptor)
        return _view(self._maps[path], descriptor)

    def hold(self, descriptor: dict) -> None:
        """Count the slot as this reader's until the next :meth:`release_list`."""
        self._held.append((descriptor["path"], descriptor["slot"]))

    def release_list(self) -> list[tuple[str, int]]:
        """The slots this reader holds (its previous batch's): to hand back with the next take."""
        held, self._held = self._held, []
        return held


def _view(memory: np.ndarray, d: dict) -> np.ndarray:
    dtype = np.dtype(d["dtype"])
    nbytes = int(np.prod(d["shape"])) * dtype.itemsize
    return memory[d["offset"]:d["offset"] + nbytes].view(dtype).reshape(d["shape"])


def remove_rings(tag: str) -> int:
    """Delete the ring files of ``tag`` left behind (by actors killed before their reader mapped
    them); returns how many."""
    paths = glob.glob(str(ring_dir() / f"{PREFIX}{tag}-*"))
    for p in paths:
        Path(p).unlink(missing_ok=True)
    return len(paths)

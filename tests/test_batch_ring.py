"""Shared-memory batch slots: what the mixer writes is what the trainer reads, slots come back, nothing leaks."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mixflow.runtime import batch_ring
from mixflow.runtime.batch_ring import BatchRing, RingReader, remove_rings


def batch(seed: int, shape=(4, 8, 8, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_the_reader_sees_exactly_what_was_put_and_slots_come_back(tmp_path, monkeypatch):
    monkeypatch.setattr(batch_ring, "ring_dir", lambda: tmp_path)
    ring = BatchRing("t-r0", slots=2, slot_bytes=batch(0).nbytes, node_id="n1")
    reader = RingReader("n1")
    a, b = batch(1), batch(2)
    da, db = ring.put(a), ring.put(b)
    assert da["slot"] != db["slot"] and reader.can_map(da)
    assert ring.put(batch(3)) is None, "no free slot: the caller sends the batch another way"
    va = reader.view(da)
    assert np.array_equal(va, a) and va.dtype == np.uint8 and va.shape == a.shape
    assert not os.path.exists(da["path"]), "mapped by both ends: the file name is gone"
    assert np.array_equal(reader.view(db), b)
    assert reader.release_list() == [(da["path"], da["slot"]), (db["path"], db["slot"])]
    assert reader.release_list() == []
    ring.release(da["slot"])
    ring.release(da["slot"])  # twice: still one free slot
    dc = ring.put(batch(4))
    assert dc["slot"] == da["slot"] and ring.put(batch(5)) is None
    assert np.array_equal(reader.view(dc), batch(4)), "the reader's mapping sees the slot's new batch"


def test_other_dtypes_shapes_and_a_batch_too_big_for_a_slot(tmp_path, monkeypatch):
    monkeypatch.setattr(batch_ring, "ring_dir", lambda: tmp_path)
    ring = BatchRing("t-r1", slots=3, slot_bytes=4 * 3 * 5 * 5 * 4, node_id="n1")
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
    d = ring.put(x)
    assert np.array_equal(RingReader("n1").view(d), x)
    assert np.array_equal(ring.read(d), x), "a copy for a reader on another node"
    assert ring.put(np.zeros((5, 3, 5, 5), np.float32)) is None
    assert not RingReader("n2").can_map(d)


def test_too_little_shared_memory_fails_at_creation_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(batch_ring, "ring_dir", lambda: tmp_path)

    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(batch_ring.os, "posix_fallocate", full)
    with pytest.raises(OSError, match="No space left"):
        BatchRing("t-r2", slots=4, slot_bytes=1 << 20, node_id="n1")
    assert list(tmp_path.iterdir()) == []


def test_remove_rings_deletes_what_killed_actors_left(tmp_path, monkeypatch):
    monkeypatch.setattr(batch_ring, "ring_dir", lambda: tmp_path)
    BatchRing("run1-r0", 2, 64, "n1")
    BatchRing("run1-r1", 2, 64, "n1")
    keep = BatchRing("run2-r0", 2, 64, "n1")
    assert remove_rings("run1") == 2
    assert [p.name for p in tmp_path.iterdir()] == [keep.path.name]
    keep.close()
    assert list(tmp_path.iterdir()) == []

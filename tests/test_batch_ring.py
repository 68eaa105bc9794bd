"""Shared-memory batch slots: what the mixer writes is what the trainer reads, slots come back, nothing leaks."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mixflow.runtime import batch_ring, mixer_actor
from mixflow.runtime.batch_ring import BatchRing, RingReader, carry, remove_rings
from mixflow.runtime.mixer_actor import MixerActor


@pytest.fixture
def shm(tmp_path, monkeypatch):
    monkeypatch.setattr(batch_ring, "ring_dir", lambda: tmp_path)
    return tmp_path


def batch(seed: int, shape=(4, 8, 8, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_the_reader_sees_exactly_what_was_put_and_frees_slots_through_shared_memory(shm):
    ring = BatchRing("t-r0", slots=2, slot_bytes=batch(0).nbytes, node_id="n1")
    reader = RingReader("n1")
    a, b = batch(1), batch(2)
    da, db = ring.put(a), ring.put(b)
    assert da["slot"] != db["slot"] and ring.free == []
    assert da["offset"] % 4096 == 0 and db["offset"] % 4096 == 0, "slots start on a page, after the flags"
    assert ring.put(batch(3)) is None, "no free slot: the caller sends the batch another way"
    va = reader.view(da)
    assert np.array_equal(va, a) and va.dtype == np.uint8 and va.shape == a.shape
    assert not os.path.exists(da["path"]), "mapped by both ends: the file name is gone"
    assert np.array_equal(reader.view(db), b)
    assert ring.free == [], "held by the reader until it releases"
    assert reader.release() == 2 and reader.release() == 0
    assert ring.free == [0, 1], "the reader's release reaches the producer through the shared flags"
    dc = ring.put(batch(4))
    assert dc["slot"] == 0 and np.array_equal(reader.view(dc), batch(4)), "the slot's new batch"
    ring.release(1)
    ring.release(1)  # twice: still one free slot
    assert ring.free == [1]


def test_a_reader_on_another_node_does_not_map_the_ring(shm):
    ring = BatchRing("t-r0", 2, 64, "n1")
    with pytest.raises(OSError, match="on node n1, this reader on n2"):
        RingReader("n2").view(ring.put(np.ones(8, np.uint8)))
    assert ring.path.exists()


def test_other_dtypes_shapes_and_a_batch_too_big_for_a_slot(shm):
    ring = BatchRing("t-r1", slots=3, slot_bytes=4 * 3 * 5 * 5 * 4, node_id="n1")
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
    d = ring.put(x)
    assert np.array_equal(RingReader("n1").view(d), x)
    assert np.array_equal(ring.read(d), x), "a copy for a reader that cannot map the ring"
    assert ring.put(np.zeros((5, 3, 5, 5), np.float32)) is None


def test_a_reader_maps_only_its_producers_latest_ring(shm):
    old = BatchRing("t-r0", 2, 64, "n1")
    reader = RingReader("n1")
    reader.view(old.put(np.ones(8, np.uint8)))
    new = BatchRing("t-r0", 2, 64, "n1")  # the producer restarted
    reader.view(new.put(np.ones(8, np.uint8)))
    assert list(reader._maps) == [str(new.path)], "the restarted producer's old ring is let go"
    assert reader.release() == 1 and new.free == [0, 1] and old.free == [1], "the old ring's slot is left"


def test_no_room_or_no_shared_memory_fails_at_creation_and_leaves_no_file(shm, monkeypatch):
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(batch_ring.os, "posix_fallocate", full)
    with pytest.raises(OSError, match="No space left"):
        BatchRing("t-r2", slots=4, slot_bytes=1 << 20, node_id="n1")
    assert list(shm.iterdir()) == []
    monkeypatch.setattr(batch_ring, "ring_dir", lambda: shm / "missing")
    with pytest.raises(OSError, match="not a writable directory"):
        BatchRing("t-r2", slots=4, slot_bytes=64, node_id="n1")


def test_leftover_rings_are_removed_by_tag_and_by_the_next_producer_of_a_rank(shm):
    first = BatchRing("run1-r0", 2, 64, "n1")
    dead = BatchRing("run1-r1", 2, 64, "n1")
    keep = BatchRing("run2-r0", 2, 64, "n1")
    again = BatchRing("run1-r1", 2, 64, "n1")  # a restarted producer removes its dead self's ring
    assert not dead.path.exists()
    assert sorted(p.name for p in shm.iterdir()) == sorted(r.path.name for r in (first, keep, again))
    assert remove_rings("run1") == 2
    assert [p.name for p in shm.iterdir()] == [keep.path.name]
    keep.close()
    assert list(shm.iterdir()) == []


# ---------------------------------------------------------------- the mixer's side, without Ray


def bare_mixer(ring: BatchRing | None) -> MixerActor:
    """A MixerActor's methods on a plain object holding just what take() and _flush() use."""
    mixer = object.__new__(MixerActor.__ray_actor_class__)
    mixer.ring, mixer.ring_tag, mixer.outbox = ring, ("t" if ring else None), {}
    mixer.progress = {"rebuilt": 0, "ring_batches": 0, "ring_misses": 0}
    return mixer


def ticket(step: int, carried: dict | None = None) -> dict:
    t = {"position": {"epoch": 0, "step": step}, "source": (1, (0, step, 0)), "skipped": []}
    return t if carried is None else {**t, "batch": carry(carried)}


def test_take_copies_a_ring_slot_for_a_reader_that_cannot_map_it_and_frees_the_slot(shm):
    ring = BatchRing("t-r0", 2, batch(0).nbytes, "here")
    mixer = bare_mixer(ring)
    same = mixer.take(ticket(1, {"x": None, "ring": ring.put(batch(1)), "keys": ["a"]}), "here")
    assert np.array_equal(same["x"], batch(1)) and same["ring"] is None and same["keys"] == ["a"]
    assert ring.free == [0, 1] and mixer.ring_tag == "t", "same node: the ring stays on"
    remote = mixer.take(ticket(2, {"x": None, "ring": ring.put(batch(2)), "keys": ["b"]}), "elsewhere")
    assert np.array_equal(remote["x"], batch(2)) and ring.free == [0, 1]
    assert mixer.ring_tag is None and not ring.path.exists(), "a reader elsewhere: the ring is turned off"
    late = mixer.take(ticket(3, {"x": None, "ring": ring.put(batch(3)), "keys": ["c"]}), "elsewhere")
    assert np.array_equal(late["x"], batch(3)), "tickets already queued still get their pixels"


def test_a_ticket_of_another_ring_goes_to_the_outbox_and_a_dropped_repeat_frees_its_slot(shm, monkeypatch):
    ring = BatchRing("t-r0", 2, batch(0).nbytes, "here")
    mixer = bare_mixer(ring)
    stale = {"x": None, "ring": {"path": "/dev/shm/mixflow-ring-old-r0-0", "slot": 0}, "keys": ["b"]}
    mixer.outbox[(0, 2)] = {"x": batch(2), "keys": ["b"]}  # stands for the batch a restarted mixer rebuilds
    out = mixer.take(ticket(2, stale), "here")
    assert np.array_equal(out["x"], batch(2)) and (0, 2) not in mixer.outbox
    d = ring.put(batch(1))
    monkeypatch.setattr(mixer_actor.ray, "get", lambda ref: False)  # the channel dropped a repeated put
    mixer._put, mixer.progress["put_wait_s"] = ((0, 1), d["slot"], object()), 0.0
    mixer._flush()
    assert ring.free == [0, 1]


def test_a_restarted_mixer_rebuilds_a_ticket_of_its_dead_selfs_ring_from_the_source(shm):
    dead = BatchRing("t-r0", 2, batch(0).nbytes, "here")
    stale = ticket(3, {"x": None, "ring": dead.put(batch(9)), "keys": ["k"]})
    ring = BatchRing("t-r0", 2, batch(0).nbytes, "here")  # the restarted mixer's own ring
    mixer = bare_mixer(ring)
    requests = []
    mixer._request = lambda slot, request: None
    mixer._fetch = lambda slot, request, ref: requests.append((slot, request)) or {"images": batch(3)}
    mixer._mix = lambda decoded, position, skipped: {"x": decoded["images"], "position": position}
    out = mixer.take(stale, "here")
    assert requests == [(1, (0, 3, 0))], "the ticket's source request, sent again"
    assert np.array_equal(out["x"], batch(3)) and out["position"] == {"epoch": 0, "step": 3}
    assert mixer.progress["rebuilt"] == 1 and ring.free == [0, 1], "the new ring is not touched"

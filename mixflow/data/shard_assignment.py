"""Disjoint, balanced, seeded assignment of shards to readers, per epoch."""

from __future__ import annotations

import numpy as np

from mixflow.seeding import numpy_rng


def assign_shards(counts: list[int], num_readers: int, seed: int, epoch: int) -> list[list[int]]:
    """Split shard indices among readers: disjoint, covering, balanced by sample count.

    Shards are visited in a seeded per-epoch permutation and each goes to the reader
    with the fewest samples so far (ties: lowest reader id), so every epoch mixes
    shards differently while loads differ by at most one shard.
    """
    if num_readers < 1:
        raise ValueError(f"num_readers must be >= 1, got {num_readers}")
    order = numpy_rng(seed, epoch, "shard_assign").permutation(len(counts))
    loads = np.zeros(num_readers, dtype=np.int64)
    out: list[list[int]] = [[] for _ in range(num_readers)]
    for shard in order:
        reader = int(np.argmin(loads))
        out[reader].append(int(shard))
        loads[reader] += counts[shard]
    return out


def sample_order(shard_ids: list[int], counts: list[int], window: int, seed: int, epoch: int,
                 reader: int) -> np.ndarray:
    """A reader's epoch sequence as rows ``(shard, sample)``.

    Shards are taken ``window`` at a time; the samples of a window are permuted
    together (seeded by epoch, reader and window), so reads stay local to a few
    shards while neighbouring samples come from different shards.
    """
    parts = []
    for w, start in enumerate(range(0, len(shard_ids), window)):
        group = shard_ids[start:start + window]
        rows = np.concatenate([np.stack([np.full(counts[s], s), np.arange(counts[s])], axis=1)
                               for s in group]) if group else np.empty((0, 2), np.int64)
        perm = numpy_rng(seed, epoch, "sample_shuffle", reader, w).permutation(len(rows))
        parts.append(rows[perm])
    return np.concatenate(parts).astype(np.int64) if parts else np.empty((0, 2), np.int64)

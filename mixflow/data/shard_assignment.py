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


def starved_readers(counts: list[int], ranks: int, readers_per_rank: int, seed: int,
                    epochs: int = 1) -> dict[int, list[int]]:
    """Epoch -> the global readers (``rank * readers_per_rank + slot``) that the seeded assignment
    gives no sample in that epoch (too few shards, or only empty ones, for that many readers)."""
    out: dict[int, list[int]] = {}
    for epoch in range(epochs):
        loads = [sum(counts[s] for s in mine) for mine in assign_shards(counts, ranks * readers_per_rank, seed, epoch)]
        if empty := [r for r, n in enumerate(loads) if n == 0]:
            out[epoch] = empty
    return out


def starved_warning(counts: list[int], ranks: int, readers_per_rank: int, seed: int, epochs: int = 1) -> str | None:
    """A warning naming the ranks (and reader slots) that would get no data, or None when all get some."""
    starved = starved_readers(counts, ranks, readers_per_rank, seed, epochs)
    if not starved:
        return None
    k, readers = readers_per_rank, ranks * readers_per_rank
    epoch, empty = next(iter(starved.items()))
    empty_ranks = sorted({r // k for r in empty})
    whole = [r for r in empty_ranks if all(r * k + s in empty for s in range(k))]
    what = (f"rank(s) {', '.join(map(str, whole))} get no samples" if whole else
            f"reader slot(s) {', '.join(f'{r // k}.{r % k}' for r in empty)} (rank.slot) get no samples")
    if whole and len(whole) < len(empty_ranks):
        what += f" and reader slot(s) {', '.join(f'{r // k}.{r % k}' for r in empty if r // k not in whole)} none"
    usable = sum(1 for c in counts if c > 0)
    more = f" (and {len(starved) - 1} later epoch(s))" if len(starved) > 1 else ""
    return (f"{what} in epoch {epoch}{more}: {usable} non-empty shard(s) for {readers} reader(s) ({ranks} rank(s) "
            f"x {k} readers_per_rank), and a reader reads whole shards; write at least {readers} shards "
            f"(a smaller mixflow shards --shard-size)")

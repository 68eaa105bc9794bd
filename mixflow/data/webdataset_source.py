"""A resumable WebDataset source: one reader's samples, in a seeded per-epoch order.

Random access through the DALI index (``pread`` at the data offset) lets the sample
order be a pure function of ``(seed, epoch, reader)``; the state that decides the
future stream is two numbers, ``epoch`` and ``position``.

A shard in object storage (``ShardInfo.store`` set, ``path`` its URL) is downloaded whole
into the node's shard cache (:class:`~mixflow.data.object_store.ShardCache`) when first
read and then read exactly as a local one. At most ``shuffle_window + 1`` such shards stay
open per reader (least recently used closed), so shards the cache evicted do not linger on
disk behind open descriptors. A shard that cannot be fetched (deleted, forbidden, transient
errors past the retries) is a :class:`DataError` for each of its samples, naming its URL;
it is asked for once.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from mixflow.data.listing import ShardInfo
from mixflow.data.object_store import redact, shard_cache
from mixflow.data.shard_assignment import assign_shards, sample_order
from mixflow.data.tar_index import IndexedSample, read_index
from mixflow.errors import DataError


@dataclass(frozen=True)
class RawSample:
    key: str
    shard: str
    components: dict[str, bytes]


class WebDatasetSource:
    """Samples of the shards assigned to reader ``reader`` of ``num_readers``."""

    def __init__(self, shards: list[ShardInfo], reader: int, num_readers: int, seed: int = 0,
                 shuffle_window: int = 4):
        if not 0 <= reader < num_readers:
            raise ValueError(f"reader {reader} out of range for {num_readers} readers")
        self.shards = shards
        self.reader = reader
        self.num_readers = num_readers
        self.seed = seed
        self.shuffle_window = shuffle_window
        self._counts = [s.num_samples for s in shards]
        self._indexes: dict[int, list[IndexedSample]] = {}
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._unfetchable: dict[int, str] = {}  # remote shards that could not be fetched -> why
        self.epoch = 0
        self.position = 0
        self._order = np.empty((0, 2), np.int64)
        self.set_epoch(0)

    def set_epoch(self, epoch: int, position: int = 0, order: np.ndarray | None = None) -> None:
        """Start ``epoch`` at ``position``; ``order`` (rows ``(shard, sample)``) replaces the seeded
        sequence, e.g. the rest of an epoch handed to this reader by an elastic resume."""
        if order is None:
            mine = assign_shards(self._counts, self.num_readers, self.seed, epoch)[self.reader]
            order = sample_order(mine, self._counts, self.shuffle_window, self.seed, epoch, self.reader)
        self._order = np.asarray(order, dtype=np.int64).reshape(-1, 2)
        self.epoch = epoch
        self.position = position

    def __len__(self) -> int:
        return len(self._order)

    @property
    def remaining(self) -> int:
        return len(self._order) - self.position

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.set_epoch(int(state["epoch"]), int(state["position"]))

    def _index(self, shard: int) -> list[IndexedSample]:
        if shard not in self._indexes:
            info = self.shards[shard]
            self._indexes[shard] = read_index(info.index_path, shard=info.path)
        return self._indexes[shard]

    def _fd(self, shard: int, key: str) -> int:
        if shard in self._fds:
            self._fds.move_to_end(shard)
            return self._fds[shard]
        info = self.shards[shard]
        path = info.path
        if info.store is not None:
            if shard in self._unfetchable:
                raise DataError(self._unfetchable[shard], shard=redact(info.path), key=key)
            try:
                path = shard_cache(info.store).fetch(info.path, info.size)
            except DataError as err:
                self._unfetchable[shard] = err.reason
                raise DataError(err.reason, shard=redact(info.path), key=key) from None
        try:
            self._fds[shard] = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise DataError(f"cannot open shard: {exc.strerror}", shard=redact(info.path), key=key) from None
        if info.store is not None:
            remote = [s for s in self._fds if self.shards[s].store is not None]
            for old in remote[:max(0, len(remote) - (self.shuffle_window + 1))]:
                os.close(self._fds.pop(old))
        return self._fds[shard]

    def read(self, shard: int, row: int) -> RawSample:
        """Read one sample's components; a short read is a :class:`DataError` naming the offset."""
        info = self.shards[shard]
        sample = self._index(shard)[row]
        fd = self._fd(shard, sample.key)
        comps = {}
        for ext, comp in sample.components.items():
            data = os.pread(fd, comp.size, comp.offset)
            if len(data) != comp.size:
                raise DataError(f"component .{ext} is truncated ({len(data)} of {comp.size} bytes)",
                                shard=info.path, key=sample.key, offset=comp.offset)
            comps[ext] = data
        return RawSample(sample.key, info.path, comps)

    def take(self, n: int) -> list[tuple[int, int]]:
        """The next ``n`` (shard, row) positions of this epoch; advances the position."""
        rows = self._order[self.position:self.position + n]
        self.position += len(rows)
        return [(int(s), int(r)) for s, r in rows]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

"""A resumable per-domain token source: Parquet token shards packed into fixed-length sequences.

Documents are visited in a seeded per-epoch order (shards assigned to readers and
shuffled with :func:`~mixflow.data.shard_assignment.assign_shards` /
:func:`~mixflow.data.shard_assignment.sample_order`), each followed by ``eos_id``, and
the resulting stream is cut into sequences of ``seq_len + 1`` tokens: ``inputs`` are the
first ``seq_len``, ``targets`` the last ``seq_len``. This is the concatenate-and-chunk
packing of GPT-style pre-training (Radford et al., "Language Models are Unsupervised
Multitask Learners", OpenAI 2019; Brown et al., "Language Models are Few-Shot
Learners", NeurIPS 2020). Sequences do not overlap, so every token of every document is
delivered exactly once per epoch, in document order; the last sequence of an epoch is
padded with ``pad_id`` (``num_tokens`` says how many tokens are real).

A sequence's key is ``shard:row:offset`` of its first token (offset counts within the
document followed by its EOS); ``spans`` lists every ``(shard, row, start, stop)`` piece it
covers, which is what a ledger needs. The state deciding the future stream is three
numbers, ``epoch``, ``position`` (documents of the epoch consumed) and ``offset``
(tokens of the current document consumed), in the spirit of MosaicML streaming's
resumable ``StreamingDataset``.

``directory`` may be a :class:`~mixflow.data.object_store.RemoteDir` (a prefix in object
storage): the manifest is read from the bucket and each shard is downloaded whole into the
node's shard cache when first needed.

Bad input (a missing or unreadable shard, a row count that disagrees with the
manifest, token ids outside the vocabulary) is a :class:`DataError` naming the shard and
the document key ``shard:row``. With a :class:`BadSamplePolicy` in ``skip`` mode, each
affected document is quarantined (one record per document) and the stream goes on.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mixflow.data.bad_samples import BadSamplePolicy
from mixflow.data.object_store import RemoteDir, shard_cache
from mixflow.data.shard_assignment import assign_shards, sample_order
from mixflow.data.token_shard_writer import TokenManifest, read_manifest
from mixflow.errors import DataError


@dataclass(frozen=True)
class DocSpan:
    """Tokens ``[start, stop)`` of document ``row`` of ``shard`` (index ``len(doc)`` is its EOS)."""

    shard: str
    row: int
    start: int
    stop: int


@dataclass(frozen=True)
class TokenSequence:
    key: str
    domain: str
    epoch: int
    tokens: np.ndarray
    num_tokens: int
    spans: tuple[DocSpan, ...]

    @property
    def inputs(self) -> np.ndarray:
        return self.tokens[:-1]

    @property
    def targets(self) -> np.ndarray:
        return self.tokens[1:]

    @property
    def target_mask(self) -> np.ndarray:
        """True where ``targets`` is a real token, False where it is padding."""
        return np.arange(1, len(self.tokens)) < self.num_tokens


@dataclass
class _LoadedShard:
    offsets: np.ndarray
    values: np.ndarray
    bad_rows: dict[int, str]


class TokenSource:
    """Packed sequences of one domain's token shards, for reader ``reader`` of ``num_readers``.

    ``infinite=True`` (training) cycles epochs, each in a new seeded order;
    ``infinite=False`` (validation) stops after epoch ``epoch``. ``shuffle=False`` keeps
    shard and row order.
    """

    def __init__(self, directory: str | Path, seq_len: int, seed: int = 0, reader: int = 0, num_readers: int = 1,
                 shuffle: bool = True, shuffle_window: int = 4, infinite: bool = True,
                 policy: BadSamplePolicy | None = None, epoch: int = 0, cache_shards: int | None = None):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if not 0 <= reader < num_readers:
            raise ValueError(f"reader {reader} out of range for {num_readers} readers")
        if shuffle_window < 1:
            raise ValueError(f"shuffle_window must be >= 1, got {shuffle_window}")
        self.directory = directory if isinstance(directory, RemoteDir) else Path(directory)
        self.manifest: TokenManifest = read_manifest(directory)
        self.domain = self.manifest.domain
        self.seq_len = seq_len
        self.seed = seed
        self.reader = reader
        self.num_readers = num_readers
        self.shuffle = shuffle
        self.shuffle_window = shuffle_window
        self.infinite = infinite
        self.policy = policy
        self.cache_shards = cache_shards or shuffle_window + 1
        self._counts = [s.num_docs for s in self.manifest.shards]
        self._names = [Path(s.file).stem for s in self.manifest.shards]
        self._cache: OrderedDict[int, _LoadedShard] = OrderedDict()
        self._bad_shards: dict[int, str] = {}
        self._skipped_in_a_row = 0
        self.epoch = 0
        self.position = 0
        self.offset = 0
        self._order = np.empty((0, 2), np.int64)
        self.set_epoch(epoch)
        if infinite and len(self._order) == 0:
            raise DataError(f"reader {reader} of {num_readers} has no documents "
                            f"({len(self._counts)} shard(s), {sum(self._counts)} document(s))",
                            shard=str(self.directory))

    # ------------------------------------------------------------------ order and state

    def set_epoch(self, epoch: int, position: int = 0, offset: int = 0) -> None:
        mine = assign_shards(self._counts, self.num_readers, self.seed, epoch)[self.reader]
        if self.shuffle:
            order = sample_order(mine, self._counts, self.shuffle_window, self.seed, epoch, self.reader)
        else:
            rows = [np.stack([np.full(self._counts[s], s), np.arange(self._counts[s])], axis=1) for s in sorted(mine)]
            order = np.concatenate(rows).astype(np.int64) if rows else np.empty((0, 2), np.int64)
        if not 0 <= position <= len(order):
            raise ValueError(f"position must be in [0, {len(order)}] for epoch {epoch}, got {position}")
        if offset < 0 or (offset > 0 and position == len(order)):
            raise ValueError(f"offset {offset} is invalid at position {position} of {len(order)}")
        self._order = order
        self.epoch = epoch
        self.position = position
        self.offset = offset

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.set_epoch(int(state["epoch"]), int(state["position"]), int(state["offset"]))

    @property
    def docs_per_epoch(self) -> int:
        return len(self._order)

    # ------------------------------------------------------------------ reading

    def _path(self, shard: int) -> str:
        return str(self.directory / self.manifest.shards[shard].file)

    def _local(self, shard: int) -> str:
        """The shard's file: its path, or for a shard in object storage its copy in the shard cache."""
        if not isinstance(self.directory, RemoteDir):
            return self._path(shard)
        where = self.directory / self.manifest.shards[shard].file
        return shard_cache(where.store).fetch(where.url)  # a DataError (missing, unreadable) names the URL

    def _read_shard(self, shard: int) -> _LoadedShard:
        path = self._local(shard)
        try:
            table = pq.read_table(path, columns=["tokens"])
        except FileNotFoundError:
            raise DataError("shard file is missing") from None
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"not a readable Parquet token shard: {exc}") from None
        column = table.column("tokens")
        if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)) or \
                not pa.types.is_integer(column.type.value_type):
            raise DataError(f"column 'tokens' must be a list of integers, got {column.type}")
        if table.num_rows != self._counts[shard]:
            raise DataError(f"shard has {table.num_rows} rows but the manifest says {self._counts[shard]}")
        tokens = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
        offsets = tokens.offsets.to_numpy().astype(np.int64)
        # Null token ids read as -1, so they fail the vocabulary check below like any bad id.
        values = pc.fill_null(tokens.values, -1).to_numpy().astype(np.int64)
        bad_rows = {int(r): "tokens is null" for r in np.flatnonzero(tokens.is_null().to_numpy(zero_copy_only=False))}
        vocab = self.manifest.vocab_size
        bad = np.flatnonzero((values < 0) | (values >= vocab))
        rows, first = np.unique(np.searchsorted(offsets, bad, side="right") - 1, return_index=True)
        for row, pos in zip(rows.tolist(), bad[first].tolist()):
            bad_rows.setdefault(row, f"token id {int(values[pos])} at position {pos - int(offsets[row])} is "
                                     f"outside the vocabulary [0, {vocab})")
        return _LoadedShard(offsets, values, bad_rows)

    def _shard(self, shard: int) -> _LoadedShard:
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return self._cache[shard]
        if shard in self._bad_shards:
            raise DataError(self._bad_shards[shard])
        try:
            loaded = self._read_shard(shard)
        except DataError as err:
            self._bad_shards[shard] = err.reason
            raise
        self._cache[shard] = loaded
        if len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return loaded

    def document(self, shard: int, row: int) -> np.ndarray:
        """The tokens of one document (without EOS); a bad one is a :class:`DataError` naming shard and key."""
        key = f"{self._names[shard]}:{row}"
        try:
            loaded = self._shard(shard)
        except DataError as err:
            raise DataError(err.reason, shard=self._path(shard), key=key) from None
        if row in loaded.bad_rows:
            raise DataError(loaded.bad_rows[row], shard=self._path(shard), key=key)
        return loaded.values[loaded.offsets[row]:loaded.offsets[row + 1]]

    def _next_document(self) -> tuple[int, int, np.ndarray | None]:
        """``(shard, row, tokens)`` at ``position``; tokens None when quarantined (``position`` then advances)."""
        shard, row = (int(v) for v in self._order[self.position])
        try:
            doc = self.document(shard, row)
        except DataError as err:
            if self.policy is None:
                raise
            self.policy.handle(err, epoch=self.epoch)
            self.position += 1
            self.offset = 0
            self._skipped_in_a_row += 1
            if self._skipped_in_a_row > len(self._order):
                raise DataError(f"every document of reader {self.reader}'s epoch was skipped; last: {err}",
                                shard=str(self.directory)) from None
            return shard, row, None
        self._skipped_in_a_row = 0
        return shard, row, doc

    # ------------------------------------------------------------------ packing

    def __iter__(self) -> "TokenSource":
        return self

    def __next__(self) -> TokenSequence:
        need = self.seq_len + 1
        out = np.full(need, self.manifest.pad_id, dtype=np.int64)
        spans: list[DocSpan] = []
        filled = 0
        epoch = self.epoch
        while filled < need:
            if self.position >= len(self._order):
                if filled:
                    break
                if not self.infinite:
                    raise StopIteration
                self.set_epoch(self.epoch + 1)
                epoch = self.epoch
                continue
            shard, row, doc = self._next_document()
            if doc is None:
                continue
            length = len(doc) + 1
            take = min(need - filled, length - self.offset)
            stop = self.offset + take
            body = doc[self.offset:min(stop, len(doc))]
            out[filled:filled + len(body)] = body
            if stop == length:
                out[filled + take - 1] = self.manifest.eos_id
            spans.append(DocSpan(self._names[shard], row, self.offset, stop))
            filled += take
            self.offset = stop
            if stop == length:
                self.position += 1
                self.offset = 0
        first = spans[0]
        return TokenSequence(f"{first.shard}:{first.row}:{first.start}", self.domain, epoch, out, filled, tuple(spans))

    def close(self) -> None:
        self._cache.clear()

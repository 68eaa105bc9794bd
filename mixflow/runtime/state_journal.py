"""Durable state of a long-lived actor: a JSON snapshot plus an append-only journal of its inputs.

Rewriting the whole state after every event makes a run's I/O grow with the square of
its length when the state holds histories (the mixture controller keeps its trajectory
and every merged report). Here each event appends one line to ``<path>.journal``; the
snapshot ``<path>`` is rewritten only when the journal has grown past the snapshot's size
(or :data:`MIN_COMPACT_BYTES`), so the bytes written stay proportional to the run.

Recovery is replay: :meth:`StateJournal.load` returns the snapshot and the journal
entries recorded after it, and the owner applies them again in order, so the owner's
event handling must be a deterministic function of its state and the entry.
Entries carry sequence numbers and the snapshot the last one it includes: a crash
between writing a snapshot and emptying the journal replays nothing twice, and a line
torn by a crash mid-write (only ever the last one) is dropped. Appends are flushed to
the OS (they survive the process); snapshots are fsynced.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MIN_COMPACT_BYTES = 64 * 1024


class StateJournal:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.journal_path = self.path.with_name(self.path.name + ".journal")
        self.seq = 0  # sequence number of the last entry written or loaded
        self._snapshot_bytes = 0
        self._journal_bytes = 0
        self._file = None

    def exists(self) -> bool:
        return self.path.exists() or self.journal_path.exists()

    def load(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """The last snapshot's state (``None`` if none was written) and the entries after it, in order.

        A last line without its newline was torn by a crash while it was written (its event
        never completed): it is cut off the file, so that later entries follow a whole line.
        """
        state, self.seq = None, 0
        if self.path.exists():
            text = self.path.read_text()
            snapshot = json.loads(text)
            state, self.seq = snapshot["state"], int(snapshot["seq"])
            self._snapshot_bytes = len(text)
        entries = []
        self._journal_bytes = 0
        if self.journal_path.exists():
            data = self.journal_path.read_bytes()
            whole = data[:data.rfind(b"\n") + 1]
            if len(whole) < len(data):
                os.truncate(self.journal_path, len(whole))
            for i, line in enumerate(whole.decode("utf-8").splitlines()):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"{self.journal_path}: line {i + 1} is not JSON") from None
                if record["seq"] > self.seq:
                    if record["seq"] != self.seq + 1:
                        raise ValueError(f"{self.journal_path}: line {i + 1} has entry {record['seq']}, "
                                         f"expected {self.seq + 1} (entries are missing)")
                    entries.append(record["entry"])
                    self.seq = record["seq"]
            self._journal_bytes = len(whole)
        return state, entries

    @staticmethod
    def encode(entry: dict[str, Any]) -> str:
        """``entry`` as JSON; encode before changing state, so an entry that cannot be written is
        refused before it has any effect."""
        return json.dumps(entry)

    def append(self, entry: dict[str, Any] | str) -> None:
        """Record one event (an entry or its :meth:`encode`), flushed to the OS: it survives the
        process (not a machine crash; snapshots are fsynced)."""
        if self._file is None:
            self._file = open(self.journal_path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        encoded = entry if isinstance(entry, str) else self.encode(entry)
        self.seq += 1
        line = f'{{"seq": {self.seq}, "entry": {encoded}}}\n'
        self._file.write(line)
        self._file.flush()
        self._journal_bytes += len(line)

    def should_compact(self) -> bool:
        return self._journal_bytes > max(self._snapshot_bytes, MIN_COMPACT_BYTES)

    def compact(self, state: dict[str, Any]) -> None:
        """Write ``state`` (everything up to the last entry) as the snapshot, then empty the journal."""
        text = json.dumps({"seq": self.seq, "state": state})
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        self._snapshot_bytes = len(text)
        if self._file is not None:
            self._file.close()
        self._file = open(self.journal_path, "w", encoding="utf-8")  # noqa: SIM115 - kept open
        self._journal_bytes = 0

    def start(self, state: dict[str, Any]) -> None:
        """Begin a new history from ``state``: whatever an earlier owner left at this path is
        removed first, so a crash at any point here never resumes the earlier history."""
        self.remove()
        self.compact(state)

    def remove(self) -> None:
        """Delete the snapshot and the journal (the journal first: a snapshot never outlives it
        with entries missing)."""
        self.close()
        self.journal_path.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)
        self.seq, self._snapshot_bytes, self._journal_bytes = 0, 0, 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported here (e.g. Windows): the rename itself is atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

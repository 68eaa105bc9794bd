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
torn by a crash mid-write (only ever the last one) is dropped.
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
        """The last snapshot's state (``None`` if none was written) and the entries after it, in order."""
        state, self.seq = None, 0
        if self.path.exists():
            text = self.path.read_text()
            snapshot = json.loads(text)
            state, self.seq = snapshot["state"], int(snapshot["seq"])
            self._snapshot_bytes = len(text)
        entries = []
        if self.journal_path.exists():
            lines = self.journal_path.read_text().splitlines(keepends=True)
            for i, line in enumerate(lines):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    if i == len(lines) - 1:  # torn by a crash while it was written: the event never
                        self.journal_path.write_text("".join(lines[:i]))  # completed; later ones follow it
                        break
                    raise ValueError(f"{self.journal_path}: line {i + 1} is not JSON") from None
                self._journal_bytes += len(line)
                if record["seq"] > self.seq:
                    if record["seq"] != self.seq + 1:
                        raise ValueError(f"{self.journal_path}: line {i + 1} has entry {record['seq']}, "
                                         f"expected {self.seq + 1} (entries are missing)")
                    entries.append(record["entry"])
                    self.seq = record["seq"]
        return state, entries

    def append(self, entry: dict[str, Any]) -> None:
        """Record one event (flushed to the OS, so it survives the process)."""
        if self._file is None:
            self._file = open(self.journal_path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        self.seq += 1
        line = json.dumps({"seq": self.seq, "entry": entry}) + "\n"
        self._file.write(line)
        self._file.flush()
        self._journal_bytes += len(line)

    def should_compact(self) -> bool:
        return self._journal_bytes > max(self._snapshot_bytes, MIN_COMPACT_BYTES)

    def compact(self, state: dict[str, Any]) -> None:
        """Write ``state`` (everything up to the last entry) as the snapshot, then empty the journal."""
        text = json.dumps({"seq": self.seq, "state": state})
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)
        self._snapshot_bytes = len(text)
        if self._file is not None:
            self._file.close()
        self._file = open(self.journal_path, "w", encoding="utf-8")  # noqa: SIM115 - kept open
        self._journal_bytes = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

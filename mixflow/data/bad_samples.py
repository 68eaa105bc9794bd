"""The bad-sample policy: ``raise`` a clear error, or ``skip`` with a quarantine record.

A :class:`SkipRecord` also serves as a *suspect* record: a sample delivered although libjpeg
only decodes its scan data with a warning (see :mod:`mixflow.data.jpeg_entropy`); those go to
``suspect.jsonl`` beside ``quarantine.jsonl``, whatever the policy."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from mixflow.errors import DataError

POLICIES = ("raise", "skip")


@dataclass(frozen=True)
class SkipRecord:
    shard: str | None
    key: str | None
    reason: str
    offset: int | None = None
    epoch: int | None = None


class BadSamplePolicy:
    """Applies ``on_error`` to a :class:`DataError`: re-raise it, or record and count it."""

    def __init__(self, on_error: str = "raise"):
        if on_error not in POLICIES:
            raise ValueError(f"on_error must be one of {', '.join(POLICIES)}, got {on_error!r}")
        self.on_error = on_error
        self.records: list[SkipRecord] = []

    def handle(self, err: DataError, epoch: int | None = None) -> None:
        if self.on_error == "raise":
            raise err
        self.records.append(SkipRecord(err.shard, err.key, err.reason, err.offset, epoch))

    def drain(self, epoch: int | None = None) -> list[SkipRecord]:
        """Take out the records (of one ``epoch`` when given)."""
        out = [r for r in self.records if epoch is None or r.epoch == epoch]
        self.records = [r for r in self.records if not (epoch is None or r.epoch == epoch)]
        return out


def write_quarantine(path: str | Path, records: list[SkipRecord]) -> None:
    """One JSON object per record (a skipped or a suspect sample): shard, key, reason, offset, epoch."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for rec in records:
            fh.write(json.dumps(asdict(rec)) + "\n")

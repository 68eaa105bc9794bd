"""DALI WebDataset index files (``.idx``, format ``v1.2``).

One line per sample: ``ext data_offset size name`` repeated per component, after a
header ``v1.2 <num_samples>``. Offsets point at the member's data (after its 512-byte
tar header), exactly what ``wds2idx`` writes and ``fn.readers.webdataset`` reads.

Extensions are matched case-insensitively (``.JPG`` is ``.jpg``, as DALI's reader does with
``case_sensitive_extensions=False``): an :class:`IndexedSample`'s components are keyed by the
lower-cased extension (each :class:`Component` keeps the name as stored). An extension that
appears twice in one line is a second copy of the sample (two adjacent tar members groups with
the same key, which ``wds2idx`` and the tar scan merge into one line): the first copy is used
and the other components are kept in ``duplicates`` for the listing to report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mixflow.errors import DataError

INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class Component:
    ext: str
    offset: int
    size: int
    name: str


@dataclass(frozen=True)
class IndexedSample:
    key: str
    components: dict[str, Component]
    duplicates: tuple[Component, ...] = ()  # components of further copies of the sample (same key)


def split_name(name: str) -> tuple[str, str]:
    """WebDataset naming: the key is everything before the first dot of the basename."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


def write_index(path: str | Path, samples: list[list[Component]]) -> None:
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for comps in samples:
        lines.append(" ".join(f"{c.ext} {c.offset} {c.size} {c.name}" for c in comps))
    Path(path).write_text("\n".join(lines) + "\n")


def read_index(path: str | Path, shard: str | None = None) -> list[IndexedSample]:
    """Parse an index file; errors name the index file, the line and the shard."""
    path = Path(path)
    where = shard or str(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DataError(f"cannot read index file {path}: {exc.strerror}", shard=where) from None
    if not lines:
        raise DataError(f"index file {path} is empty", shard=where)
    head = lines[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION:
        raise DataError(f"index file {path}: expected header '{INDEX_VERSION} <n>', got {lines[0]!r}", shard=where)
    try:
        expected = int(head[1])
    except ValueError:
        raise DataError(f"index file {path} line 1: sample count {head[1]!r} is not an integer",
                        shard=where) from None
    samples: list[IndexedSample] = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) % 4:
            raise DataError(f"index file {path} line {lineno}: expected groups of 4 fields", shard=where)
        comps: dict[str, Component] = {}
        extra: list[Component] = []
        key = None
        for i in range(0, len(fields), 4):
            ext, off, size, name = fields[i:i + 4]
            try:
                comp = Component(ext, int(off), int(size), name)
            except ValueError:
                raise DataError(f"index file {path} line {lineno}: component {i // 4 + 1} ({name!r}): offset "
                                f"{off!r} and size {size!r} must be integers", shard=where) from None
            if comp.offset < 0 or comp.size < 0:
                raise DataError(f"index file {path} line {lineno}: component {name!r} has a negative "
                                f"offset or size ({off}, {size})", shard=where)
            if extra or ext.lower() in comps:  # a second copy began
                extra.append(comp)
            else:
                comps[ext.lower()] = comp
            key = key or split_name(name)[0]
        samples.append(IndexedSample(key=key, components=comps, duplicates=tuple(extra)))
    if len(samples) != expected:
        raise DataError(f"index file {path} announces {expected} samples but lists {len(samples)}", shard=where)
    return samples

"""Write WebDataset tar shards together with their DALI index files.

Written with :mod:`tarfile` directly (not ``webdataset.TarWriter``) because the
index needs each member's data offset, which ``tarfile`` reports as it writes.
Members are written in key order with fixed metadata so the same input gives
byte-identical shards.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from mixflow.data.tar_index import Component, write_index


class ShardWriter:
    """Writes ``{prefix}-{n:06d}.tar`` + ``.idx`` files, starting a new shard past ``max_bytes``.

    >>> with ShardWriter("out", "train", max_bytes=2**20) as w:
    ...     w.write("000001", {"jpg": jpeg_bytes, "cls": b"3"})
    """

    def __init__(self, directory: str | Path, prefix: str = "shard", max_bytes: int = 2**20,
                 max_samples: int | None = None):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.max_samples = max_samples
        self.paths: list[Path] = []
        self.total_samples = 0
        self._tar: tarfile.TarFile | None = None
        self._index: list[list[Component]] = []
        self._bytes = 0
        self._keys: set[str] = set()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open_next(self) -> None:
        self._finish()
        path = self.directory / f"{self.prefix}-{len(self.paths):06d}.tar"
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
        self.paths.append(path)
        self._index = []
        self._bytes = 0

    def write(self, key: str, components: dict[str, bytes]) -> None:
        if not key or "." in key or "/" in key or " " in key:
            raise ValueError(f"sample key {key!r} must be non-empty without '.', '/' or spaces")
        if not components:
            raise ValueError(f"sample {key!r} has no components")
        for ext in components:
            if not ext or any(c in ext for c in " /\t\n"):
                raise ValueError(f"sample {key!r}: component extension {ext!r} must be non-empty without "
                                 "spaces or '/'")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        self._keys.add(key)
        size = sum(len(v) for v in components.values())
        full = self.max_samples is not None and len(self._index) >= self.max_samples
        if self._tar is None or full or (self._index and self._bytes + size > self.max_bytes):
            self._open_next()
        assert self._tar is not None
        comps = []
        for ext in sorted(components):
            data = components[ext]
            info = tarfile.TarInfo(name=f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            # USTAR: exactly one 512-byte header per member, so the data starts right after it.
            data_offset = self._tar.offset + tarfile.BLOCKSIZE
            self._tar.addfile(info, io.BytesIO(data))
            comps.append(Component(ext, data_offset, len(data), info.name))
        self._index.append(comps)
        self._bytes += size + 512 * (len(components) + 1)
        self.total_samples += 1

    def _finish(self) -> None:
        if self._tar is not None:
            self._tar.close()
            write_index(self.paths[-1].with_suffix(".idx"), self._index)
            self._tar = None

    def close(self) -> None:
        self._finish()

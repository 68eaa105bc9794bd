"""Find the shards of a dataset and their sample counts."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

from mixflow.data.tar_index import Component, read_index, split_name, write_index
from mixflow.errors import DataError


@dataclass(frozen=True)
class ShardInfo:
    path: str
    index_path: str
    num_samples: int


def index_tar(tar_path: str | Path, index_path: str | Path) -> int:
    """Build a DALI index for a tar written by another tool; returns the sample count."""
    groups: list[list[Component]] = []
    last = None
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_name(member.name)
                if not key or key.endswith("/") or not ext:
                    continue
                comp = Component(ext, member.offset_data, member.size, member.name)
                if key != last:
                    groups.append([comp])
                    last = key
                else:
                    groups[-1].append(comp)
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"cannot index tar: {exc}", shard=str(tar_path)) from None
    write_index(index_path, groups)
    return len(groups)


def list_shards(directory: str | Path) -> list[ShardInfo]:
    """All ``*.tar`` shards of a directory, sorted by name, each with its index (built if missing)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"shard directory {directory} does not exist")
    shards = []
    for tar in sorted(directory.glob("*.tar")):
        idx = tar.with_suffix(".idx")
        if not idx.exists():
            index_tar(tar, idx)
        count = len(read_index(idx, shard=str(tar)))
        shards.append(ShardInfo(str(tar), str(idx), count))
    if not shards:
        raise DataError(f"no *.tar shards in {directory}")
    return shards


def dataset_keys(shards: list[ShardInfo]) -> dict[str, str]:
    """Every sample key -> its shard. Duplicate keys are an error naming both shards."""
    keys: dict[str, str] = {}
    for shard in shards:
        for sample in read_index(shard.index_path, shard=shard.path):
            if sample.key in keys:
                raise DataError(f"duplicate sample key (also in {keys[sample.key]})",
                                shard=shard.path, key=sample.key)
            keys[sample.key] = shard.path
    return keys

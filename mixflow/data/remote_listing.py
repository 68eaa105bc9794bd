"""Listing shards that live in object storage: the same checks as :func:`~mixflow.data.listing.list_shards`.

The objects under the prefix are listed once; every ``.idx`` (and ``classes.json``) is
mirrored into the local cache (``<cache_dir>/index/<hash of the URL>/``), so the index is
read from disk by everything that reads indexes. Each tar's end-of-archive marker is checked
with one ranged read of its last 1 KiB; a tar without an index is downloaded into the shard
cache and indexed. Problems become :class:`DataError` naming the (redacted) URL and go through
the policy exactly as for local shards: an index whose tar is gone loses each of its keys, one
record per key.
"""

from __future__ import annotations

from pathlib import Path

from mixflow.data.bad_samples import BadSamplePolicy
from mixflow.data.listing import END_OF_ARCHIVE, ShardInfo, duplicate_copies, index_tar, tar_truncation
from mixflow.data.object_store import (PROCESS_STATS, StoreConfig, index_dir, join, list_objects, mirror,
                                       read_range, redact, shard_cache)
from mixflow.data.tar_index import read_index
from mixflow.errors import DataError


def list_remote_shards(url: str, policy: BadSamplePolicy, store: StoreConfig) -> list[ShardInfo]:
    """Every usable ``*.tar`` under the prefix ``url``, sorted by name; ``index_path`` is the local
    mirror of its index, ``path`` the URL, ``size`` its size and ``store`` how readers fetch it."""
    options, stats = store.options, PROCESS_STATS
    objects = list_objects(url, options, stats)
    tars = {name[:-4]: size for name, size in objects.items() if name.endswith(".tar")}
    idxs = {name[:-4] for name in objects if name.endswith(".idx")}
    if not tars and not idxs:
        raise DataError(f"no *.tar shards in {redact(url)}")
    local = index_dir(url, store)
    local.mkdir(parents=True, exist_ok=True)
    if "classes.json" in objects:
        try:
            mirror(join(url, "classes.json"), local / "classes.json", options, stats)
        except DataError:
            pass  # optional metadata; the labels are still checked when read
    shards = []
    for stem in sorted(tars.keys() | idxs):
        tar_url = join(url, f"{stem}.tar")
        idx_local = local / f"{stem}.idx"
        try:
            if stem not in tars:
                _missing_shard(join(url, f"{stem}.idx"), idx_local, tar_url, policy, options)
                continue
            size = tars[stem]
            if size == 0:
                raise DataError("shard is empty (0 bytes)", shard=redact(tar_url))
            built = stem not in idxs
            if built:
                index_tar(shard_cache(store).fetch(tar_url, size), idx_local)
            else:
                mirror(join(url, f"{stem}.idx"), idx_local, options, stats)
            samples = read_index(idx_local, shard=redact(tar_url))
            if not samples:
                raise DataError(f"shard holds no samples (index {stem}.idx lists none)", shard=redact(tar_url))
            tail = read_range(tar_url, options, stats, max(0, size - END_OF_ARCHIVE), size)
            cut = tar_truncation(redact(tar_url), samples, index_built=built, size=size, tail=tail)
        except DataError as err:
            policy.handle(err)
            continue
        except OSError as exc:
            policy.handle(DataError(f"cannot read shard: {exc.strerror or exc}", shard=redact(tar_url)))
            continue
        if cut is not None:
            policy.handle(cut)
        duplicate_copies(redact(tar_url), samples, policy)
        shards.append(ShardInfo(tar_url, str(idx_local), len(samples), size=size, store=store))
    if not shards:
        raise DataError(f"no readable shards in {redact(url)}: all {len(tars.keys() | idxs)} were skipped "
                        f"({policy.records[-1].reason})")
    return shards


def _missing_shard(idx_url: str, idx_local: Path, tar_url: str, policy: BadSamplePolicy, options: dict) -> None:
    """An index without its tar: every sample it lists is lost, one record per key."""
    where = redact(tar_url)
    why = "shard object is missing"
    try:
        mirror(idx_url, idx_local, options, PROCESS_STATS)
        samples = read_index(idx_local, shard=where)
    except DataError as err:
        policy.handle(DataError(f"{why} and its index is unreadable: {err.reason}", shard=where))
        return
    reason = f"{why} (its index {Path(idx_local).name} lists {len(samples)} samples)"
    if not samples:
        policy.handle(DataError(reason, shard=where))
    for sample in samples:
        policy.handle(DataError(reason, shard=where, key=sample.key))

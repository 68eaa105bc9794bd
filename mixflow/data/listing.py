"""Find the shards of a dataset and their sample counts, reporting every shard that is unusable.

Listing is where whole-shard problems show up: a shard file that is missing while its
index remains, a dangling symlink, a shard that is empty or not a tar, an index that
cannot be parsed (file and line named), a tar that was cut short (no end-of-archive
marker), and duplicate keys (a second copy of a sample, adjacent or not). Each becomes a
:class:`DataError` naming the shard (and the sample key and byte offset when known) and
goes through a :class:`BadSamplePolicy`: ``raise`` stops the listing; ``skip`` records it
and the listing goes on. What a damaged shard still holds stays listed; the samples it
lost are quarantined one by one when read (their components come back short), so
nothing disappears silently; of duplicate keys the first copy stays and the later ones
are never read (``ShardInfo.skip_rows``).
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

from mixflow.data.bad_samples import BadSamplePolicy
from mixflow.data.object_store import StoreConfig, is_url
from mixflow.data.tar_index import Component, IndexedSample, read_index, split_name, write_index
from mixflow.errors import DataError

# A tar ends with two zero blocks (the end-of-archive marker); tools pad the last record with more zeros.
END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE


@dataclass(frozen=True)
class ShardInfo:
    path: str
    index_path: str
    num_samples: int
    # rows never delivered: later copies of a key an earlier row already holds (quarantined at listing)
    skip_rows: tuple[int, ...] = ()
    # a shard in object storage: ``path`` is its URL, ``index_path`` the local mirror of its index
    size: int | None = None
    store: StoreConfig | None = None


def _scan_tar(tar_path: str | Path) -> list[list[Component]]:
    """The samples of a tar as component groups; a tar cut inside a member keeps what precedes the cut.

    ``tarfile`` stops quietly at a damaged or missing header and raises "unexpected end
    of data" when a member's data runs past the end of the file; either way the members
    read so far (the cut one included, with its announced size) are returned.
    """
    groups: list[list[Component]] = []
    last = None
    with tarfile.open(tar_path, "r:") as tar:
        members = iter(tar)
        while True:
            try:
                member = next(members)
            except StopIteration:
                break
            except tarfile.ReadError:  # the previous member's data runs past the end of the file
                break
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
    return groups


def index_tar(tar_path: str | Path, index_path: str | Path) -> int:
    """Build a DALI index for a tar written by another tool; returns the sample count."""
    try:
        groups = _scan_tar(tar_path)
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"not a readable tar: {exc}", shard=str(tar_path)) from None
    write_index(index_path, groups)
    return len(groups)


def tar_truncation(tar_path: str | Path, samples: list[IndexedSample], index_built: bool = False,
                   size: int | None = None, tail: bytes | None = None) -> DataError | None:
    """A :class:`DataError` if the tar lacks its end-of-archive marker (it was cut short), else ``None``.

    The error's offset is the file size; its reason names the indexed samples whose data
    lies past the end (each is quarantined when read), how many bytes are missing, and warns
    that members after the cut that no index lists cannot be recovered. ``index_built``: the
    index was just built from this (truncated) tar, so no key after the cut is known at all
    and the missing bytes are a lower bound (the cut member's announced size). ``size`` and
    ``tail`` (the last ``END_OF_ARCHIVE`` bytes), when given, stand for the file (a remote shard).
    """
    if size is None or tail is None:
        size = os.path.getsize(tar_path)
        with open(tar_path, "rb") as fh:
            fh.seek(max(0, size - END_OF_ARCHIVE))
            tail = fh.read()
    if size >= END_OF_ARCHIVE and not any(tail):
        return None
    cut = [s.key for s in samples if any(c.offset + c.size > size for c in s.components.values())]
    named = ", ".join(repr(k) for k in cut[:5]) + (", ..." if len(cut) > 5 else "")
    lost = f"{len(cut)} indexed sample(s) lie past the end ({named})" if cut else "no indexed sample lies past the end"
    end = max((c.offset + c.size for s in samples for c in s.components.values()), default=0)
    missing = max(0, end - size)
    if index_built:
        after = (f"at least {missing} bytes are missing (what the cut member announces); the index was built "
                 "from the cut tar, so the keys of any members after the cut are unknown and they are lost uncounted")
    else:
        after = (f"{missing} bytes of indexed data are missing; "
                 "members after the cut that the index does not list are lost")
    return DataError(f"tar is truncated: it ends at byte {size} without the end-of-archive marker; {lost}; {after}",
                     shard=str(tar_path), offset=size)


def duplicate_copies(tar: Path, samples: list[IndexedSample], policy: BadSamplePolicy) -> None:
    """Each further copy of a sample in one index line (adjacent tar members with the same key):
    the first copy is used, the other goes through ``policy`` naming the shard, key and offset."""
    for sample in samples:
        if sample.duplicates:
            names = ", ".join(c.name for c in sample.duplicates)
            policy.handle(DataError(f"duplicate sample key: {len(sample.duplicates)} more member(s) with this key "
                                    f"follow the sample ({names}); the first copy is used, the rest quarantined",
                                    shard=str(tar), key=sample.key, offset=sample.duplicates[0].offset))


def _list_shard(tar: Path, policy: BadSamplePolicy) -> ShardInfo | None:
    """One shard's info, or ``None`` (after ``policy`` recorded why) when nothing in it can be read."""
    idx = tar.with_suffix(".idx")
    built = False
    try:
        if not tar.exists():  # listed but gone: a dangling symlink (or deleted meanwhile)
            unreadable = _unreadable(tar)
            if idx.exists():
                _missing_shard(idx, policy, unreadable)
                return None
            raise DataError(unreadable, shard=str(tar))
        if not idx.exists():
            if tar.stat().st_size == 0:
                raise DataError("shard is empty (0 bytes)", shard=str(tar))
            index_tar(tar, idx)
            built = True
        samples = read_index(idx, shard=str(tar))
        if not samples:
            raise DataError(f"shard holds no samples (index {idx.name} lists none)", shard=str(tar))
        cut = tar_truncation(tar, samples, index_built=built)
    except OSError as exc:
        policy.handle(DataError(f"cannot read shard: {exc.strerror or exc}", shard=str(tar)))
        return None
    except DataError as err:
        policy.handle(err)
        return None
    if cut is not None:
        policy.handle(cut)
    duplicate_copies(tar, samples, policy)
    return ShardInfo(str(tar), str(idx), len(samples))


def _unreadable(tar: Path) -> str:
    """Why a listed shard path cannot be opened (a dangling symlink names its target)."""
    if tar.is_symlink():
        return f"shard file is a dangling symlink (to {os.readlink(tar)}, which does not exist)"
    return "shard file is missing"


def _missing_shard(idx: Path, policy: BadSamplePolicy, why: str = "shard file is missing") -> None:
    """An index without its tar: every sample it lists is lost, one error (or record) per key."""
    tar = idx.with_suffix(".tar")
    try:
        samples = read_index(idx, shard=str(tar))
    except DataError as err:
        policy.handle(DataError(f"{why} and its index is unreadable: {err.reason}", shard=str(tar)))
        return
    reason = f"{why} (its index {idx.name} lists {len(samples)} samples)"
    if not samples:
        policy.handle(DataError(reason, shard=str(tar)))
    for sample in samples:
        policy.handle(DataError(reason, shard=str(tar), key=sample.key))


def list_shards(directory: str | Path, policy: BadSamplePolicy | None = None,
                store: StoreConfig | None = None) -> list[ShardInfo]:
    """All usable ``*.tar`` shards of a directory, sorted by name, each with its index (built if missing).

    Unusable shards (see the module docstring) go through ``policy``; without one they
    raise. In ``skip`` mode the records are in ``policy.records`` (``epoch`` None): keyed
    records for samples whose shard is gone, key-less ones for shard-wide problems.
    ``directory`` may be a URL (``s3://``, ``gs://``, ``https://``, ``file://``): see
    :func:`mixflow.data.remote_listing.list_remote_shards` (``store``: its cache and options).
    """
    policy = policy or BadSamplePolicy("raise")
    if is_url(directory):
        from mixflow.data.remote_listing import list_remote_shards

        shards = list_remote_shards(str(directory), policy, store or StoreConfig.make(None, None, None))
        return _drop_duplicate_keys(shards, policy)
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"shard directory {directory} does not exist")
    tars = {p.stem: p for p in directory.glob("*.tar")}
    orphans = {p.stem: p for p in directory.glob("*.idx") if p.stem not in tars}
    if not tars and not orphans:
        raise DataError(f"no *.tar shards in {directory}")
    shards = []
    for stem in sorted(tars.keys() | orphans.keys()):
        if stem in orphans:
            _missing_shard(orphans[stem], policy)
        elif (info := _list_shard(tars[stem], policy)) is not None:
            shards.append(info)
    if not shards:
        raise DataError(f"no readable shards in {directory}: all {len(tars) + len(orphans)} were skipped "
                        f"({policy.records[-1].reason})")
    return _drop_duplicate_keys(shards, policy)


def _drop_duplicate_keys(shards: list[ShardInfo], policy: BadSamplePolicy) -> list[ShardInfo]:
    """A key on more than one index row (in two shards, or twice in one): the first row (in shard
    name order) is used; every later one goes through ``policy`` and, when skipped, into its
    shard's ``skip_rows`` so no reader delivers it."""
    first: dict[str, tuple[str, int]] = {}
    out = []
    for shard in shards:
        skip = []
        for row, sample in enumerate(read_index(shard.index_path, shard=shard.path)):
            if sample.key not in first:
                first[sample.key] = (shard.path, row)
                continue
            where, at = first[sample.key]
            also = f"also in {where}" if where != shard.path else "also"
            offset = min((c.offset for c in sample.components.values()), default=None)
            policy.handle(DataError(f"duplicate sample key ({also} at index row {at + 1}): the first copy is "
                                    f"used, this one (row {row + 1}) is quarantined", shard=shard.path,
                                    key=sample.key, offset=offset))
            skip.append(row)
        out.append(replace(shard, skip_rows=tuple(skip)) if skip else shard)
    return out


def lost_keys(records, shards: list[ShardInfo]) -> list[str]:
    """The keys of the listing's quarantine records that no listed shard still holds: lost every
    epoch. (A duplicate copy's record names a key whose first copy still arrives.)"""
    held = dataset_keys(shards)
    return sorted({r.key for r in records if r.key is not None} - held.keys())


def dataset_keys(shards: list[ShardInfo]) -> dict[str, str]:
    """Every sample key -> its shard. Duplicate keys are an error naming both shards."""
    keys: dict[str, str] = {}
    for shard in shards:
        skip = set(shard.skip_rows)
        for row, sample in enumerate(read_index(shard.index_path, shard=shard.path)):
            if row in skip:  # a duplicate copy quarantined by the listing
                continue
            if sample.key in keys:
                raise DataError(f"duplicate sample key (also in {keys[sample.key]})",
                                shard=shard.path, key=sample.key)
            keys[sample.key] = shard.path
    return keys

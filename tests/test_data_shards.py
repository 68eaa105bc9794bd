"""Unit tests for shard writing, DALI index files, listing, assignment and the WebDataset source."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from wds2idx import IndexCreator

from mixflow.data.bad_samples import BadSamplePolicy
from mixflow.data.demo_sets import build_demo
from mixflow.data.image_folder import shards_from_folder
from mixflow.data.listing import dataset_keys, index_tar, list_shards
from mixflow.data.shard_assignment import assign_shards
from mixflow.data.shard_writer import ShardWriter
from mixflow.data.tar_index import read_index
from mixflow.data.webdataset_source import WebDatasetSource
from mixflow.errors import DataError


def dali_index(tar: Path, idx: Path) -> bytes:
    with IndexCreator(str(tar), str(idx), verbose=False) as creator:
        creator.create_index()
    return idx.read_bytes()


def payloads(n: int, seed: int = 0, size_range=(1, 3000)) -> dict[str, dict[str, bytes]]:
    """``n`` samples with random-length, random-content components (one of them empty sometimes)."""
    r = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        key = f"s{i:05d}"
        comps = {
            "jpg": r.integers(0, 256, int(r.integers(*size_range)), dtype=np.uint8).tobytes(),
            "cls": str(i % 7).encode(),
            "json": json.dumps({"key": key}).encode(),
        }
        if i % 5 == 0:
            comps["txt"] = b""
        out[key] = comps
    return out


def write_dataset(directory: Path, samples: dict[str, dict[str, bytes]], **kw) -> ShardWriter:
    with ShardWriter(directory, "train", **kw) as writer:
        for key, comps in samples.items():
            writer.write(key, comps)
    return writer


# --------------------------------------------------------------------------- ShardWriter + index


def test_shard_writer_offsets_point_at_exact_bytes(tmp_path):
    samples = payloads(40)
    writer = write_dataset(tmp_path, samples, max_bytes=2**20)
    assert writer.total_samples == 40
    assert writer.paths == [tmp_path / "train-000000.tar"]
    tar = writer.paths[0]
    index = read_index(tar.with_suffix(".idx"))
    assert [s.key for s in index] == list(samples)
    fd = os.open(tar, os.O_RDONLY)
    try:
        for sample in index:
            written = samples[sample.key]
            assert set(sample.components) == set(written)
            for ext, comp in sample.components.items():
                assert comp.name == f"{sample.key}.{ext}"
                assert comp.size == len(written[ext])
                assert comp.offset % 512 == 0
                assert os.pread(fd, comp.size, comp.offset) == written[ext]
    finally:
        os.close(fd)
    # a standard tar reader sees the same members
    with tarfile.open(tar) as tf:
        names = tf.getnames()
        assert tf.extractfile("s00003.jpg").read() == samples["s00003"]["jpg"]
    assert len(names) == sum(len(c) for c in samples.values())


def test_index_file_is_byte_identical_to_wds2idx(tmp_path):
    samples = payloads(25, seed=1)
    writer = write_dataset(tmp_path / "shards", samples, max_bytes=20_000)
    assert len(writer.paths) > 1
    for tar in writer.paths:
        ours = tar.with_suffix(".idx").read_bytes()
        theirs = dali_index(tar, tmp_path / f"{tar.stem}.dali.idx")
        assert ours == theirs


def test_shard_writer_is_deterministic(tmp_path):
    samples = payloads(10, seed=2)
    a = write_dataset(tmp_path / "a", samples, max_bytes=8000)
    b = write_dataset(tmp_path / "b", samples, max_bytes=8000)
    assert [p.name for p in a.paths] == [p.name for p in b.paths]
    for pa, pb in zip(a.paths, b.paths):
        assert pa.read_bytes() == pb.read_bytes()
        assert pa.with_suffix(".idx").read_bytes() == pb.with_suffix(".idx").read_bytes()


def test_shard_rollover_preserves_samples(tmp_path):
    samples = {f"k{i:03d}": {"bin": bytes([i % 256]) * 1000, "cls": b"1"} for i in range(30)}
    max_bytes = 3500
    writer = write_dataset(tmp_path, samples, max_bytes=max_bytes)
    assert len(writer.paths) >= 5
    assert [p.name for p in writer.paths] == [f"train-{n:06d}.tar" for n in range(len(writer.paths))]
    assert writer.total_samples == 30
    keys = []
    for tar in writer.paths:
        index = read_index(tar.with_suffix(".idx"))
        assert len(index) >= 1
        payload = sum(c.size for s in index for c in s.components.values())
        if len(index) > 1:
            assert payload <= max_bytes
        with open(tar, "rb") as fh:
            data = fh.read()
        for s in index:
            c = s.components["bin"]
            assert data[c.offset:c.offset + c.size] == samples[s.key]["bin"]
        keys += [s.key for s in index]
    assert keys == list(samples)
    shards = list_shards(tmp_path)
    assert sum(s.num_samples for s in shards) == 30


def test_shard_rollover_max_samples(tmp_path):
    samples = payloads(23, seed=3)
    writer = write_dataset(tmp_path, samples, max_bytes=2**30, max_samples=5)
    counts = [len(read_index(p.with_suffix(".idx"))) for p in writer.paths]
    assert counts == [5, 5, 5, 5, 3]


def test_shard_writer_duplicate_and_bad_keys(tmp_path):
    with ShardWriter(tmp_path, "x") as writer:
        writer.write("a", {"cls": b"0"})
        with pytest.raises(ValueError, match="duplicate sample key 'a'"):
            writer.write("a", {"cls": b"1"})
        for bad in ("", "a.b", "a/b", "a b"):
            with pytest.raises(ValueError, match="must be non-empty"):
                writer.write(bad, {"cls": b"0"})
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        ShardWriter(tmp_path, "y", max_bytes=0)


def test_shard_writer_rejects_sample_without_components(tmp_path):
    with ShardWriter(tmp_path, "t") as writer:
        writer.write("a", {"cls": b"1"})
        with pytest.raises(ValueError, match="has no components"):
            writer.write("b", {})
        writer.write("c", {"cls": b"2"})
    assert [s.key for s in read_index(tmp_path / "t-000000.idx")] == ["a", "c"]


@pytest.mark.parametrize("ext", ["", "my ext"])
def test_shard_writer_rejects_bad_extension(tmp_path, ext):
    with ShardWriter(tmp_path, "t") as writer:
        with pytest.raises(ValueError, match="extension"):
            writer.write("a", {"cls": b"1", ext: b"x"})
        writer.write("b", {"cls": b"2"})
    assert [s.key for s in read_index(tmp_path / "t-000000.idx")] == ["b"]


# --------------------------------------------------------------------------- listing


def test_list_shards_builds_missing_index(tmp_path):
    samples = payloads(12, seed=4)
    writer = write_dataset(tmp_path, samples, max_bytes=10_000)
    originals = {p: p.with_suffix(".idx").read_bytes() for p in writer.paths}
    for p in writer.paths:
        p.with_suffix(".idx").unlink()
    shards = list_shards(tmp_path)
    assert [s.path for s in shards] == [str(p) for p in writer.paths]
    for s in shards:
        tar = Path(s.path)
        assert s.index_path == str(tar.with_suffix(".idx"))
        assert Path(s.index_path).read_bytes() == originals[tar]
        assert s.num_samples == len(read_index(s.index_path))
    assert sum(s.num_samples for s in shards) == 12


def test_index_tar_on_foreign_tar_matches_wds2idx(tmp_path):
    """A tar written by another tool (default format, directory entries, sub-folders)."""
    tar_path = tmp_path / "foreign.tar"
    written = {}
    with tarfile.open(tar_path, "w") as tf:
        d = tarfile.TarInfo("sub")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for i in range(6):
            for ext, data in (("jpg", os.urandom(100 + 37 * i)), ("cls", str(i).encode())):
                name = f"sub/sample{i}.{ext}"
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                written[name] = data
    ours = tmp_path / "ours.idx"
    assert index_tar(tar_path, ours) == 6
    assert ours.read_bytes() == dali_index(tar_path, tmp_path / "dali.idx")
    with open(tar_path, "rb") as fh:
        raw = fh.read()
    for sample in read_index(ours):
        assert sample.key.startswith("sub/sample")
        for comp in sample.components.values():
            assert raw[comp.offset:comp.offset + comp.size] == written[comp.name]


def test_index_tar_on_broken_tar(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(DataError) as exc:
        index_tar(bad, tmp_path / "bad.idx")
    assert str(bad) in str(exc.value)


def test_list_shards_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as exc:
        list_shards(missing)
    assert str(missing) in str(exc.value)
    assert "does not exist" in str(exc.value)


def test_list_shards_directory_without_shards(tmp_path):
    (tmp_path / "readme.txt").write_text("no shards here")
    with pytest.raises(DataError) as exc:
        list_shards(tmp_path)
    assert str(tmp_path) in str(exc.value)
    assert "no *.tar shards" in str(exc.value)


def test_dataset_keys_and_duplicates(tmp_path):
    a = write_dataset(tmp_path, {f"k{i}": {"cls": b"0"} for i in range(4)}, max_bytes=2**20)
    keys = dataset_keys(list_shards(tmp_path))
    assert keys == {f"k{i}": str(a.paths[0]) for i in range(4)}
    with ShardWriter(tmp_path, "zz") as other:
        other.write("fresh", {"cls": b"1"})
        other.write("k2", {"cls": b"1"})
    with pytest.raises(DataError) as exc:  # the listing finds it (raise: the default policy)
        list_shards(tmp_path)
    msg = str(exc.value)
    assert str(a.paths[0]) in msg and str(other.paths[0]) in msg
    assert "'k2'" in msg and "duplicate" in msg
    assert exc.value.key == "k2"
    policy = BadSamplePolicy("skip")  # skip: the later copy is quarantined and never read
    shards = list_shards(tmp_path, policy)
    assert [(r.shard, r.key) for r in policy.records] == [(str(other.paths[0]), "k2")]
    assert [s.skip_rows for s in shards] == [(), (1,)]
    assert dataset_keys(shards) == {**keys, "fresh": str(other.paths[0])}


# --------------------------------------------------------------------------- assignment


@pytest.mark.parametrize("readers", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("seed", [0, 7])
def test_assign_shards_disjoint_covering_balanced(readers, seed):
    r = np.random.default_rng(seed)
    counts = [int(c) for c in r.integers(1, 500, size=23)]
    for epoch in range(4):
        parts = assign_shards(counts, readers, seed, epoch)
        assert len(parts) == readers
        flat = [s for part in parts for s in part]
        assert sorted(flat) == list(range(len(counts)))
        loads = [sum(counts[s] for s in part) for part in parts]
        assert max(loads) - min(loads) <= max(counts)
        assert assign_shards(counts, readers, seed, epoch) == parts


def test_assign_shards_varies_by_epoch_and_seed():
    counts = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110]
    e0 = assign_shards(counts, 3, seed=5, epoch=0)
    e1 = assign_shards(counts, 3, seed=5, epoch=1)
    assert e0 != e1
    assert assign_shards(counts, 3, seed=6, epoch=0) != e0


def test_assign_shards_more_readers_than_shards():
    parts = assign_shards([5, 5], 4, seed=0, epoch=0)
    assert sorted(len(p) for p in parts) == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="num_readers must be >= 1"):
        assign_shards([1], 0, seed=0, epoch=0)


# --------------------------------------------------------------------------- WebDatasetSource


@pytest.fixture
def dataset(tmp_path):
    samples = payloads(47, seed=9, size_range=(10, 200))
    write_dataset(tmp_path / "ds", samples, max_bytes=2**20, max_samples=6)
    shards = list_shards(tmp_path / "ds")
    assert len(shards) == 8
    return samples, shards


def epoch_keys(src: WebDatasetSource) -> list[str]:
    return [src.read(s, r).key for s, r in src.take(10**6)]


@pytest.mark.parametrize("readers", [1, 2, 3])
def test_source_one_epoch_reads_every_key_once(dataset, readers):
    samples, shards = dataset
    seen = Counter()
    for reader in range(readers):
        src = WebDatasetSource(shards, reader, readers, seed=3, shuffle_window=2)
        n = len(src)
        rows = src.take(10**6)
        assert len(rows) == n and src.remaining == 0
        assert src.take(5) == []
        for s, r in rows:
            got = src.read(s, r)
            assert got.shard == shards[s].path
            assert got.components == samples[got.key]
            seen[got.key] += 1
        src.close()
    assert seen == Counter(samples.keys())


@pytest.mark.parametrize("readers", [1, 2, 3])
def test_source_order_seeded_per_epoch(dataset, readers):
    _, shards = dataset
    for reader in range(readers):
        a = WebDatasetSource(shards, reader, readers, seed=11, shuffle_window=3)
        b = WebDatasetSource(shards, reader, readers, seed=11, shuffle_window=3)
        order_a = a.take(10**6)
        assert order_a == b.take(10**6)
        a.set_epoch(1)
        order_a1 = a.take(10**6)
        assert order_a1 != order_a
        if readers == 1:
            assert sorted(order_a1) == sorted(order_a)  # same rows, new order
        b.set_epoch(1)
        assert b.take(10**6) == order_a1
    # the whole-data order also changes when only the seed changes
    c = WebDatasetSource(shards, 0, 1, seed=12, shuffle_window=3)
    d = WebDatasetSource(shards, 0, 1, seed=11, shuffle_window=3)
    assert c.take(10**6) != d.take(10**6)


def test_source_shuffles_within_windows(dataset):
    """Rows are not simply in index order, and every row of a window lies within that window's shards."""
    _, shards = dataset
    src = WebDatasetSource(shards, 0, 1, seed=0, shuffle_window=2)
    rows = src.take(10**6)
    assert rows != sorted(rows)
    mine = assign_shards([s.num_samples for s in shards], 1, 0, 0)[0]
    pos = 0
    for start in range(0, len(mine), 2):
        group = mine[start:start + 2]
        n = sum(shards[s].num_samples for s in group)
        assert {s for s, _ in rows[pos:pos + n]} == set(group)
        pos += n


@pytest.mark.parametrize("epoch,cut", [(0, 13), (2, 1), (1, 0)])
def test_source_state_dict_resume(dataset, epoch, cut):
    samples, shards = dataset
    src = WebDatasetSource(shards, 1, 2, seed=4)
    src.set_epoch(epoch)
    head = src.take(cut)
    state = src.state_dict()
    assert state == {"epoch": epoch, "position": cut}
    rest = src.take(10**6)
    resumed = WebDatasetSource(shards, 1, 2, seed=4)
    resumed.load_state_dict(state)
    assert resumed.remaining == len(rest)
    assert resumed.take(10**6) == rest
    assert len(head) + len(rest) == len(src)
    assert [resumed.read(s, r).key for s, r in rest] == [src.read(s, r).key for s, r in rest]


def test_source_truncated_component_raises(dataset):
    _, shards = dataset
    last = shards[-1]
    index = read_index(last.index_path)
    sample = index[-1]
    comp = max(sample.components.values(), key=lambda c: c.offset)
    assert comp.size > 2
    os.truncate(last.path, comp.offset + comp.size // 2)
    src = WebDatasetSource(shards, 0, 1, seed=0)
    # the intact samples of that shard still read
    assert src.read(len(shards) - 1, 0).key == index[0].key
    with pytest.raises(DataError) as exc:
        src.read(len(shards) - 1, len(index) - 1)
    err = exc.value
    msg = str(err)
    assert last.path in msg
    assert repr(sample.key) in msg
    assert f"offset {comp.offset}" in msg
    assert f"({comp.size // 2} of {comp.size} bytes)" in msg
    assert (err.shard, err.key, err.offset) == (last.path, sample.key, comp.offset)
    src.close()


def test_source_bad_reader():
    with pytest.raises(ValueError, match="reader 3 out of range for 3 readers"):
        WebDatasetSource([], 3, 3)


# --------------------------------------------------------------------------- demo sets


def test_demo_digits(tmp_path):
    writer = build_demo("digits", tmp_path)
    assert writer.total_samples == 1797
    shards = list_shards(tmp_path)
    assert sum(s.num_samples for s in shards) == 1797
    labels = Counter()
    for i, shard in enumerate(shards):
        src = WebDatasetSource(shards, 0, 1)
        for row in range(shard.num_samples):
            sample = src.read(i, row)
            assert set(sample.components) == {"jpg", "cls"}
            assert sample.components["jpg"][:2] == b"\xff\xd8"
            assert sample.components["jpg"][-2:] == b"\xff\xd9"
            labels[int(sample.components["cls"])] += 1
        src.close()
    assert sorted(labels) == list(range(10))
    assert sum(labels.values()) == 1797
    classes = json.loads((tmp_path / "classes.json").read_text())
    assert classes == {"num_classes": 10, "classes": [str(d) for d in range(10)]}
    first = read_index(shards[0].index_path)[0]
    with open(shards[0].path, "rb") as fh:
        fh.seek(first.components["jpg"].offset)
        im = Image.open(io.BytesIO(fh.read(first.components["jpg"].size)))
        assert im.size == (32, 32) and im.mode == "L"


def test_demo_photos(tmp_path):
    writer = build_demo("photos", tmp_path, num_samples=24)
    assert writer.total_samples == 24
    shards = list_shards(tmp_path)
    src = WebDatasetSource(shards, 0, 1)
    n = 0
    for s, r in src.take(10**6):
        sample = src.read(s, r)
        data = sample.components["jpg"]
        assert data[:2] == b"\xff\xd8"
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "JPEG"
            assert im.size in ((500, 375), (375, 500))
        n += 1
    assert n == 24
    classes = json.loads((tmp_path / "classes.json").read_text())
    assert classes["num_classes"] == len(classes["classes"]) >= 2


def test_build_demo_unknown(tmp_path):
    with pytest.raises(ValueError, match="digits, photos"):
        build_demo("cifar", tmp_path)


# --------------------------------------------------------------------------- image folder


def test_shards_from_folder(tmp_path):
    root = tmp_path / "images"
    r = np.random.default_rng(0)
    # class names deliberately not in creation order
    layout = {"zebra": [("a.png", "PNG"), ("b.jpg", "JPEG")],
              "ant": [("c.jpeg", "JPEG"), ("d.png", "PNG"), ("notes.txt", None)]}
    originals = {}
    for cls, files in layout.items():
        (root / cls).mkdir(parents=True)
        for name, fmt in files:
            path = root / cls / name
            if fmt is None:
                path.write_text("not an image")
                continue
            arr = r.integers(0, 256, (20, 30, 3), dtype=np.uint8)
            Image.fromarray(arr).save(path, format=fmt)
            originals[f"{cls}/{name}"] = path.read_bytes()
    out = tmp_path / "shards"
    writer = shards_from_folder(root, out)
    assert writer.total_samples == 4
    shards = list_shards(out)
    src = WebDatasetSource(shards, 0, 1)
    got = {}
    for s in range(len(shards)):
        for row in range(shards[s].num_samples):
            sample = src.read(s, row)
            got[sample.components["path"].decode()] = (sample.key, sample.components)
    assert set(got) == set(originals)
    expected_cls = {"ant": 0, "zebra": 1}
    for rel, (key, comps) in got.items():
        cls = rel.split("/")[0]
        assert comps["cls"] == str(expected_cls[cls]).encode()
        assert key.startswith(f"{expected_cls[cls]:04d}_")
        assert comps["jpg"][:2] == b"\xff\xd8"
        if rel.endswith((".jpg", ".jpeg")):
            assert comps["jpg"] == originals[rel]  # JPEG kept as is
        else:
            with Image.open(io.BytesIO(comps["jpg"])) as im:
                assert im.format == "JPEG" and im.size == (30, 20) and im.mode == "RGB"
    classes = json.loads((out / "classes.json").read_text())
    assert classes == {"num_classes": 2, "classes": ["ant", "zebra"]}

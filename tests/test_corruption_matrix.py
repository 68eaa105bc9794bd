"""The corruption matrix: every kind of bad input under ``on_error: raise`` and ``on_error: skip``.

Image cases start from real digit JPEG shards written with mixflow's ShardWriter and damage
one thing each; token cases damage Parquet token shards. ``raise`` must stop with a
:class:`DataError` naming the shard, the key (where one exists) and the reason; ``skip`` must
quarantine exactly the lost samples (plus one key-less record per unreadable shard region),
and every good sample must still arrive exactly once, with the pixels (or tokens) it has in
the undamaged data.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mixflow.config import DecodeSpec
from mixflow.data.bad_samples import BadSamplePolicy, SkipRecord
from mixflow.data.listing import list_shards
from mixflow.data.shard_writer import ShardWriter
from mixflow.data.tar_index import read_index
from mixflow.data.token_shard_writer import TokenShardWriter, read_manifest
from mixflow.data.token_source import TokenSource
from mixflow.decode.decode_stage import DecodeStage
from mixflow.errors import DataError, PipelineError
from tests.conftest import make_spec

PER_SHARD = 8
NUM_SHARDS = 6
# Full-image windows, no flip: a key's pixels do not depend on which batch it lands in.
WHOLE = DecodeSpec(size=(32, 32), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0)


def digit_samples() -> dict[str, dict[str, bytes]]:
    """The first 48 of scikit-learn's digits as 32x32 JPEGs (as the ``digits`` demo set writes them)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = {}
    for i in range(PER_SHARD * NUM_SHARDS):
        pixels = np.clip(digits.images[i] * (255.0 / 16.0), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="L").resize((32, 32), Image.BICUBIC).save(buf, format="JPEG", quality=95)
        out[f"digit{i:05d}"] = {"jpg": buf.getvalue(), "cls": str(int(digits.target[i])).encode()}
    return out


def shard_path(directory: Path, n: int) -> Path:
    return directory / f"digits-{n:06d}.tar"


def keys_of(n: int) -> list[str]:
    return [f"digit{i:05d}" for i in range(n * PER_SHARD, (n + 1) * PER_SHARD)]


def shard_samples(directory: Path, n: int) -> dict[str, dict[str, bytes]]:
    """Shard ``n``'s samples as written: key -> {ext: bytes}."""
    tar = shard_path(directory, n)
    data = tar.read_bytes()
    return {s.key: {ext: data[c.offset:c.offset + c.size] for ext, c in s.components.items()}
            for s in read_index(tar.with_suffix(".idx"))}


def rewrite_shard(directory: Path, n: int, edit: Callable[[str, dict[str, bytes]], dict[str, bytes]]) -> None:
    """Write shard ``n`` again with ShardWriter, each sample's current components passed through ``edit``."""
    current = shard_samples(directory, n)
    scratch = directory / "scratch"
    with ShardWriter(scratch, "one") as writer:
        for key, comps in current.items():
            writer.write(key, edit(key, comps))
    shutil.move(scratch / "one-000000.tar", shard_path(directory, n))
    shutil.move(scratch / "one-000000.idx", shard_path(directory, n).with_suffix(".idx"))
    scratch.rmdir()


def header_only_jpeg(jpeg: bytes) -> bytes:
    """SOI, tables and the frame header (so the header check passes) but no scan: DALI cannot decode it."""
    return jpeg[:jpeg.index(b"\xff\xda")] + b"\xff\xd9"


@dataclass(frozen=True)
class Want:
    """One expected quarantine record: shard file name, key (None: a shard-wide record), the start of the
    reason, the epoch (None: found by the listing) and the byte offset (None: not checked)."""

    shard: str
    key: str | None
    reason: str
    epoch: int | None = 0
    offset: int | None = None


@dataclass
class Expect:
    """What a case must produce: ``records`` under ``skip``; ``lost``, the keys that cannot arrive;
    ``raised``, (shard file, key or None, message parts) under ``raise``; ``at_listing``, whether
    ``raise`` stops the listing (before anything is decoded) or the stream."""

    records: list[Want]
    lost: set[str]
    raised: tuple[str, str | None, tuple[str, ...]] | None  # None: a good input, ``raise`` runs through
    at_listing: bool = False
    changed: dict[str, tuple[int, np.ndarray, float]] = field(default_factory=dict)  # key -> (label, image, tol)


def edit_one(key: str, change: Callable[[dict[str, bytes]], dict[str, bytes]]):
    return lambda k, comps: change(comps) if k == key else comps


def _payload_case(d: Path, n: int, row: int, change, reason: str) -> Expect:
    key = keys_of(n)[row]
    rewrite_shard(d, n, edit_one(key, change))
    name = shard_path(d, n).name
    return Expect([Want(name, key, reason)], {key}, (name, key, (reason,)))


def case_truncated_jpeg(d: Path) -> Expect:
    return _payload_case(d, 1, 2, lambda c: {**c, "jpg": c["jpg"][:len(c["jpg"]) // 2]},
                         "truncated JPEG (no EOI marker at the end)")


def case_not_an_image(d: Path) -> Expect:
    return _payload_case(d, 2, 5, lambda c: {**c, "jpg": b"<html>not an image</html>\n" * 8},
                         "not a JPEG (no SOI marker)")


def case_dali_rejects(d: Path) -> Expect:
    return _payload_case(d, 2, 3, lambda c: {**c, "jpg": header_only_jpeg(c["jpg"])},
                         "DALI could not decode the image: ")


def case_missing_cls(d: Path) -> Expect:
    return _payload_case(d, 3, 0, lambda c: {"jpg": c["jpg"]},
                         "missing label component (.cls); has ['jpg']")


def case_label_out_of_range(d: Path) -> Expect:
    return _payload_case(d, 3, 6, lambda c: {**c, "cls": b"99"},
                         "label 99 outside 0..9 (data.num_classes=10)")


def _truncate_tar(d: Path, drop_index: bool) -> Expect:
    """Cut shard 4 inside the JPEG data of its 5th sample (optionally losing its index too)."""
    tar = shard_path(d, 4)
    index = read_index(tar.with_suffix(".idx"))
    keys = [s.key for s in index]
    jpg = index[4].components["jpg"]
    cut = jpg.offset + jpg.size // 2
    os.truncate(tar, cut)
    if drop_index:
        tar.with_suffix(".idx").unlink()
    region = f"tar is truncated: it ends at byte {cut} without the end-of-archive marker"
    records = [Want(tar.name, None, region, None, cut),
               Want(tar.name, keys[4], f"component .jpg is truncated ({jpg.size // 2} of {jpg.size} bytes)",
                    offset=jpg.offset)]
    if drop_index:  # the members after the cut are unknown: the region record speaks for them
        named = f"1 indexed sample(s) lie past the end ('{keys[4]}')"
        missing = (f"at least {jpg.offset + jpg.size - cut} bytes are missing",
                   "the keys of any members after the cut are unknown")
    else:
        named = "4 indexed sample(s) lie past the end (" + ", ".join(repr(k) for k in keys[4:]) + ")"
        end = max(c.offset + c.size for c in index[-1].components.values())
        missing = (f"{end - cut} bytes of indexed data are missing",)
        records += [Want(tar.name, s.key, "component .cls is truncated (0 of 1 bytes)",
                         offset=s.components["cls"].offset) for s in index[5:]]
    return Expect(records, set(keys[4:]), (tar.name, None, (region, named, *missing, f"offset {cut}")),
                  at_listing=True)


def case_truncated_tar(d: Path) -> Expect:
    return _truncate_tar(d, drop_index=False)


def case_truncated_tar_without_index(d: Path) -> Expect:
    return _truncate_tar(d, drop_index=True)


def _extra_shard(d: Path, data: bytes, reason: str) -> Expect:
    extra = shard_path(d, NUM_SHARDS)
    extra.write_bytes(data)
    return Expect([Want(extra.name, None, reason, None)], set(), (extra.name, None, (reason,)), at_listing=True)


def case_empty_file(d: Path) -> Expect:
    return _extra_shard(d, b"", "shard is empty (0 bytes)")


def case_empty_tar(d: Path) -> Expect:
    buf = io.BytesIO()
    tarfile.open(fileobj=buf, mode="w").close()
    return _extra_shard(d, buf.getvalue(), "shard holds no samples (index digits-000006.idx lists none)")


def case_not_a_tar(d: Path) -> Expect:
    return _extra_shard(d, np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
                        "not a readable tar: ")


def case_missing_shard(d: Path) -> Expect:
    tar = shard_path(d, 5)
    tar.unlink()  # the index stays: the listing knows what the shard held
    reason = "shard file is missing (its index digits-000005.idx lists 8 samples)"
    return Expect([Want(tar.name, key, reason, None) for key in keys_of(5)], set(keys_of(5)),
                  (tar.name, keys_of(5)[0], (reason,)), at_listing=True)


def case_zero_byte_image(d: Path) -> Expect:
    return _payload_case(d, 0, 3, lambda c: {**c, "jpg": b""}, "image component is empty (0 bytes)")


def case_random_bytes(d: Path) -> Expect:
    noise = np.random.default_rng(11).integers(0, 256, 700, dtype=np.uint8).tobytes()
    return _payload_case(d, 0, 7, lambda c: {**c, "jpg": noise}, "not a JPEG (no SOI marker)")


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def case_png_named_jpg(d: Path) -> Expect:
    png = png_bytes(np.full((32, 32), 128, np.uint8))
    return _payload_case(d, 0, 6, lambda c: {**c, "jpg": png}, "not a JPEG (no SOI marker); the data is a PNG image")


def case_png_16bit(d: Path) -> Expect:
    png = png_bytes(np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60)  # mode I;16
    return _payload_case(d, 1, 6, lambda c: {"png": png, "cls": c["cls"]},
                         "missing image component (.jpg); has ['cls', 'png']")


def case_non_integer_label(d: Path) -> Expect:
    return _payload_case(d, 4, 1, lambda c: {**c, "cls": b"seven\n"}, "label 'seven' is not an integer")


def case_huge_header(d: Path) -> Expect:
    """An 80x60 JPEG whose frame header claims 20000x20000: refused from the header, never decoded."""
    buf = io.BytesIO()
    Image.fromarray(np.full((60, 80), 90, np.uint8)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (20000).to_bytes(2, "big") * 2
    return _payload_case(d, 2, 0, lambda c: {**c, "jpg": bytes(data)},
                         "image too large: the header announces 20000x20000 = 400000000 pixels, "
                         "over decode.max_pixels=89478485")


def case_uppercase_extensions(d: Path) -> Expect:
    """``.JPG`` / ``.CLS`` are ``.jpg`` / ``.cls`` (case-insensitive, as DALI's reader): a good sample."""
    key = keys_of(2)[7]
    rewrite_shard(d, 2, edit_one(key, lambda c: {"JPG": c["jpg"], "CLS": c["cls"]}))
    return Expect([], set(), None)


def case_dangling_symlink(d: Path) -> Expect:
    link = shard_path(d, NUM_SHARDS + 1)
    link.symlink_to(d / "gone" / "elsewhere.tar")
    reason = f"shard file is a dangling symlink (to {d / 'gone' / 'elsewhere.tar'}, which does not exist)"
    return Expect([Want(link.name, None, reason, None)], set(), (link.name, None, (reason,)), at_listing=True)


def case_adjacent_duplicate(d: Path) -> Expect:
    """Shard 3 rewritten by another tool (no index): a second copy of one sample (other pixels)
    follows it. The first copy arrives; the second is quarantined at listing."""
    n, row = 3, 3
    samples = shard_samples(d, n)
    key = keys_of(n)[row]
    other = samples[keys_of(n)[row + 1]]
    tar = shard_path(d, n)
    offset = None
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as out:
        for k, comps in samples.items():
            copies = [comps, other] if k == key else [comps]
            for i, copy in enumerate(copies):
                for ext in sorted(copy):
                    info = tarfile.TarInfo(f"{k}.{ext}")
                    info.size = len(copy[ext])
                    if i == 1 and offset is None:
                        offset = out.offset + tarfile.BLOCKSIZE
                    out.addfile(info, io.BytesIO(copy[ext]))
    tar.with_suffix(".idx").unlink()
    reason = "duplicate sample key: 2 more member(s) with this key follow the sample"
    return Expect([Want(tar.name, key, reason, None, offset)], set(), (tar.name, key, (reason, f"offset {offset}")),
                  at_listing=True)


def case_duplicate_across_shards(d: Path) -> Expect:
    """An extra shard holds another copy (other pixels and label) of a key of shard 2: the first
    copy (shard 2) arrives; the later one is quarantined at listing and never read."""
    key = keys_of(2)[1]
    other = shard_samples(d, 0)[keys_of(0)[0]]
    extra = shard_path(d, NUM_SHARDS + 2)
    with ShardWriter(d / "scratch", "one") as writer:
        writer.write(key, other)
    shutil.move(d / "scratch" / "one-000000.tar", extra)
    shutil.move(d / "scratch" / "one-000000.idx", extra.with_suffix(".idx"))
    (d / "scratch").rmdir()
    reason = f"duplicate sample key (also in {shard_path(d, 2)} at index row 2): the first copy is used"
    return Expect([Want(extra.name, key, reason, None)], set(), (extra.name, key, (reason,)), at_listing=True)


def garbage_scan(jpeg: bytes, seed: int = 5, no_ff: bool = False) -> bytes:
    """The JPEG's headers (valid) with random bytes for its entropy-coded data, then EOI; ``no_ff``:
    no 0xFF byte in the noise (nothing a marker check can see)."""
    sos = jpeg.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(jpeg[sos + 2:sos + 4], "big")
    noise = np.random.default_rng(seed).integers(0, 255 if no_ff else 256, len(jpeg) - start - 2, dtype=np.uint8)
    return jpeg[:start] + noise.tobytes() + b"\xff\xd9"


def case_garbage_entropy(d: Path) -> Expect:
    """Valid header, random scan data (DALI decodes it into noise without an error): an 0xFF in the
    noise followed by a byte no scan holds gives it away, checked on every payload."""
    return _payload_case(d, 4, 0, lambda c: {**c, "jpg": garbage_scan(c["jpg"])},
                         "corrupt JPEG data: 0xFF 0x")



def case_corrupt_index(d: Path) -> Expect:
    idx = shard_path(d, 1).with_suffix(".idx")
    lines = idx.read_text().splitlines()
    fields = lines[3].split()
    fields[1] = fields[1] + "x"
    lines[3] = " ".join(fields)
    idx.write_text("\n".join(lines) + "\n")
    reason = f"index file {idx} line 4: component 1 ({fields[3]!r}): offset {fields[1]!r}"
    return Expect([Want(idx.with_suffix(".tar").name, None, reason, None)], set(keys_of(1)),
                  (idx.with_suffix(".tar").name, None, (reason, "must be integers")), at_listing=True)


def photo(w: int, h: int) -> Image.Image:
    """A ``w`` x ``h`` RGB crop of scikit-learn's bundled china.jpg (real photo texture)."""
    from sklearn.datasets import load_sample_images

    return Image.fromarray(load_sample_images().images[0][100:100 + 4 * h:4, 200:200 + 4 * w:4])


def whole_window_reference(image: np.ndarray, size: int = 32) -> np.ndarray:
    """What WHOLE decodes ``image`` (as displayed, HWC) into: the centre square (scale 1, ratio 1
    falls back to the centre crop), bilinear to ``size`` x ``size`` (OpenCV, as the host resize)."""
    import cv2

    h, w = image.shape[:2]
    side = min(h, w)
    y, x = (h - side) // 2, (w - side) // 2
    return cv2.resize(np.ascontiguousarray(image[y:y + side, x:x + side]), (size, size),
                      interpolation=cv2.INTER_LINEAR)


def case_exif_rotated(d: Path) -> Expect:
    """Good samples: a 48x32 photo stored with EXIF orientation 6 (shown rotated, 32x48) and one with
    orientation 8; they arrive once, rotated as PIL's ``exif_transpose`` shows them."""
    from PIL import ImageOps

    changed = {}
    for key, orientation in ((keys_of(0)[1], 6), (keys_of(1)[4], 8)):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        photo(48, 32).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
        shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).convert("RGB"))
        assert shown.shape == (48, 32, 3)
        n = int(key[5:]) // PER_SHARD
        rewrite_shard(d, n, edit_one(key, lambda c, data=buf.getvalue(): {**c, "jpg": data}))
        label = int(shard_samples(d, n)[key]["cls"])
        changed[key] = (label, whole_window_reference(shown), 1.0)
    return Expect([], set(), None, changed=changed)


IMAGE_CASES = {
    "truncated_jpeg": case_truncated_jpeg,
    "not_an_image": case_not_an_image,
    "dali_rejects": case_dali_rejects,
    "missing_cls": case_missing_cls,
    "label_out_of_range": case_label_out_of_range,
    "truncated_tar": case_truncated_tar,
    "truncated_tar_without_index": case_truncated_tar_without_index,
    "empty_file": case_empty_file,
    "empty_tar": case_empty_tar,
    "not_a_tar": case_not_a_tar,
    "missing_shard": case_missing_shard,
    "exif_rotated": case_exif_rotated,
    "zero_byte_image": case_zero_byte_image,
    "random_bytes": case_random_bytes,
    "png_named_jpg": case_png_named_jpg,
    "png_16bit": case_png_16bit,
    "non_integer_label": case_non_integer_label,
    "huge_header": case_huge_header,
    "uppercase_extensions": case_uppercase_extensions,
    "dangling_symlink": case_dangling_symlink,
    "adjacent_duplicate": case_adjacent_duplicate,
    "corrupt_index": case_corrupt_index,
    "duplicate_across_shards": case_duplicate_across_shards,
    "garbage_entropy": case_garbage_entropy,
}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The undamaged shards, their samples, and every key's decoded pixels."""
    samples = digit_samples()
    directory = tmp_path_factory.mktemp("clean")
    with ShardWriter(directory, "digits", max_samples=PER_SHARD) as writer:
        for key, comps in samples.items():
            writer.write(key, comps)
    assert [p.name for p in writer.paths] == [shard_path(directory, n).name for n in range(NUM_SHARDS)]
    delivered, records = run_stage(directory, "raise")
    assert records == [] and sorted(delivered) == sorted(samples)
    return directory, samples, delivered


def damaged_copy(clean, tmp_path: Path, *cases: str) -> tuple[Path, list[Expect]]:
    copy = tmp_path / "shards"
    shutil.copytree(clean[0], copy)
    return copy, [IMAGE_CASES[c](copy) for c in cases]


def run_stage(directory: Path, on_error: str, batch_size: int = 16, spec: DecodeSpec = WHOLE):
    """List and decode one epoch with one reader: ``({key: (label, image)}, records)``."""
    listing = BadSamplePolicy(on_error)
    shards = list_shards(directory, listing)
    stage = DecodeStage(shards, 0, 1, spec, batch_size, num_classes=10, seed=3, on_error=on_error)
    delivered: dict[str, tuple[int, np.ndarray]] = {}
    records = listing.drain()
    while (batch := stage.next_batch()) is not None:
        records += batch_records(stage, batch)
        for key, label, image in zip(batch["keys"], batch["labels"], batch["images"]):
            assert key not in delivered, f"{key} delivered twice"
            delivered[key] = (int(label), image)
    stage.source.close()
    return delivered, records + stage.policy.drain()


def batch_records(stage: DecodeStage, batch: dict) -> list:
    """The quarantine records that came with ``batch`` (or are still held by the stage's policy)."""
    return list(batch.get("skipped", [])) + stage.policy.drain()


def assert_records(records, expects: list[Expect], directory: Path) -> None:
    """Exactly the expected records, one per (shard, key), each with its reason, epoch and offset."""
    order = lambda r: (r.shard, r.key or "")  # noqa: E731
    got = sorted(records, key=order)
    want = sorted((Want(str(directory / w.shard), w.key, w.reason, w.epoch, w.offset)
                   for e in expects for w in e.records), key=order)
    assert [(r.shard, r.key) for r in got] == [(w.shard, w.key) for w in want]
    for r, w in zip(got, want):
        assert r.reason.startswith(w.reason), (r.key, r.reason, w.reason)
        assert r.epoch == w.epoch, (r.key, r.epoch)
        if w.offset is not None:
            assert r.offset == w.offset, (r.key, r.offset)


def assert_good_arrive(delivered: dict, clean, expects: list[Expect]) -> None:
    """Every sample not lost arrives once (a dict: once), with the clean label and identical pixels."""
    _, samples, reference = clean
    lost = set().union(*(e.lost for e in expects))
    changed = {k: v for e in expects for k, v in e.changed.items()}
    assert sorted(delivered) == sorted(set(samples) - lost)
    for key, (label, image) in delivered.items():
        if key in changed:  # replaced by the case: its own reference, within a decoder tolerance
            ref_label, ref_image, tol = changed[key]
            assert label == ref_label and image.shape == ref_image.shape, key
            diff = np.abs(image.astype(np.int16) - ref_image.astype(np.int16))
            assert diff.mean() <= tol, (key, diff.mean())
            continue
        ref_label, ref_image = reference[key]
        assert label == ref_label
        np.testing.assert_array_equal(image, ref_image, err_msg=key)


# --------------------------------------------------------------------------- image cases, source/stage level


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_image_case_skip_quarantines_and_keeps_every_good_sample(clean, tmp_path, case):
    directory, expects = damaged_copy(clean, tmp_path, case)
    delivered, records = run_stage(directory, "skip")
    assert_records(records, expects, directory)
    assert_good_arrive(delivered, clean, expects)


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_image_case_raise_names_shard_key_and_reason(clean, tmp_path, case):
    directory, (expect,) = damaged_copy(clean, tmp_path, case)
    if expect.raised is None:  # a good input: raise runs through and delivers everything
        delivered, records = run_stage(directory, "raise")
        assert records == []
        assert_good_arrive(delivered, clean, [expect])
        return
    shard, key, parts = expect.raised
    if expect.at_listing:
        with pytest.raises(DataError) as err:
            list_shards(directory, BadSamplePolicy("raise"))
    else:
        with pytest.raises(DataError) as err:
            run_stage(directory, "raise")
    msg = str(err.value)
    assert err.value.shard == str(directory / shard)
    assert err.value.key == key
    assert msg.startswith(f"shard {directory / shard}" + (f", key {key!r}" if key else ""))
    for part in parts:
        assert part in msg
    if not expect.at_listing:  # raised from the stream: listing alone is fine
        assert len(list_shards(directory)) == NUM_SHARDS


def test_dali_failure_spares_its_batch_neighbours(clean, tmp_path):
    """The header-only JPEG passes the header check, so DALI fails on its whole batch; the stage
    rebuilds DALI and decodes the batch sample by sample: the other 15 arrive with exact pixels."""
    directory, expects = damaged_copy(clean, tmp_path, "dali_rejects")
    listing = BadSamplePolicy("skip")
    stage = DecodeStage(list_shards(directory, listing), 0, 1, WHOLE, 16, num_classes=10, seed=3, on_error="skip")
    (bad,) = expects[0].lost
    reference = clean[2]
    seen: list[str] = []
    while (batch := stage.next_batch()) is not None:
        seen += batch["keys"]
        if records := batch_records(stage, batch):
            break
    assert [r.key for r in records] == [bad]
    assert len(batch["keys"]) == 15 and bad not in batch["keys"]
    for key, image in zip(batch["keys"], batch["images"]):
        np.testing.assert_array_equal(image, reference[key][1], err_msg=key)
    # the rebuilt pipeline decodes the rest of the epoch
    while (batch := stage.next_batch()) is not None:
        seen += batch["keys"]
        assert batch_records(stage, batch) == []
    assert sorted(seen) == sorted(set(reference) - {bad})


def test_an_all_bad_last_batch_is_still_quarantined(clean, tmp_path):
    """The last 16 samples of the reader's epoch (one whole batch) are all bad: their records must
    still come out although no batch is left to carry them, and the other 32 arrive."""
    directory = tmp_path / "shards"
    shutil.copytree(clean[0], directory)
    probe = DecodeStage(list_shards(directory), 0, 1, WHOLE, 16, num_classes=10, seed=3)
    order = [probe.source.read(shard, row).key for shard, row in probe.source.take(10**6)]
    probe.source.close()
    tail = set(order[-16:])
    for n in range(NUM_SHARDS):
        rewrite_shard(directory, n, lambda k, c: {**c, "cls": b"12"} if k in tail else c)
    delivered, records = run_stage(directory, "skip")
    assert sorted(r.key for r in records) == sorted(tail)
    assert {r.reason for r in records} == {"label 12 outside 0..9 (data.num_classes=10)"}
    assert sorted(delivered) == sorted(order[:-16])


# --------------------------------------------------------------------------- image cases, Ray pipeline


# Each damages its own shard rows (non_integer_label and garbage_entropy before truncated_tar, which
# cuts the same shard; adjacent_duplicate after the other shard-3 cases, which it keeps); corrupt_index
# drops shard 1 (stage level only).
ALL_STREAM_AND_SHARD_CASES = ("truncated_jpeg", "not_an_image", "dali_rejects", "missing_cls", "label_out_of_range",
                              "non_integer_label", "garbage_entropy", "truncated_tar", "empty_file", "missing_shard",
                              "exif_rotated", "zero_byte_image", "random_bytes", "png_named_jpg", "png_16bit",
                              "huge_header", "uppercase_extensions", "dangling_symlink", "adjacent_duplicate",
                              "duplicate_across_shards")


def test_pipeline_skip_quarantines_every_case_and_delivers_the_rest(ray_session, clean, tmp_path):
    from mixflow.runtime.image_pipeline import ImagePipeline

    directory, expects = damaged_copy(clean, tmp_path, *ALL_STREAM_AND_SHARD_CASES)
    spec = make_spec(directory, tmp_path, on_error="skip", decode={"size": [32, 32], "scale": [1.0, 1.0]},
                     mix={"method": "none"}, trainer={"batch_size": 8})
    pipe = ImagePipeline(spec, show_progress=False, record_digests=True)
    summary = pipe.run()
    lines = [json.loads(line) for line in (tmp_path / "run" / "quarantine.jsonl").read_text().splitlines()]
    records = [SkipRecord(**rec) for rec in lines]
    assert_records(records, expects, directory)
    assert summary.skipped == len(lines) == sum(len(e.records) for e in expects)
    assert summary.shard_wide == sum(w.key is None for e in expects for w in e.records) > 0
    (ledger,) = summary.ledgers
    lost = set().union(*(e.lost for e in expects))
    assert ledger.exactly_once, ledger.describe()
    assert sorted(ledger.skipped) == sorted(lost)
    assert ledger.delivered == ledger.expected == len(clean[1]) - len(lost)
    delivered = [k for digests in pipe.digests.values() for step in digests for k in step[1]]
    assert sorted(delivered) == sorted(set(clean[1]) - lost)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["skipped"] == len(lines) and saved["shard_wide"] == summary.shard_wide


# Under raise, the stream cases stop the 2-rank pipeline from inside a mixer (the fused reader; for
# missing_cls, two decoder actors per rank, so the mixer re-raises its reader's error): one case per
# kind of check (header, component, pixel limit, DALI failure); every stream case raises the same
# DataError at stage level above, and the Ray task errors are unwrapped alike.
PIPELINE_RAISE_CASES = ("truncated_jpeg", "png_16bit", "missing_cls", "huge_header", "dali_rejects")


@pytest.mark.timeout(300)  # stops with the error, never hangs
@pytest.mark.parametrize("case", PIPELINE_RAISE_CASES)
def test_pipeline_raise_stops_with_shard_key_and_reason(ray_session, clean, tmp_path, case):
    from mixflow.runtime.image_pipeline import ImagePipeline

    directory, (expect,) = damaged_copy(clean, tmp_path, case)
    shard, key, parts = expect.raised
    spec = make_spec(directory, tmp_path, on_error="raise", mix={"method": "none"},
                     trainer={"ranks": 2, "batch_size": 8},
                     runtime={"readers_per_rank": 2 if case == "missing_cls" else 1})
    with pytest.raises(PipelineError) as err:
        ImagePipeline(spec, show_progress=False).run()
    msg = str(err.value)
    assert isinstance(err.value, DataError) and err.value.stage in ("mixer r0", "mixer r1"), msg
    assert (err.value.shard, err.value.key) == (str(directory / shard), key)
    assert msg.startswith(f"shard {directory / shard}, key {key!r}: {parts[0]}"), msg
    assert "\n" not in msg and "ray::" not in msg and "Traceback" not in msg


@pytest.mark.parametrize("case", ("corrupt_index", "dangling_symlink", "adjacent_duplicate",
                                  "duplicate_across_shards", "truncated_tar_without_index"))
def test_pipeline_raise_at_listing_names_shard_and_reason(ray_session, clean, tmp_path, case):
    """Shard-level problems stop ``run`` before any actor starts, with the listing's one-line DataError
    (a corrupt index names the index file and line, not a spec field)."""
    from mixflow.runtime.image_pipeline import ImagePipeline

    directory, (expect,) = damaged_copy(clean, tmp_path, case)
    shard, key, parts = expect.raised
    spec = make_spec(directory, tmp_path, on_error="raise", mix={"method": "none"}, trainer={"batch_size": 8})
    with pytest.raises(DataError) as err:
        ImagePipeline(spec, show_progress=False).run()
    assert (err.value.shard, err.value.key) == (str(directory / shard), key)
    assert all(part in str(err.value) for part in parts) and "\n" not in str(err.value)


def test_stage_error_unwraps_nested_ray_task_errors():
    """A mixer re-raising its reader's error wraps the DataError twice; the stage error is its one line."""
    import ray

    from mixflow.errors import PipelineDataError
    from mixflow.runtime.stage_failure import stage_error

    data = DataError("DALI could not decode the image: [/opt/dali/dali/util/crop_window.h:91] bad", "s.tar", "k")
    inner = ray.exceptions.RayTaskError("DecoderActor.batch", "Traceback (most recent call last): ...", data)
    outer = ray.exceptions.RayTaskError("MixerActor.run", "Traceback ...\n  ^^^^", inner.as_instanceof_cause())
    err = stage_error("mixer r1", outer.as_instanceof_cause())
    assert isinstance(err, PipelineDataError) and isinstance(err, DataError)
    assert str(err) == f"shard s.tar, key 'k': {data.reason}"
    assert (err.shard, err.key, err.stage) == ("s.tar", "k", "mixer r1")
    other = stage_error("mixer r0", ray.exceptions.RayTaskError("MixerActor.run", "tb", PipelineError("reader gone")))
    assert str(other) == "mixer r0 failed: reader gone"


@pytest.mark.timeout(300)
def test_cli_run_raise_exits_2_with_one_line(clean, tmp_path):
    """``mixflow run`` under raise: exit status 2 and one line naming shard, key and reason (the key
    and the shard path hold rich markup, printed verbatim), no traceback."""
    import subprocess
    import sys

    import yaml

    directory = tmp_path / "shards[/closing]"
    shutil.copytree(clean[0], directory)
    samples = shard_samples(directory, 3)
    bad = "[bold]digit00026[red]"
    scratch = directory / "scratch"
    with ShardWriter(scratch, "one") as writer:
        for k, comps in samples.items():
            writer.write(bad if k == "digit00026" else k, {**comps, "cls": b"42"} if k == "digit00026" else comps)
    shutil.move(scratch / "one-000000.tar", shard_path(directory, 3))
    shutil.move(scratch / "one-000000.idx", shard_path(directory, 3).with_suffix(".idx"))
    spec = {"name": "raise-cli", "seed": 7, "run_dir": str(tmp_path / "run"), "on_error": "raise",
            "data": {"shards": str(directory), "num_classes": 10}, "decode": {"size": [24, 24]},
            "mix": {"method": "none"}, "channel": {"max_items": 4, "max_bytes": "1MiB"},
            "trainer": {"ranks": 2, "epochs": 1, "batch_size": 8, "model": "none"}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    proc = subprocess.run([sys.executable, "-m", "mixflow.cli", "run", str(tmp_path / "spec.yaml"), "--no-progress"],
                          capture_output=True, text=True, timeout=280,
                          env={**os.environ, "RAY_DEDUP_LOGS": "0", "COLUMNS": "80"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    want = (f"error: shard {shard_path(directory, 3)}, key {bad!r}: label 42 outside 0..9 "
            "(data.num_classes=10)\n")
    assert proc.stdout == want, proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr


# --------------------------------------------------------------------------- token cases


def token_docs(n: int, seed: int) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    return {f"doc{i:03d}": r.integers(0, 256, int(r.integers(5, 60))) for i in range(n)}


@pytest.fixture
def token_dir(tmp_path) -> Path:
    with TokenShardWriter(tmp_path / "tok", "syn", max_docs=5) as writer:
        for doc_id, tokens in token_docs(30, seed=1).items():
            writer.write_tokens(doc_id, tokens)
    return tmp_path / "tok"


def corrupt_tokens(directory: Path, case: str, shard: int = 2) -> tuple[Path, list[tuple[str, str]], set[str]]:
    """Damage shard ``shard``: ``(its path, [(key, reason part)], keys lost)``."""
    info = read_manifest(directory).shards[shard]
    path = directory / info.file
    stem = path.stem
    every = [f"{stem}:{r}" for r in range(info.num_docs)]
    if case == "unreadable_parquet":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])  # cut in half: footer gone
        return path, [(k, "not a readable Parquet token shard") for k in every], set(every)
    if case == "missing_parquet":
        path.unlink()
        return path, [(k, "shard file is missing") for k in every], set(every)
    assert case == "token_out_of_vocab"
    rows = pq.read_table(path).to_pylist()
    rows[1]["tokens"] = [5, 6, 7, 258, 9]
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)
    key = f"{stem}:1"
    return path, [(key, "token id 258 at position 3 is outside the vocabulary [0, 258)")], {key}


TOKEN_CASES = ("unreadable_parquet", "missing_parquet", "token_out_of_vocab")


def docs_by_key(directory: Path) -> dict[str, np.ndarray]:
    out = {}
    for info in read_manifest(directory).shards:
        if (directory / info.file).exists():
            for row, tokens in enumerate(pq.read_table(directory / info.file).column("tokens").to_pylist()):
                out[f"{Path(info.file).stem}:{row}"] = np.array(tokens)
    return out


@pytest.mark.parametrize("case", TOKEN_CASES)
def test_token_case_raise_names_shard_key_and_reason(token_dir, case):
    path, bad, _ = corrupt_tokens(token_dir, case)
    with pytest.raises(DataError) as err:
        list(TokenSource(token_dir, 16, shuffle=False, infinite=False))
    key, reason = bad[0]
    assert (err.value.shard, err.value.key) == (str(path), key)
    assert str(err.value).startswith(f"shard {path}, key {key!r}: {reason}")


@pytest.mark.parametrize("case", TOKEN_CASES)
def test_token_case_skip_quarantines_and_keeps_every_good_document(token_dir, case):
    clean = docs_by_key(token_dir)
    path, bad, lost = corrupt_tokens(token_dir, case)
    policy = BadSamplePolicy("skip")
    sequences = list(TokenSource(token_dir, 16, seed=5, infinite=False, policy=policy))
    records = policy.drain()
    assert sorted((r.shard, r.key) for r in records) == sorted((str(path), k) for k, _ in bad)
    reasons = dict(bad)
    assert all(r.reason.startswith(reasons[r.key]) and r.epoch == 0 for r in records)
    # every good document's tokens arrive once, in order, followed by EOS
    pieces: dict[str, list[np.ndarray]] = {}
    for seq in sequences:
        at = 0
        for span in seq.spans:
            pieces.setdefault(f"{span.shard}:{span.row}", []).append(seq.tokens[at:at + span.stop - span.start])
            at += span.stop - span.start
    assert sorted(pieces) == sorted(set(clean) - lost)
    for key, parts in pieces.items():
        np.testing.assert_array_equal(np.concatenate(parts), np.append(clean[key], 256))


def test_token_pipeline_skip_writes_quarantine_and_counts(ray_session, tmp_path):
    from mixflow.config import validate_spec
    from mixflow.runtime.token_pipeline import TokenPipeline

    root = tmp_path / "domains"
    for d, name in enumerate(("alpha", "beta")):
        for split, n in (("train", 12), ("validation", 6)):
            with TokenShardWriter(root / name / split, name, split, max_docs=2) as writer:
                for doc_id, tokens in token_docs(n, seed=10 * d + len(split)).items():
                    writer.write_tokens(doc_id, tokens)
    expected = {}
    for case, shard in (("unreadable_parquet", 2), ("token_out_of_vocab", 4)):
        path, bad, _ = corrupt_tokens(root / "alpha" / "train", case, shard)
        expected |= {(str(path), key): reason for key, reason in bad}
    spec = validate_spec({
        "kind": "tokens", "name": "bad", "seed": 1, "run_dir": str(tmp_path / "run"), "on_error": "skip",
        "data": {"shards": str(root), "seq_len": 16, "eval_sequences": 4},
        "mixture": {"policy": "odm", "params": {}},
        "channel": {"max_items": 3, "max_bytes": "1MiB"},
        # one rank reads every shard; 24 steps of ~4 alpha sequences pass alpha's ~25 sequences several times
        "trainer": {"ranks": 1, "steps": 24, "batch_size": 8, "model": "unigram", "eval_every": 0},
    })
    summary = TokenPipeline(spec, show_progress=False).run()
    lines = [json.loads(line) for line in (tmp_path / "run" / "quarantine.jsonl").read_text().splitlines()]
    assert summary.skipped == len(lines) > 0
    assert {(rec["shard"], rec["key"]) for rec in lines} == set(expected)
    for rec in lines:
        assert rec["reason"].startswith(expected[rec["shard"], rec["key"]])
        assert isinstance(rec["epoch"], int)


# --------------------------------------------------------------------------- printing external text


def test_cli_error_with_markup_like_text_prints_verbatim(tmp_path, capsys):
    """DALI's messages carry ``[/opt/dali/...h:91]``: rich must print such text, not parse it as markup."""
    from mixflow.cli import main

    missing = tmp_path / "x[/closing]" / "[brackets] [bold]spec.yaml"
    assert main(["run", str(missing)]) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"error: invalid pipeline spec in {missing}:\n")
    assert f"no such pipeline spec: {missing}\n" in out


def test_summary_prints_keys_and_names_verbatim():
    from rich.console import Console

    from mixflow.runtime.ledger import check_epoch
    from mixflow.runtime.summary import RankSummary, RunSummary

    ledger = check_epoch(0, {"[/k]", "[bold]b"}, {0: ["[bold]b"]}, [])
    summary = RunSummary("run [/x]", "cpu", 0.1, 1.0, 1, [RankSummary(0)], [ledger], 0,
                         [{"peak_items": 1, "max_items": 2, "peak_bytes": 0, "max_bytes": 1}])
    console = Console(file=io.StringIO(), width=300)
    summary.render(console)
    out = console.file.getvalue()
    assert "run [/x]: 1 samples" in out and "1 missing (e.g. [/k])" in out


def _suspect_shards(clean, tmp_path):
    """The clean shards with two samples of shard 4 made suspect: one whose scan data is garbage
    without a single 0xFF, one whose scan is cut in half (then EOI). Returns (directory, their keys)."""
    directory = tmp_path / "shards"
    shutil.copytree(clean[0], directory)
    garbage, short = keys_of(4)[0], keys_of(4)[3]
    cut = lambda jpg: jpg[:(jpg.index(b"\xff\xda") + len(jpg)) // 2] + b"\xff\xd9"  # noqa: E731
    rewrite_shard(directory, 4, lambda k, c: {**c, "jpg": garbage_scan(c["jpg"], no_ff=True)} if k == garbage
                  else {**c, "jpg": cut(c["jpg"])} if k == short else c)
    return directory, garbage, short


def test_garbage_without_ff_bytes_is_delivered_as_suspect(clean, tmp_path):
    """Random scan data without a single 0xFF keeps the marker structure intact; DALI (and PIL)
    decode it into noise without an error (libjpeg only warns on stderr), so it arrives, even
    under ``raise``: the entropy walk lists it as suspect, with shard, key and libjpeg's warning,
    and so is a scan cut short (premature end). No other sample is suspect."""
    directory, garbage, short = _suspect_shards(clean, tmp_path)
    stage = DecodeStage(list_shards(directory), 0, 1, WHOLE, 16, num_classes=10, seed=3)
    delivered, suspects = {}, []
    while (batch := stage.next_batch()) is not None:
        assert batch_records(stage, batch) == []
        delivered.update(zip(batch["keys"], batch["images"]))
        suspects += batch["suspect"]
        assert {r.key for r in batch["suspect"]} <= set(batch["keys"])
    stage.source.close()
    assert sorted(delivered) == sorted(clean[1])
    assert np.abs(delivered[garbage].astype(int) - clean[2][garbage][1]).mean() > 10
    by_key = {r.key: r for r in suspects}
    assert sorted(by_key) == sorted([garbage, short]) and len(suspects) == 2
    assert all(r.shard == str(shard_path(directory, 4)) and r.epoch == 0 for r in suspects)
    assert by_key[garbage].reason.startswith("corrupt JPEG data: ")
    assert by_key[short].reason.startswith("corrupt JPEG data: premature end of data segment: scan 1 holds ")
    # decode.check_scans: false skips the walk: the same samples arrive, none is suspect
    unchecked = DecodeStage(list_shards(directory), 0, 1, WHOLE.model_copy(update={"check_scans": False}), 16,
                            num_classes=10, seed=3)
    keys, flagged = [], 0
    while (batch := unchecked.next_batch()) is not None:
        keys += batch["keys"]
        flagged += len(batch["suspect"])
    unchecked.source.close()
    assert sorted(keys) == sorted(clean[1]) and flagged == 0


def test_pipeline_counts_and_lists_suspect_samples(ray_session, clean, tmp_path):
    """Through the Ray pipeline (under ``raise``): the garbage-scan and cut-scan samples arrive, the
    summary counts them as suspect (not skipped) and suspect.jsonl lists their shard, key and reason."""
    from mixflow.runtime.image_pipeline import ImagePipeline

    directory, garbage, short = _suspect_shards(clean, tmp_path)
    spec = make_spec(directory, tmp_path, on_error="raise", mix={"method": "none"},
                     trainer={"ranks": 1, "batch_size": 16})
    summary = ImagePipeline(spec, show_progress=False).run()
    (ledger,) = summary.ledgers
    assert ledger.exactly_once and ledger.delivered == len(clean[1]) and summary.skipped == 0
    assert summary.suspect == 2
    lines = [json.loads(line) for line in (tmp_path / "run" / "suspect.jsonl").read_text().splitlines()]
    assert sorted(rec["key"] for rec in lines) == sorted([garbage, short])
    assert all(rec["shard"] == str(shard_path(directory, 4)) and rec["epoch"] == 0 for rec in lines)
    assert all(rec["reason"].startswith("corrupt JPEG data: ") for rec in lines)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["suspect"] == 2
    assert not (tmp_path / "run" / "quarantine.jsonl").exists()
    from rich.console import Console

    console = Console(file=io.StringIO(), width=300)
    summary.render(console)
    assert "2 suspect samples delivered" in console.file.getvalue()


def test_max_pixels_is_configurable(clean):
    """decode.max_pixels below the digits' 32x32: every sample is refused from its header."""
    delivered, records = run_stage(clean[0], "skip", spec=WHOLE.model_copy(update={"max_pixels": 1000}))
    assert delivered == {} and len(records) == len(clean[1])
    assert all(r.reason.startswith("image too large: the header announces 32x32 = 1024 pixels, over "
                                   "decode.max_pixels=1000") for r in records)

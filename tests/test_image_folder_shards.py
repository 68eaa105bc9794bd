"""``mixflow shards --from-folder``: 16-bit images scaled, unreadable files named or skipped, classes
interleaved across shards, and a run warned when the shard layout leaves a rank without data (pure)."""

from __future__ import annotations

import argparse
import io
import warnings

import numpy as np
import pytest
from PIL import Image

from mixflow.cli import _check_inputs, main
from mixflow.data.image_folder import shards_from_folder
from mixflow.data.listing import list_shards
from mixflow.data.shard_assignment import starved_readers, starved_warning
from mixflow.data.webdataset_source import WebDatasetSource
from mixflow.errors import DataError
from mixflow.runtime.image_pipeline import prepare_shards
from tests.conftest import make_spec

pytestmark = pytest.mark.timeout(120)


def _samples(out) -> list[list[dict]]:
    """Per shard, its samples' components."""
    shards = list_shards(out)
    src = WebDatasetSource(shards, 0, 1)
    return [[src.read(s, row).components for row in range(shards[s].num_samples)] for s in range(len(shards))]


def _folder(root, classes: int = 2, per_class: int = 40, size: int = 16):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                root / f"class{c}" / f"{i:03d}.jpg", quality=90)
    return root


def test_16_bit_png_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    (tmp_path / "img" / "a").mkdir(parents=True)
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    Image.fromarray(ramp).save(tmp_path / "img" / "a" / "ramp.png")
    assert Image.open(tmp_path / "img" / "a" / "ramp.png").mode.startswith("I")
    shards_from_folder(tmp_path / "img", tmp_path / "out")
    (sample,), = _samples(tmp_path / "out")
    with Image.open(io.BytesIO(sample["jpg"])) as im:
        assert im.mode == "RGB"
        got = np.asarray(im.convert("L")).astype(np.float64)
    assert (got >= 250).mean() < 0.05  # was 99.6% white
    assert np.abs(got - ramp / 257.0).mean() < 3.0  # the ramp survives, JPEG error aside


def test_an_unreadable_image_is_named_or_skipped_and_counted(tmp_path, capsys):
    root = _folder(tmp_path / "img", classes=2, per_class=3)
    (root / "class1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError) as err:
        shards_from_folder(root, tmp_path / "a")
    assert str(err.value).startswith(f"{root / 'class1' / 'broken.png'}: cannot be read as an image (")
    writer = shards_from_folder(root, tmp_path / "b", on_error="skip")
    assert writer.total_samples == 6
    assert [r.key for r in writer.skipped] == ["class1/broken.png"]
    rc = main(["shards", "--from-folder", str(root), "--out", str(tmp_path / "c")])
    out = capsys.readouterr().out.replace("\n", " ")
    assert rc == 2 and "broken.png: cannot be read as an image" in out and "Traceback" not in out
    rc = main(["shards", "--from-folder", str(root), "--out", str(tmp_path / "d"), "--on-error", "skip",
               "--shard-size", "4KiB"])
    out = capsys.readouterr().out.replace("\n", " ")
    assert rc == 0 and "wrote 6 samples" in out and "1 unreadable image(s) skipped" in out


def test_shards_interleave_the_classes_in_a_seeded_order(tmp_path):
    root = _folder(tmp_path / "img", classes=3, per_class=40)
    writer = shards_from_folder(root, tmp_path / "a", max_bytes=60 * 2**10)
    shards = _samples(tmp_path / "a")
    assert len(shards) >= 4 and sum(map(len, shards)) == 120
    for shard in shards[:-1]:  # the last one may be a short remainder
        assert len({s["cls"] for s in shard}) == 3  # every shard holds every class (was: one class each)
    again = shards_from_folder(root, tmp_path / "b", max_bytes=60 * 2**10)
    assert [p.read_bytes() for p in writer.paths] == [p.read_bytes() for p in again.paths]  # same seed, same shards
    other = shards_from_folder(root, tmp_path / "c", max_bytes=60 * 2**10, seed=1)
    assert [p.read_bytes() for p in writer.paths] != [p.read_bytes() for p in other.paths]


def test_a_rank_without_data_is_warned_at_run_start(tmp_path):
    assert starved_readers([100], 2, 1, 0) == {0: [1]}
    assert starved_readers([60, 40], 2, 1, 0, epochs=3) == {}
    assert starved_warning([100], 2, 1, 0) == (
        "rank(s) 1 get no samples in epoch 0: 1 non-empty shard(s) for 2 reader(s) (2 rank(s) x 1 "
        "readers_per_rank), and a reader reads whole shards; write at least 2 shards (a smaller mixflow "
        "shards --shard-size)")
    assert starved_warning([50, 40, 30], 2, 2, 0).startswith("reader slot(s) ")
    # A small folder with the default 64 MiB shard size: one shard, so rank 1 would get nothing.
    root = _folder(tmp_path / "img", classes=2, per_class=5)
    assert len(shards_from_folder(root, tmp_path / "one", max_bytes=64 * 2**20).paths) == 1
    spec = make_spec(tmp_path / "one", tmp_path, data={"shards": str(tmp_path / "one"), "num_classes": 2})
    assert _check_inputs(spec, argparse.Namespace(resume=None)) == []  # the directory is there
    with pytest.warns(UserWarning) as caught:
        prepare_shards(spec)  # what every pipeline start runs (on the driver, before any actor)
    (warning,) = [str(w.message) for w in caught]
    assert warning.startswith("data.shards: rank(s) 1 get no samples in epoch 0: 1 non-empty shard(s) for 2")
    shards_from_folder(root, tmp_path / "two", max_bytes=1024)
    spec = make_spec(tmp_path / "two", tmp_path, data={"shards": str(tmp_path / "two"), "num_classes": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(prepare_shards(spec)) > 1

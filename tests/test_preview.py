"""``mixflow preview``: PNG grid of mixed samples from real (digits) shards, label weights per tile."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mixflow.cli import main
from mixflow.config import DecodeSpec, validate_spec
from mixflow.data.listing import list_shards
from mixflow.decode.decode_stage import DecodeStage
from mixflow.errors import ConfigError
from mixflow.preview import CAPTION_HEIGHT, PAD, displayable, preview_spec, render_preview

SIZE = ["decode.size=[32,32]", "trainer.batch_size=16"]


@pytest.fixture(scope="module")
def digit_labels():
    """Ground truth by key: the shard key ``digitNNNNN`` is row NNNNN of scikit-learn's digits."""
    from sklearn.datasets import load_digits

    target = load_digits().target
    return lambda key: int(target[int(re.fullmatch(r"digit(\d+)", key).group(1))])


def tile_pixels(png: np.ndarray, row: int, col: int, side: int) -> np.ndarray:
    top, left = PAD + row * (side + CAPTION_HEIGHT + PAD), PAD + col * (side + PAD)
    return png[top:top + side, left:left + side]


def test_png_tiles_labels_and_pixels_follow_the_mixed_batch(digits_shards, tmp_path, digit_labels):
    out = tmp_path / "grid.png"
    shown = render_preview(digits_shards, out, rows=2, cols=3, seed=4, method="mixup",
                           overrides=[*SIZE, "mix.mode=elem"])
    # 32 px images are enlarged 4x to 128 px tiles; 3 columns, 2 rows, 4 px gaps, 16 px captions
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == (3 * (128 + 4) + 4, 2 * (128 + 16 + 4) + 4) == (400, 300) == shown.size
        png = np.asarray(im.convert("RGB"))
    assert shown.scale == 4 and shown.method == "mixup"
    assert [(t.row, t.col) for t in shown.tiles] == [(r, c) for r in range(2) for c in range(3)]
    assert len({t.key for t in shown.tiles}) == 6

    # the same first batch, decoded independently: key -> uint8 HWC image
    decode = DecodeSpec(size=(32, 32))
    stage = DecodeStage(list_shards(digits_shards), 0, 1, decode, 16, 10, seed=4)
    stage.start_epoch(0)
    batch = stage.next_batch()
    plain = dict(zip(batch["keys"], batch["images"]))

    lams = set()
    for i, t in enumerate(shown.tiles):
        assert t.label_a == digit_labels(t.key) and t.label_b == digit_labels(t.partner_key)
        assert t.partner_key != t.key and 0.0 < t.lam < 1.0
        assert t.caption == f"{t.label_a}: {t.lam:.2f} / {t.label_b}: {1 - t.lam:.2f}"
        # MixUp in float32, rounded: the tile is exactly lam*own + (1-lam)*partner
        lam = torch.tensor(t.lam, dtype=torch.float32)
        own = torch.from_numpy(plain[t.key]).float()
        partner = torch.from_numpy(plain[t.partner_key]).float()
        expected = (lam * own + (1 - lam) * partner).round().to(torch.uint8).numpy()
        assert np.array_equal(shown.images[i], expected)
        big = expected.repeat(4, axis=0).repeat(4, axis=1)
        assert np.array_equal(tile_pixels(png, t.row, t.col, 128), big)
        lams.add(t.lam)
    assert len(lams) == 6, "elem mode: one lam per sample"
    # the caption strip under a tile holds dark text on white
    strip = png[PAD + 128:PAD + 128 + CAPTION_HEIGHT, PAD:PAD + 128]
    assert strip.min() < 100 and strip.max() == 255


def test_same_seed_same_png_other_seed_differs(digits_shards, tmp_path):
    a = render_preview(digits_shards, tmp_path / "a.png", rows=2, cols=2, seed=9, method="cutmix", overrides=SIZE)
    b = render_preview(digits_shards, tmp_path / "b.png", rows=2, cols=2, seed=9, method="cutmix", overrides=SIZE)
    c = render_preview(digits_shards, tmp_path / "c.png", rows=2, cols=2, seed=10, method="cutmix", overrides=SIZE)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert a.tiles == b.tiles and np.array_equal(a.images, b.images)
    assert [t.key for t in a.tiles] != [t.key for t in c.tiles]

    stage = DecodeStage(list_shards(digits_shards), 0, 1, DecodeSpec(size=(32, 32)), 16, 10, seed=9)
    stage.start_epoch(0)
    batch = stage.next_batch()
    plain = dict(zip(batch["keys"], batch["images"]))
    assert len({t.lam for t in a.tiles}) == 1  # batch mode: one box, one lam
    for t, img in zip(a.tiles, a.images):
        own, partner = plain[t.key], plain[t.partner_key]
        assert np.all((img == own) | (img == partner))
        # pixels that changed lie in the pasted box (area (1-lam)*H*W); the others keep their own pixels
        changed = np.any(img != own, axis=2).sum()
        foreign = np.any(img != partner, axis=2).sum()
        assert 0 < changed <= round((1 - t.lam) * 32 * 32) and foreign <= round(t.lam * 32 * 32)


def test_spec_file_method_override_and_cli(digits_shards, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "p", "seed": 2, "data": {"shards": str(digits_shards), "num_classes": 10},
        "decode": {"size": [16, 24]}, "mix": {"method": "mixup", "alpha": 0.4},
        "trainer": {"batch_size": 8, "model": "none"}}))
    assert preview_spec(spec).mix.alpha == 0.4
    overridden = preview_spec(spec, method="cutmix", overrides=["mix.alpha=0.3"])
    assert overridden.mix.method == "cutmix" and overridden.mix.alpha == 0.3 and overridden.seed == 2

    out = tmp_path / "cli.png"
    assert main(["preview", str(spec), "--out", str(out), "--rows", "3", "--cols", "4", "--method", "cutmix"]) == 0
    with Image.open(out) as im:
        # 16x24 images enlarged 6x (24*6 = 144 >= 128): tiles 96 high, 144 wide; 12 samples from two batches of 8
        assert im.size == (4 * (144 + PAD) + PAD, 3 * (96 + CAPTION_HEIGHT + PAD) + PAD)


def test_bad_arguments_name_the_problem(digits_shards, tmp_path):
    with pytest.raises(ValueError, match="rows and cols must be >= 1"):
        render_preview(digits_shards, tmp_path / "x.png", rows=0)
    with pytest.raises(ConfigError, match="neither a pipeline spec nor a shard directory"):
        preview_spec(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"(?s)mix.*'mixupp'"):
        preview_spec(digits_shards, method="mixupp")
    with pytest.raises(ConfigError, match="data.num_classes: required field is missing"):
        preview_spec(tmp_path)  # a directory without classes.json
    with pytest.raises(ConfigError, match="cannot mix these images"):  # MaskMix needs sides that are multiples of 14
        render_preview(digits_shards, tmp_path / "y.png", rows=1, cols=1, method="maskmix", overrides=SIZE)
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_displayable_undoes_normalisation():
    spec = validate_spec({
        "name": "n", "data": {"shards": "unused", "num_classes": 2}, "decode": {"normalize": True}})
    pixels = torch.tensor([[[[0, 255], [128, 7]], [[1, 2], [3, 4]], [[250, 100], [60, 30]]]], dtype=torch.uint8)
    mean = torch.tensor(spec.decode.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.decode.std).view(1, 3, 1, 1) * 255
    normalized = (pixels.float() - mean) / std  # what DALI's crop_mirror_normalize emits (CHW float)
    assert np.array_equal(displayable(normalized, spec), pixels.permute(0, 2, 3, 1).numpy())
    nhwc = torch.randint(0, 256, (2, 5, 4, 3), dtype=torch.uint8)
    assert np.array_equal(displayable(nhwc, spec), nhwc.numpy())

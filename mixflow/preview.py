"""``mixflow preview``: a PNG grid of mixed samples from real shards, label weights under each tile.

The source is a pipeline spec (its ``data``, ``decode``, ``mix`` and ``seed``) or a shard
directory (then a minimal spec is built around it: ``data.num_classes`` from the
directory's ``classes.json``, ``decode`` and ``mix`` defaults, ``mix.method`` from
``method``). ``overrides`` are spec fields as ``field.path=value`` (``mix.alpha=0.4``)
either way, and ``method`` replaces the spec's whole ``mix`` section.

Batches of ``trainer.batch_size`` samples are decoded on the CPU with DALI by one
:class:`~mixflow.decode.decode_stage.DecodeStage` reader and mixed with a generator
derived from ``(seed, epoch 0, "mix", rank 0, step)``, as a mixer actor derives it, until
``rows * cols`` samples are in hand. Tile ``i`` shows sample ``i`` (row-major) and, under
it, its pair-form label: ``"3: 0.62 / 7: 0.38"`` is ``lam = 0.62`` of the sample's own
class 3 and ``0.38`` of its partner's class 7 (just ``"3: 1.00"`` when it was not mixed).
Small images are enlarged by an integer factor (nearest) so tiles are at least
``MIN_TILE`` pixels wide; normalised float decodes are mapped back to pixels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from mixflow.config import PipelineSpec, apply_override, load_spec, validate_spec
from mixflow.errors import ConfigError
from mixflow.mix.registry import build_mixer
from mixflow.seeding import numpy_rng

PAD = 4
CAPTION_HEIGHT = 16
FONT_SIZE = 11
MIN_TILE = 128
DEFAULT_METHOD = "mixup_cutmix"


@dataclass(frozen=True)
class PreviewTile:
    """One tile: sample ``key`` mixed with ``partner_key``; ``lam`` of ``label_a``, ``1 - lam`` of ``label_b``."""

    row: int
    col: int
    key: str
    partner_key: str
    label_a: int
    label_b: int
    lam: float

    @property
    def caption(self) -> str:
        if self.lam >= 1.0:
            return f"{self.label_a}: 1.00"
        return f"{self.label_a}: {self.lam:.2f} / {self.label_b}: {1.0 - self.lam:.2f}"


@dataclass(frozen=True)
class Preview:
    """What :func:`render_preview` drew: the PNG, its tiles (row-major) and the pixels shown in them."""

    path: Path
    method: str
    tiles: list[PreviewTile]
    images: np.ndarray
    """``uint8 [rows*cols, H, W, 3]``: the mixed samples before enlarging."""
    scale: int
    size: tuple[int, int]
    """PNG ``(width, height)`` in pixels."""


def preview_spec(source: str | Path, method: str | None = None, overrides: list[str] | None = None) -> PipelineSpec:
    """The image pipeline spec a preview follows: a spec file, or a shard directory wrapped in one."""
    path = Path(source)
    sets = ([f"mix={{method: {method}}}"] if method else []) + list(overrides or [])
    if path.is_dir():
        raw = {"name": "preview", "data": {"shards": str(path)}, "mix": {"method": DEFAULT_METHOD}}
        classes = path / "classes.json"
        if classes.is_file():
            raw["data"]["num_classes"] = int(json.loads(classes.read_text())["num_classes"])
        for item in sets:
            apply_override(raw, item)
        spec = validate_spec(raw, str(path))
    elif path.is_file():
        spec = load_spec(path, sets)
    else:
        raise ConfigError([("<source>", f"{path} is neither a pipeline spec nor a shard directory")], str(path))
    if not isinstance(spec, PipelineSpec):
        raise ConfigError([("kind", f"preview shows image pipelines; this spec is kind {spec.kind!r}")], str(path))
    return spec


def mixed_samples(spec: PipelineSpec, count: int, seed: int) -> tuple[list[PreviewTile], np.ndarray]:
    """The first ``count`` mixed samples: tiles (positions left at 0) and displayable uint8 HWC pixels."""
    from mixflow.data.demo_sets import build_demo
    from mixflow.data.listing import list_shards
    from mixflow.decode.decode_stage import DecodeStage

    shard_dir = Path(spec.data.shards)
    if spec.data.demo and not any(shard_dir.glob("*.tar")):
        build_demo(spec.data.demo, shard_dir, max_bytes=spec.data.shard_size)
    stage = DecodeStage(list_shards(shard_dir), 0, 1, spec.decode, spec.trainer.batch_size, spec.data.num_classes,
                        seed=seed, shuffle_window=spec.data.shuffle_window, on_error=spec.on_error, device="cpu")
    mix = build_mixer(spec.mix.method, spec.data.num_classes, **spec.mix.model_dump(exclude={"method"}))
    stage.start_epoch(0)
    tiles: list[PreviewTile] = []
    images: list[np.ndarray] = []
    step = 0
    while len(tiles) < count and (decoded := stage.next_batch()) is not None:
        x = torch.from_numpy(decoded["images"])
        y = torch.from_numpy(decoded["labels"])
        try:
            mixed = mix(x, y, numpy_rng(seed, 0, "mix", 0, step))
        except (ValueError, TypeError) as exc:
            raise ConfigError([("mix", f"{spec.mix.method} cannot mix these images: {exc}")]) from None
        keys = decoded["keys"]
        perm, lam = mixed.perm.tolist(), mixed.lam.tolist()
        pixels = displayable(mixed.x, spec)
        for i in range(min(len(keys), count - len(tiles))):
            tiles.append(PreviewTile(0, 0, keys[i], keys[perm[i]], int(mixed.y_a[i]), int(mixed.y_b[i]), lam[i]))
            images.append(pixels[i])
        step += 1
    if len(tiles) < count:
        raise ConfigError([("data.shards", f"only {len(tiles)} samples to show, {count} tiles asked for")])
    return tiles, np.stack(images)


def displayable(x: torch.Tensor, spec: PipelineSpec) -> np.ndarray:
    """``uint8 [B, H, W, 3]`` pixels of a decoded batch (undoing ``decode.normalize``)."""
    if x.dtype == torch.uint8:
        return x.numpy()
    d = spec.decode
    mean = torch.tensor(d.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(d.std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = (x.float() * std + mean).mul_(255.0).round_().clamp_(0, 255)
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def grid_size(rows: int, cols: int, tile_h: int, tile_w: int) -> tuple[int, int]:
    """PNG ``(width, height)`` of a grid of ``tile_h x tile_w`` tiles, each with its caption strip."""
    return cols * (tile_w + PAD) + PAD, rows * (tile_h + CAPTION_HEIGHT + PAD) + PAD


def draw_grid(images: np.ndarray, captions: list[str], rows: int, cols: int, scale: int, out: Path) -> tuple[int, int]:
    """Paste the enlarged images row-major with their captions; write the PNG; return its size."""
    h, w = images.shape[1] * scale, images.shape[2] * scale
    size = grid_size(rows, cols, h, w)
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=FONT_SIZE)
    for i, (img, caption) in enumerate(zip(images, captions)):
        r, c = divmod(i, cols)
        left, top = PAD + c * (w + PAD), PAD + r * (h + CAPTION_HEIGHT + PAD)
        big = img.repeat(scale, axis=0).repeat(scale, axis=1)
        canvas.paste(Image.fromarray(big, "RGB"), (left, top))
        draw.text((left + 1, top + h + 2), caption, fill="black", font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    return size


def render_preview(source: str | Path, out: str | Path = "preview.png", *, rows: int = 4, cols: int = 4,
                   seed: int | None = None, method: str | None = None,
                   overrides: list[str] | None = None) -> Preview:
    """Decode, mix and draw ``rows x cols`` samples of ``source``; ``seed`` defaults to the spec's."""
    if rows < 1 or cols < 1:
        raise ValueError(f"rows and cols must be >= 1, got rows={rows}, cols={cols}")
    spec = preview_spec(source, method, overrides)
    seed = spec.seed if seed is None else seed
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    tiles, images = mixed_samples(spec, rows * cols, seed)
    tiles = [PreviewTile(i // cols, i % cols, t.key, t.partner_key, t.label_a, t.label_b, t.lam)
             for i, t in enumerate(tiles)]
    scale = max(1, -(-MIN_TILE // images.shape[2]))
    out = Path(out)
    size = draw_grid(images, [t.caption for t in tiles], rows, cols, scale, out)
    return Preview(out, spec.mix.method, tiles, images, scale, size)

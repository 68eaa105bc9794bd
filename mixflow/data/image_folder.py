"""Turn an image folder (one sub-folder per class) into WebDataset shards.

Files are written in a seeded shuffle of the folder's (sorted) file list, so every
shard holds a mix of the classes rather than one class each; keys stay tied to the
sorted order (``{class:04d}_{n:08d}``), so the same folder and seed give the same shards.
Images that are not JPEG are re-encoded as 8-bit RGB JPEG; 16-bit images are scaled to
8 bits (not clipped). A file that cannot be read as an image is an error naming it, or,
with ``on_error="skip"``, skipped and counted (``writer.skipped``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from mixflow.data.bad_samples import SkipRecord
from mixflow.data.shard_writer import ShardWriter
from mixflow.errors import DataError
from mixflow.seeding import numpy_rng

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def folder_classes(root: str | Path) -> list[str]:
    """The class sub-folders of ``root``, sorted (their index is the label)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist" if not root.exists() else
                        f"image folder {root} is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"image folder {root} has no class sub-folders (one sub-folder per class)")
    return classes


def iter_image_folder(root: str | Path) -> Iterator[tuple[str, int, Path]]:
    """Yield ``(class_name, class_index, path)`` in a stable order (classes and files sorted)."""
    root = Path(root)
    for idx, name in enumerate(folder_classes(root)):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                yield name, idx, path


def to_rgb8(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB. 16-bit and 32-bit integer images are scaled to 0..255 by their bit
    depth (a 16-bit PNG opens as mode ``I;16`` or ``I``: clipping it, as ``convert("RGB")``
    does, makes nearly every pixel white); float images by their 0..1 (or 0..255) range."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = np.asarray(im)
        if im.mode == "F":
            arr = arr.astype(np.float64) * (255.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 1.0)
        elif im.mode.startswith("I;16") or int(arr.max(initial=0)) > 255:  # 16-bit samples (I: as PIL opens some)
            arr = arr.astype(np.float64) / 257.0
        gray = np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return im.convert("RGB")


def as_jpeg(data: bytes, quality: int = 95, name: str | None = None) -> bytes:
    """Keep JPEG bytes as they are; re-encode any other format as 8-bit RGB JPEG. Unreadable
    bytes are a :class:`DataError` naming ``name`` (the file)."""
    if data[:2] == b"\xff\xd8":
        return data
    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = to_rgb8(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{name or 'image'}: cannot be read as an image ({type(exc).__name__}: {exc})") from None
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def write_classes(out_dir: str | Path, classes: list[str]) -> None:
    Path(out_dir, "classes.json").write_text(json.dumps({"num_classes": len(classes), "classes": classes}, indent=1))


def shards_from_folder(root: str | Path, out_dir: str | Path, max_bytes: int = 2**20,
                       prefix: str = "train", seed: int = 0, on_error: str = "raise") -> ShardWriter:
    """Write every image under ``root`` as a ``{jpg, cls, path}`` sample, in a shuffle seeded by
    ``seed`` (classes interleaved across shards); returns the closed writer. ``on_error="skip"``:
    unreadable files are left out and listed in ``writer.skipped`` (``SkipRecord``, key = the
    file's path under ``root``); ``"raise"``: the first one is a :class:`DataError` naming it."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    root = Path(root)
    classes = folder_classes(root)
    files = [(f"{idx:04d}_{n:08d}", idx, path) for n, (_, idx, path) in enumerate(iter_image_folder(root))]
    order = numpy_rng(seed, 0, "image_folder_order").permutation(len(files)) if files else []
    skipped: list[SkipRecord] = []
    with ShardWriter(out_dir, prefix, max_bytes=max_bytes) as writer:
        for i in order:
            key, idx, path = files[int(i)]
            rel = str(path.relative_to(root))
            try:
                jpg = as_jpeg(path.read_bytes(), name=str(path))
            except DataError as err:
                if on_error == "raise":
                    raise
                skipped.append(SkipRecord(shard=None, key=rel, reason=str(err)))
                continue
            writer.write(key, {"jpg": jpg, "cls": str(idx).encode(), "path": rel.encode()})
    writer.skipped = skipped
    write_classes(out_dir, classes)
    return writer

"""Turn an image folder (one sub-folder per class) into WebDataset shards."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from mixflow.data.shard_writer import ShardWriter

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def iter_image_folder(root: str | Path) -> Iterator[tuple[str, int, Path]]:
    """Yield ``(class_name, class_index, path)`` in a stable order (classes and files sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"image folder {root} has no class sub-folders")
    for idx, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                yield name, idx, path


def as_jpeg(data: bytes, quality: int = 95) -> bytes:
    """Keep JPEG bytes as they are; re-encode any other format as JPEG."""
    if data[:2] == b"\xff\xd8":
        return data
    with Image.open(io.BytesIO(data)) as im:
        out = io.BytesIO()
        im.convert("RGB").save(out, format="JPEG", quality=quality)
        return out.getvalue()


def write_classes(out_dir: str | Path, classes: list[str]) -> None:
    Path(out_dir, "classes.json").write_text(json.dumps({"num_classes": len(classes), "classes": classes}, indent=1))


def shards_from_folder(root: str | Path, out_dir: str | Path, max_bytes: int = 2**20,
                       prefix: str = "train") -> ShardWriter:
    """Write every image under ``root`` as a ``{jpg, cls, path}`` sample; returns the closed writer."""
    classes: list[str] = []
    with ShardWriter(out_dir, prefix, max_bytes=max_bytes) as writer:
        for n, (name, idx, path) in enumerate(iter_image_folder(root)):
            if not classes or classes[-1] != name:
                classes.append(name)
            writer.write(f"{idx:04d}_{n:08d}", {
                "jpg": as_jpeg(path.read_bytes()),
                "cls": str(idx).encode(),
                "path": str(path.relative_to(root)).encode(),
            })
    write_classes(out_dir, sorted(p.name for p in Path(root).iterdir() if p.is_dir()))
    return writer

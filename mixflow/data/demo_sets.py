"""Demo datasets built from real images that ship with installed packages (no downloads).

* ``digits``: scikit-learn's 1,797 handwritten digits (8x8, 10 classes), upscaled to
  32x32 grayscale JPEGs.
* ``photos``: photographs shipped with scikit-learn (``china.jpg``, ``flower.jpg``) and
  matplotlib (``grace_hopper.jpg``) cut into seeded random crops around 500x375,
  flipped and colour-jittered, saved as JPEG; the class is the source photograph.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from mixflow.data.image_folder import write_classes
from mixflow.data.shard_writer import ShardWriter

DEMOS = ("digits", "photos")


def _jpeg(img: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def build_digits(out_dir: str | Path, max_bytes: int = 256 * 2**10, size: int = 32) -> ShardWriter:
    from sklearn.datasets import load_digits

    digits = load_digits()
    with ShardWriter(out_dir, "digits", max_bytes=max_bytes) as writer:
        for i, (img, label) in enumerate(zip(digits.images, digits.target)):
            pixels = np.clip(img * (255.0 / 16.0), 0, 255).astype(np.uint8)
            im = Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC)
            writer.write(f"digit{i:05d}", {"jpg": _jpeg(im, 95), "cls": str(int(label)).encode()})
    write_classes(out_dir, [str(d) for d in range(10)])
    return writer


def source_photos() -> list[tuple[str, np.ndarray]]:
    """The real photographs available on this machine, as ``(name, HxWx3 uint8)``."""
    from sklearn.datasets import load_sample_images

    sk = load_sample_images()
    photos = [(Path(f).stem, img) for f, img in zip(sk.filenames, sk.images)]
    try:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
            photos.append(("grace_hopper", np.asarray(Image.open(fh).convert("RGB"))))
    except (ImportError, OSError, ValueError):
        pass
    return photos


def build_photos(out_dir: str | Path, num_samples: int = 1024, max_bytes: int = 4 * 2**20,
                 seed: int = 0, quality: int = 90) -> ShardWriter:
    rng = np.random.default_rng(seed)
    photos = source_photos()
    with ShardWriter(out_dir, "photos", max_bytes=max_bytes) as writer:
        for i in range(num_samples):
            label = i % len(photos)
            _, arr = photos[label]
            h, w = arr.shape[:2]
            frac = rng.uniform(0.45, 1.0)
            ch, cw = max(16, int(h * frac)), max(16, int(w * frac * rng.uniform(0.85, 1.15)))
            cw = min(cw, w)
            top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            im = Image.fromarray(arr[top:top + ch, left:left + cw])
            im = im.resize((500, 375) if rng.random() < 0.8 else (375, 500), Image.BILINEAR)
            if rng.random() < 0.5:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.7, 1.3))
            im = ImageEnhance.Color(im).enhance(rng.uniform(0.7, 1.3))
            writer.write(f"photo{i:06d}", {"jpg": _jpeg(im, quality), "cls": str(label).encode()})
    write_classes(out_dir, [name for name, _ in photos])
    return writer


def build_demo(name: str, out_dir: str | Path, max_bytes: int | None = None, **kwargs) -> ShardWriter:
    if name == "digits":
        return build_digits(out_dir, max_bytes=max_bytes or 256 * 2**10, **kwargs)
    if name == "photos":
        return build_photos(out_dir, max_bytes=max_bytes or 4 * 2**20, **kwargs)
    raise ValueError(f"unknown demo set {name!r}; choose one of {', '.join(DEMOS)}")

"""RandomResizedCrop windows, drawn on our side so the stream is seeded and resumable.

Same algorithm as torchvision's ``RandomResizedCrop.get_params`` (Szegedy et al.,
"Going deeper with convolutions", the Inception crop): up to 10 attempts of a
target area ``U(scale) * H * W`` and a log-uniform aspect ratio, falling back to a
centre crop with the ratio clamped. Vectorised over the batch and the attempts.
DALI then decodes only that region of interest (``fn.decoders.image_slice``).
"""

from __future__ import annotations

import math

import numpy as np

ATTEMPTS = 10


def random_resized_crop_windows(heights: np.ndarray, widths: np.ndarray, scale: tuple[float, float],
                                ratio: tuple[float, float], rng: np.random.Generator,
                                ) -> tuple[np.ndarray, np.ndarray]:
    """Return ``anchors`` and ``shapes`` as ``[B, 2]`` float32 in pixels, ordered (x, y) / (w, h)."""
    heights = np.asarray(heights, dtype=np.float64)
    widths = np.asarray(widths, dtype=np.float64)
    b = len(heights)
    area = (heights * widths)[:, None]
    target = area * rng.uniform(scale[0], scale[1], size=(b, ATTEMPTS))
    log_r = rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(b, ATTEMPTS))
    aspect = np.exp(log_r)
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= widths[:, None]) & (h <= heights[:, None])
    first = np.argmax(ok, axis=1)
    found = ok[np.arange(b), first]
    cw = w[np.arange(b), first]
    ch = h[np.arange(b), first]
    # Fallback: centre crop with the aspect ratio clamped to `ratio`.
    in_ratio = widths / heights
    fw = np.where(in_ratio < ratio[0], widths, np.where(in_ratio > ratio[1], np.round(heights * ratio[1]), widths))
    fh = np.where(in_ratio < ratio[0], np.round(widths / ratio[0]), heights)
    cw = np.where(found, cw, fw)
    ch = np.where(found, ch, fh)
    u = rng.random((b, 2))
    x = np.where(found, np.floor(u[:, 0] * (widths - cw + 1)), (widths - cw) // 2)
    y = np.where(found, np.floor(u[:, 1] * (heights - ch + 1)), (heights - ch) // 2)
    anchors = np.stack([x, y], axis=1).astype(np.float32)
    shapes = np.stack([cw, ch], axis=1).astype(np.float32)
    return anchors, shapes

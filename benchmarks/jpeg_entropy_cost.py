#!/usr/bin/env python
"""What the entropy-data walk (:mod:`mixflow.data.jpeg_entropy`) costs next to a decode.

For each JPEG kind (the ``photos`` demo's 500x375 q90 4:2:0 samples, the shipped 640x427 photos
re-encoded at several qualities and subsamplings, with restart markers, the 32x32 digits), the
best-of-rounds time per file of: the header checks (``jpeg_header``), the walk (``entropy_walk``)
and a full decode with PIL (``Image.open(...).load()``, libjpeg-turbo); printed with the ratio
walk / decode. One process, one thread; the walk compiles (or loads numba's cache) before timing.

Usage::

    python benchmarks/jpeg_entropy_cost.py [--rounds 5] [--out results.json]
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
from PIL import Image


def encode(im: Image.Image, **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, format="JPEG", **kw)
    return out.getvalue()


def kinds() -> dict[str, list[bytes]]:
    from sklearn.datasets import load_digits, load_sample_images

    from mixflow.data.demo_sets import source_photos

    china, flower = (Image.fromarray(im) for im in load_sample_images().images)
    rng = np.random.default_rng(0)
    demo = []
    for name, arr in source_photos():  # as build_photos writes them: 500x375 crops, quality 90
        h, w = arr.shape[:2]
        for _ in range(4):
            top, left = rng.integers(0, h // 3), rng.integers(0, w // 3)
            im = Image.fromarray(arr[top:top + 2 * h // 3, left:left + 2 * w // 3]).resize((500, 375))
            demo.append(encode(im, quality=90))
    digits = [encode(Image.fromarray(np.clip(d * (255 / 16), 0, 255).astype(np.uint8), mode="L")
                     .resize((32, 32), Image.BICUBIC), quality=95) for d in load_digits().images[:64]]
    return {
        "photos demo 500x375 q90 4:2:0": demo,
        "640x427 q75 4:2:0": [encode(im, quality=75) for im in (china, flower)],
        "640x427 q95 4:4:4": [encode(im, quality=95, subsampling=0) for im in (china, flower)],
        "640x427 q85 4:2:2, restart every row": [encode(im, quality=85, subsampling=1, restart_marker_rows=1)
                                                  for im in (china, flower)],
        "640x427 q85 grayscale": [encode(im.convert("L"), quality=85) for im in (china, flower)],
        "digits 32x32 q95": digits,
    }


def per_file(fn, datas: list[bytes], rounds: int) -> float:
    """Best of ``rounds`` of the mean time of ``fn`` over ``datas`` (each at least 20 times a round)."""
    reps = max(1, 20 // len(datas))
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            for d in datas:
                fn(d)
        best = min(best, (time.perf_counter() - start) / (reps * len(datas)))
    return best


def main() -> None:
    from mixflow.data.jpeg_entropy import entropy_walk
    from mixflow.data.jpeg_header import jpeg_header

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    for name, datas in kinds().items():
        for d in datas:
            assert entropy_walk(d) == (True, None), name
        header = per_file(jpeg_header, datas, args.rounds)
        walk = per_file(entropy_walk, datas, args.rounds)
        decode = per_file(lambda d: Image.open(io.BytesIO(d)).load(), datas, args.rounds)
        rows.append({"kind": name, "bytes": int(np.mean([len(d) for d in datas])), "header_us": header * 1e6,
                     "walk_us": walk * 1e6, "pil_decode_us": decode * 1e6, "walk_over_decode": walk / decode})
        r = rows[-1]
        print(f"{name:40s} {r['bytes']:7d} B  header {r['header_us']:6.0f} us  walk {r['walk_us']:6.0f} us  "
              f"PIL decode {r['pil_decode_us']:6.0f} us  walk/decode {r['walk_over_decode']:.2f}", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()

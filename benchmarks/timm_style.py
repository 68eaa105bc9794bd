"""timm's ``FastCollateMixup`` per-sample step, shared by the benchmarks' timm-style baselines.

timm (``timm/data/mixup.py``) mixes a uint8 batch one sample at a time: a sample whose
lam is 1 is copied, a CutMix sample is copied and the partner's box pasted over it, a
MixUp sample is blended in float32 and rounded back with ``np.rint``. Written here
(timm is not a dependency) so that the two benchmarks compare against the same code.
"""

from __future__ import annotations

import numpy as np


def fast_collate_sample(out: np.ndarray, images: np.ndarray, i: int, j: int, lam: float,
                        box: tuple[int, int, int, int] | None) -> None:
    """``out[i]`` from ``images[i]`` and its partner ``images[j]`` (``uint8 [B, H, W, C]``):
    copied when ``lam`` is 1, the partner's ``box`` (y1, y2, x1, x2) pasted when given,
    else blended with ``lam``."""
    if lam == 1.0:
        out[i] = images[i]
    elif box is not None:
        y1, y2, x1, x2 = box
        out[i] = images[i]
        out[i, y1:y2, x1:x2] = images[j, y1:y2, x1:x2]
    else:
        mixed = images[i].astype(np.float32) * lam + images[j].astype(np.float32) * (1.0 - lam)
        np.rint(mixed, out=mixed)
        out[i] = mixed.astype(np.uint8)

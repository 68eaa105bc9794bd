"""timm's ``FastCollateMixup`` per-sample step, shared by the benchmarks' timm-style baselines.

timm (``timm/data/mixup.py``, ``FastCollateMixup._mix_elem_collate`` and
``_mix_batch_collate``) collates a uint8 batch one sample at a time into an output it
allocates with ``torch.zeros``. Per sample: ``mixed = image``; unless lam is 1, a CutMix
sample is copied (``mixed.copy()``) and the partner's box pasted into the copy, a MixUp
sample is blended in float32 and rounded with ``np.rint``; then
``output[i].copy_(torch.from_numpy(mixed.astype(np.uint8)))``. ``astype`` copies even a
uint8 array, so a pasted sample is copied three times and an unmixed one twice. Written
here step for step (timm is not a dependency), so that both benchmarks compare against
the code timm runs.
"""

from __future__ import annotations

import numpy as np
import torch


def fast_collate_output(images: np.ndarray) -> torch.Tensor:
    """The output timm allocates for a batch of ``images``: ``torch.zeros`` of its shape, uint8."""
    return torch.zeros(images.shape, dtype=torch.uint8)


def fast_collate_sample(output: torch.Tensor, images: np.ndarray, i: int, j: int, lam: float,
                        box: tuple[int, int, int, int] | None) -> None:
    """``output[i]`` from ``images[i]`` and its partner ``images[j]`` (``uint8 [B, H, W, C]``), as
    timm writes it: the partner's ``box`` (y1, y2, x1, x2) pasted into a copy when given, else
    a blend with ``lam``; a sample whose ``lam`` is 1 is left as it is."""
    mixed = images[i]
    if lam != 1.0:
        if box is not None:
            y1, y2, x1, x2 = box
            mixed = mixed.copy()
            mixed[y1:y2, x1:x2] = images[j, y1:y2, x1:x2]
        else:
            mixed = mixed.astype(np.float32) * lam + images[j].astype(np.float32) * (1.0 - lam)
            np.rint(mixed, out=mixed)
    output[i].copy_(torch.from_numpy(mixed.astype(np.uint8)))

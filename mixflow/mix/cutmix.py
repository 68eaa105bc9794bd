"""CutMix: Yun et al., "CutMix: Regularization Strategy to Train Strong Classifiers
with Localizable Features", ICCV 2019.

Box with cut ratio ``sqrt(1-lam)`` (``cut_h = int(H*r)``, ``cut_w = int(W*r)``), centre
``(cy, cx)`` uniform over the image, rows ``[cy - cut_h//2, cy + (cut_h+1)//2)`` and
columns likewise (timm >= 1.0.29: an unclipped box is exactly ``cut_h x cut_w``, also for
odd sizes), clipped to the image; the partner's pixels are pasted inside. With
``correct_lam`` lam becomes ``1 - box_area/(H*W)`` after clipping (timm's default).
``minmax`` draws the box size uniformly in ``[min, max)`` of the image side instead
(timm ``cutmix_minmax``) and its corner uniformly over every position where it fits,
which always corrects lam.
"""

from __future__ import annotations

import numpy as np
import torch

from mixflow.mix.checks import check_mix_call
from mixflow.mix.lam import apply_prob, beta_lam, per_mode
from mixflow.mix.mask_ops import check_seg
from mixflow.mix.mixed_batch import MixedBatch
from mixflow.mix.ops import paste_boxes, spatial_dims
from mixflow.mix.pairing import partner_index


def cut_sizes(lam: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """``(cut_h, cut_w) = (int(H*r), int(W*r))`` with ``r = sqrt(1-lam)``, computed in ``lam``'s float
    dtype (timm's per-element lam is float32, its per-batch lam a Python float)."""
    ratio = np.sqrt(1.0 - np.asarray(lam))
    return (h * ratio).astype(np.int64), (w * ratio).astype(np.int64)


def centred_boxes(cy: np.ndarray, cx: np.ndarray, cut_h: np.ndarray, cut_w: np.ndarray,
                  h: int, w: int) -> np.ndarray:
    """``[B, 4]`` boxes ``(y1, y2, x1, x2)``: rows ``[cy - cut_h//2, cy + (cut_h+1)//2)``, columns
    likewise, clipped to the ``h x w`` image (timm >= 1.0.29 ``rand_bbox``)."""
    cy, cx, cut_h, cut_w = (np.asarray(v, dtype=np.int64) for v in (cy, cx, cut_h, cut_w))
    return np.stack(np.broadcast_arrays(np.clip(cy - cut_h // 2, 0, h), np.clip(cy + (cut_h + 1) // 2, 0, h),
                                        np.clip(cx - cut_w // 2, 0, w), np.clip(cx + (cut_w + 1) // 2, 0, w)),
                    axis=-1).reshape(-1, 4)


def check_minmax(minmax: tuple[float, float]) -> None:
    lo, hi = minmax
    if not 0 < lo < hi <= 1:
        raise ValueError(f"cutmix minmax must satisfy 0 < min < max <= 1, got {minmax}")


def cutmix_boxes(lam: np.ndarray, h: int, w: int, rng: np.random.Generator, mode: str, perm: np.ndarray,
                 minmax: tuple[float, float] | None = None) -> np.ndarray:
    """Boxes ``[B, 4]`` as ``(y1, y2, x1, x2)``, shared according to ``mode``. lam = 1 gives an empty box."""
    if minmax is not None:
        check_minmax(minmax)
        lo, hi = minmax
        cut_h = per_mode(lambda k: rng.integers(int(h * lo), int(h * hi), size=k), mode, perm)
        cut_w = per_mode(lambda k: rng.integers(int(w * lo), int(w * hi), size=k), mode, perm)
        y1 = per_mode(lambda k: rng.random(k), mode, perm)
        x1 = per_mode(lambda k: rng.random(k), mode, perm)
        y1 = np.floor(y1 * (h - cut_h + 1)).astype(np.int64)
        x1 = np.floor(x1 * (w - cut_w + 1)).astype(np.int64)
        boxes = np.stack([y1, y1 + cut_h, x1, x1 + cut_w], axis=1)
    else:
        cut_h, cut_w = cut_sizes(lam, h, w)
        cy = per_mode(lambda k: rng.integers(0, h, size=k), mode, perm)
        cx = per_mode(lambda k: rng.integers(0, w, size=k), mode, perm)
        boxes = centred_boxes(cy, cx, cut_h, cut_w, h, w)
    boxes[np.asarray(lam) >= 1.0] = 0
    return boxes.astype(np.int64)


def box_lam(boxes: np.ndarray, h: int, w: int) -> np.ndarray:
    """``1 - box_area/(H*W)``: the weight of the sample's own label after pasting."""
    area = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
    return 1.0 - area / float(h * w)


def cutmix(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, *, num_classes: int,
           alpha: float = 1.0, mode: str = "batch", pairing: str = "derangement", prob: float = 1.0,
           label_smoothing: float = 0.0, correct_lam: bool = True,
           minmax: tuple[float, float] | None = None, seg: torch.Tensor | None = None,
           layout: str = "auto") -> MixedBatch:
    """CutMix a batch (uint8 NHWC or float NCHW); ``seg`` (integer ``[B, H, W]``) gets the same boxes."""
    hd, wd = spatial_dims(x, layout)
    check_mix_call(x, y, num_classes, prob=prob, label_smoothing=label_smoothing, alpha=alpha)
    h, w = x.shape[hd], x.shape[wd]
    if seg is not None:
        check_seg(seg, len(x), (h, w))
    perm = partner_index(len(x), pairing, rng, mode)
    lam = apply_prob(beta_lam(alpha, mode, perm, rng), prob, mode, perm, rng)
    boxes = cutmix_boxes(lam, h, w, rng, mode, perm, minmax)
    if correct_lam or minmax is not None:
        lam = np.where(lam >= 1.0, 1.0, box_lam(boxes, h, w))
    perm_t = torch.as_tensor(perm, device=x.device)
    out = paste_boxes(x, perm_t, boxes, layout)
    mixed_seg = None if seg is None else paste_boxes(seg.unsqueeze(1), perm_t.to(seg.device), boxes, "NCHW")[:, 0]
    return MixedBatch(out, y, y[perm_t.to(y.device)], torch.as_tensor(lam, dtype=torch.float32),
                      perm_t, num_classes, label_smoothing, "cutmix", seg=mixed_seg)

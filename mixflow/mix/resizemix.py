"""ResizeMix: Qin et al., "ResizeMix: Mixing Data with Preserved Object Information and
True Labels", arXiv:2012.11101, 2020.

A scale ``tau ~ U(scope)`` (default ``(0.1, 0.8)``) gives a box of ``int(H*tau) x int(W*tau)``
at a uniformly random position inside the image; the *whole* partner image is resized
into the box (the object is preserved, not cropped), and ``lam = 1 - box_area/(H*W)``.

Resizing is one batched gather for every box size at once (no loop over samples). It
reproduces ``torch.nn.functional.interpolate`` exactly for ``interpolation="nearest"``
(the default, as in OpenMixup's reference ``resizemix``) and up to float rounding for
``"bilinear"`` (``align_corners=False``, no antialias). Segmentation masks are always
resized with nearest.
"""

from __future__ import annotations

import numpy as np
import torch

from mixflow.mix.buffer_pool import output_like
from mixflow.mix.checks import check_mix_call
from mixflow.mix.lam import apply_prob, per_mode
from mixflow.mix.mask_ops import check_seg
from mixflow.mix.mixed_batch import MixedBatch
from mixflow.mix.ops import spatial_dims
from mixflow.mix.pairing import partner_index

INTERPOLATIONS = ("nearest", "bilinear")


def resize_boxes(tau: np.ndarray, h: int, w: int, rng: np.random.Generator, mode: str,
                 perm: np.ndarray) -> np.ndarray:
    """Boxes ``[B, 4]`` as ``(y1, y2, x1, x2)`` of ``int(H*tau) x int(W*tau)``, placed inside the image."""
    bh = (h * tau).astype(np.int64)
    bw = (w * tau).astype(np.int64)
    y1 = np.floor(per_mode(lambda k: rng.random(k), mode, perm) * (h - bh + 1)).astype(np.int64)
    x1 = np.floor(per_mode(lambda k: rng.random(k), mode, perm) * (w - bw + 1)).astype(np.int64)
    return np.stack([y1, y1 + bh, x1, x1 + bw], axis=1)


def _source_rows(start: torch.Tensor, size: torch.Tensor, n: int, interpolation: str):
    """For output positions ``0..n-1`` along one axis of a box ``[start, start+size)`` that holds
    the whole input axis (length ``n``): whether each lies in the box, and where it reads from.

    Float32 arithmetic as in ATen's ``upsample_*`` kernels (``scale = in/out``); nearest gives
    the source index, bilinear the two neighbours and the weight of the second.
    """
    pos = torch.arange(n, device=start.device).view(1, n)
    start, size = start.view(-1, 1), size.view(-1, 1)
    inside = (pos >= start) & (pos < start + size)
    dst = (pos - start).clamp(min=0).to(torch.float32)
    scale = torch.full_like(dst[:, :1], float(n)) / size.clamp(min=1).to(torch.float32)
    if interpolation == "nearest":
        return inside, (dst * scale).floor().to(torch.int64).clamp_(max=n - 1)
    real = (scale * (dst + 0.5) - 0.5).clamp_(min=0)
    lo = real.to(torch.int64).clamp_(max=n - 1)  # positions past the box are masked out anyway
    hi = lo + (lo < n - 1).to(torch.int64)
    return inside, lo, hi, (real - lo).clamp_(0, 1)


def _gather(t: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``out[b, ..., i, ...] = t[b, ..., index[b, i], ...]`` along ``dim`` (``index`` is ``[B, t.shape[dim]]``)."""
    view = [1] * t.dim()
    view[0], view[dim] = index.shape
    return t.gather(dim, index.view(view).expand(t.shape))


def _weights(wt: torch.Tensor, dim: int, ndim: int, dtype: torch.dtype) -> torch.Tensor:
    view = [1] * ndim
    view[0], view[dim] = wt.shape
    return wt.view(view).to(dtype)


def paste_resized(x: torch.Tensor, perm: torch.Tensor, boxes: np.ndarray, hd: int, wd: int,
                  interpolation: str = "nearest") -> torch.Tensor:
    """``out[i]`` is ``x[i]`` with ``x[perm[i]]`` resized into box ``i`` (``(y1, y2, x1, x2)``)."""
    b = torch.as_tensor(boxes, device=x.device)
    h, w = x.shape[hd], x.shape[wd]
    rows = _source_rows(b[:, 0], b[:, 1] - b[:, 0], h, interpolation)
    cols = _source_rows(b[:, 2], b[:, 3] - b[:, 2], w, interpolation)
    if interpolation == "nearest" and x.device.type == "cpu" and x.dtype != torch.bfloat16:
        return _paste_nearest_per_sample(x, perm, boxes, rows[1].numpy(), cols[1].numpy(), hd)
    partner = x.index_select(0, perm)
    if interpolation == "nearest":
        resized = _gather(_gather(partner, hd, rows[1]), wd, cols[1])
    else:
        ct = x.dtype if x.is_floating_point() else torch.float32
        p = partner.to(ct)
        _, r0, r1, wr = rows
        _, c0, c1, wc = cols
        wr, wc = _weights(wr, hd, x.dim(), ct), _weights(wc, wd, x.dim(), ct)
        v = _gather(p, hd, r0).mul_(1 - wr).add_(_gather(p, hd, r1).mul_(wr))
        resized = _gather(v, wd, c0).mul_(1 - wc).add_(_gather(v, wd, c1).mul_(wc))
        if x.dtype == torch.uint8:
            resized = resized.round_().to(torch.uint8)
        else:
            resized = resized.to(x.dtype)
    inside = rows[0][:, :, None] & cols[0][:, None, :]
    inside = inside.unsqueeze(3) if hd == 1 else inside.unsqueeze(1)
    return torch.where(inside, resized, x)


def _paste_nearest_per_sample(x: torch.Tensor, perm: torch.Tensor, boxes: np.ndarray, src_rows: np.ndarray,
                              src_cols: np.ndarray, hd: int) -> torch.Tensor:
    """CPU, nearest: the same source rows / columns, read sample by sample for the box only
    (numpy views), instead of resizing every partner to the full image and selecting."""
    out = output_like(x)
    src, dst = x.detach().numpy(), out.numpy()
    for i, j in enumerate(perm.tolist()):
        dst[i] = src[i]
        y1, y2, x1, x2 = (int(v) for v in boxes[i])
        if y2 > y1 and x2 > x1:
            # two one-axis takes: several times faster than one two-axis fancy index
            resized = np.take(np.take(src[j], src_rows[i, y1:y2], axis=hd - 1), src_cols[i, x1:x2], axis=hd)
            if hd == 1:  # [H, W, C] samples
                dst[i, y1:y2, x1:x2] = resized
            else:  # [C, H, W] samples
                dst[i][:, y1:y2, x1:x2] = resized
    return out


def resizemix(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, *, num_classes: int,
              scope: tuple[float, float] = (0.1, 0.8), interpolation: str = "nearest", mode: str = "batch",
              pairing: str = "derangement", prob: float = 1.0, label_smoothing: float = 0.0,
              seg: torch.Tensor | None = None, layout: str = "auto") -> MixedBatch:
    """ResizeMix a batch (uint8 NHWC or float NCHW); ``mode`` decides which samples share tau and box."""
    check_mix_call(x, y, num_classes, prob=prob, label_smoothing=label_smoothing)
    lo, hi = scope
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"resizemix scope must satisfy 0 < min <= max <= 1, got {tuple(scope)}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}")
    hd, wd = spatial_dims(x, layout)
    h, w = x.shape[hd], x.shape[wd]
    if seg is not None:
        check_seg(seg, len(x), (h, w))
    perm = partner_index(len(x), pairing, rng, mode)
    tau = per_mode(lambda k: rng.uniform(lo, hi, size=k), mode, perm)
    boxes = resize_boxes(tau, h, w, rng, mode, perm)
    area = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
    lam = apply_prob(1.0 - area / float(h * w), prob, mode, perm, rng)
    boxes[lam >= 1.0] = 0
    perm_t = torch.as_tensor(perm, device=x.device)
    out = paste_resized(x, perm_t, boxes, hd, wd, interpolation)
    mixed_seg = None
    if seg is not None:
        mixed_seg = paste_resized(seg.unsqueeze(1), perm_t.to(seg.device), boxes, 2, 3).squeeze(1)
    return MixedBatch(out, y, y[perm_t.to(y.device)], torch.as_tensor(lam, dtype=torch.float32), perm_t,
                      num_classes, label_smoothing, "resizemix", seg=mixed_seg)

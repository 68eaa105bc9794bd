"""Batched tensor kernels shared by the mixing methods (no Python loop over samples).

Images are ``uint8 [B, H, W, C]`` (what decoders emit) or float ``[B, C, H, W]``
(what models eat); ``layout="auto"`` picks by dtype. uint8 is blended in float32,
rounded half-to-even and cast back (timm's FastCollateMixup rounds with ``np.rint``).
"""

from __future__ import annotations

import numpy as np
import torch

LAYOUTS = ("auto", "NHWC", "NCHW")


def spatial_dims(x: torch.Tensor, layout: str = "auto") -> tuple[int, int]:
    """Indices of the (H, W) dimensions of an image batch."""
    if x.dim() != 4:
        raise ValueError(f"expected an image batch with 4 dims, got shape {tuple(x.shape)}")
    if layout == "auto":
        layout = "NHWC" if x.dtype == torch.uint8 else "NCHW"
    if layout == "NHWC":
        return 1, 2
    if layout == "NCHW":
        return 2, 3
    raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def _view(lam: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return lam.view(-1, *([1] * (x.dim() - 1)))


# Blend this many float32 elements at a time: a cache-sized chunk instead of one
# batch-sized float temporary (whose page faults cost ~8x the arithmetic on CPU).
CHUNK_ELEMS = 1 << 19


def blend(x: torch.Tensor, perm: torch.Tensor, lam: np.ndarray) -> torch.Tensor:
    """``lam*x + (1-lam)*x[perm]`` in float32 with per-sample ``lam``; uint8 is rounded back.

    Returns ``x`` itself when every lam is 1. Works chunk by chunk over the batch.
    """
    lam = np.asarray(lam, dtype=np.float64)
    if np.all(lam == 1.0):
        return x
    out = torch.empty_like(x)
    step = max(1, CHUNK_ELEMS // max(1, x[0].numel()))
    uniform = bool(np.all(lam == lam[0]))
    weights = torch.as_tensor(lam, dtype=torch.float32, device=x.device)
    for i in range(0, len(x), step):
        j = min(len(x), i + step)
        partner = x.index_select(0, perm[i:j])
        w = weights[i] if uniform else _view(weights[i:j], x)
        # Two products then a sum (no fused multiply-add), so it equals the plain float reference.
        mixed = torch.mul(x[i:j], w).add_(partner.to(torch.float32).mul_(1 - w))
        out[i:j].copy_(mixed.round_() if x.dtype == torch.uint8 else mixed)
    return out


def paste_boxes(x: torch.Tensor, perm: torch.Tensor, boxes: np.ndarray, layout: str = "auto",
                base: torch.Tensor | None = None) -> torch.Tensor:
    """Copy ``x[perm[i]]`` into ``out[i]`` inside box ``(y1, y2, x1, x2)``; empty boxes copy nothing.

    ``base`` (default ``x``) is what lies outside the boxes.
    """
    hd, wd = spatial_dims(x, layout)
    base = x if base is None else base
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    if len(boxes) == 1 or np.all(boxes == boxes[0]):
        y1, y2, x1, x2 = (int(v) for v in boxes[0])
        out = base.clone()
        if y2 > y1 and x2 > x1:
            region = [slice(None)] * x.dim()
            region[hd], region[wd] = slice(y1, y2), slice(x1, x2)
            out[tuple(region)] = x.index_select(0, perm)[tuple(region)]
        return out
    h, w = x.shape[hd], x.shape[wd]
    b = torch.as_tensor(boxes, device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((rows >= b[:, 0, None, None]) & (rows < b[:, 1, None, None])
              & (cols >= b[:, 2, None, None]) & (cols < b[:, 3, None, None]))  # [B, H, W]
    inside = inside.unsqueeze(3) if hd == 1 else inside.unsqueeze(1)
    return torch.where(inside, x.index_select(0, perm), base)

"""Batched tensor kernels shared by the mixing methods.

Images are ``uint8 [B, H, W, C]`` (what decoders emit) or float ``[B, C, H, W]``
(what models eat); ``layout="auto"`` picks by dtype. uint8 is blended in float32,
rounded half-to-even and cast back (timm's FastCollateMixup rounds with ``np.rint``).
"""

from __future__ import annotations

import numpy as np
import torch

from mixflow.mix.huge_pages import empty_like

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


# Work on this many elements at a time: float32 temporaries of a cache-sized chunk
# instead of batch-sized ones (see :mod:`mixflow.mix.huge_pages` for what fresh
# batch-sized buffers cost on CPU).
CHUNK_ELEMS = 1 << 19


def blend(x: torch.Tensor, perm: torch.Tensor, lam: np.ndarray) -> torch.Tensor:
    """``lam*x + (1-lam)*x[perm]`` in float32 with per-sample ``lam``; uint8 is rounded back.

    Returns ``x`` itself when every lam is 1. Works chunk by chunk over the batch: a
    float32 batch is written straight into the output, other dtypes go through two
    chunk-sized float32 buffers. Two products then a sum (no fused multiply-add), so
    the result equals the plain float reference bit for bit.
    """
    lam = np.asarray(lam, dtype=np.float64)
    if np.all(lam == 1.0):
        return x
    out = empty_like(x)
    n = len(x)
    step = max(1, CHUNK_ELEMS // max(1, x[0].numel()))
    chunk = (min(step, n), *x.shape[1:])
    uniform = bool(np.all(lam == lam[0]))
    weights = torch.as_tensor(lam, dtype=torch.float32, device=x.device)
    partner = torch.empty(chunk, dtype=torch.float32, device=x.device)
    if x.dtype != torch.float32:
        own = torch.empty(chunk, dtype=torch.float32, device=x.device)
        picked = torch.empty(chunk, dtype=x.dtype, device=x.device)
        # float32 -> int16 -> uint8 is exact for rounded values in 0..255 and several
        # times faster on CPU than torch's direct float32 -> uint8 conversion.
        narrow = torch.empty(chunk, dtype=torch.int16, device=x.device) if x.dtype == torch.uint8 else None
    for i in range(0, n, step):
        j = min(n, i + step)
        k = j - i
        w = weights[i] if uniform else _view(weights[i:j], x)
        if x.dtype == torch.float32:
            other = torch.index_select(x, 0, perm[i:j], out=partner[:k]).mul_(1 - w)
            torch.mul(x[i:j], w, out=out[i:j]).add_(other)
            continue
        other = partner[:k].copy_(torch.index_select(x, 0, perm[i:j], out=picked[:k])).mul_(1 - w)
        mixed = own[:k].copy_(x[i:j]).mul_(w).add_(other)
        if not x.dtype.is_floating_point:
            mixed.round_()
        out[i:j].copy_(mixed if narrow is None else narrow[:k].copy_(mixed))
    return out


def paste_boxes(x: torch.Tensor, perm: torch.Tensor, boxes: np.ndarray, layout: str = "auto",
                base: torch.Tensor | None = None) -> torch.Tensor:
    """Copy ``x[perm[i]]`` into ``out[i]`` inside box ``(y1, y2, x1, x2)``; empty boxes copy nothing.

    ``base`` (default ``x``) is what lies outside the boxes; the output is a fresh batch.
    On CPU, ``base`` is copied a few MiB of samples at a time and each sample's box is
    pasted right after, while its rows are still in cache (slice copies through numpy
    views, whose per-call cost is a tenth of torch indexing). Elsewhere, one gather of the
    region for a box shared by the batch, or one masked select for per-sample boxes
    (one kernel instead of ``B``).
    """
    hd, wd = spatial_dims(x, layout)
    base = x if base is None else base
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    if len(boxes) == 1:
        boxes = np.broadcast_to(boxes, (len(x), 4))
    if x.device.type != "cpu":
        if not np.all(boxes == boxes[0]):
            return paste_boxes_masked(x, perm, boxes, hd, wd, base)
        out = base.clone()
        region = _region(x.dim(), hd, wd, boxes[0])
        if region is not None:
            out[region] = x[region].index_select(0, perm)
        return out
    out = empty_like(base)
    src, dst = _host_view(x), _host_view(out)
    source = perm.tolist()
    step = max(1, PASTE_CHUNK_BYTES // max(1, base[0].numel() * base.element_size()))
    for i in range(0, len(x), step):
        j = min(len(x), i + step)
        out[i:j].copy_(base[i:j])
        for k in range(i, j):
            region = _region(x.dim() - 1, hd - 1, wd - 1, boxes[k])
            if region is not None:
                dst[k][region] = src[source[k]][region]
    return out


# Copy this many bytes of samples before pasting their boxes (fits the shared cache).
PASTE_CHUNK_BYTES = 4 * 2**20


def _host_view(t: torch.Tensor):
    """A numpy view of a CPU tensor, or the tensor itself for dtypes numpy lacks (bfloat16)."""
    try:
        return t.detach().numpy()
    except TypeError:
        return t


def _region(ndim: int, hd: int, wd: int, box: np.ndarray) -> tuple[slice, ...] | None:
    """Index of box ``(y1, y2, x1, x2)`` over dims ``hd``/``wd`` of an ``ndim``-dim tensor; ``None`` if empty."""
    y1, y2, x1, x2 = (int(v) for v in box)
    if y2 <= y1 or x2 <= x1:
        return None
    region = [slice(None)] * ndim
    region[hd], region[wd] = slice(y1, y2), slice(x1, x2)
    return tuple(region)


def paste_boxes_masked(x: torch.Tensor, perm: torch.Tensor, boxes: np.ndarray, hd: int, wd: int,
                       base: torch.Tensor) -> torch.Tensor:
    """Per-sample boxes with one ``torch.where`` over the batch: ``base`` outside the boxes."""
    h, w = x.shape[hd], x.shape[wd]
    b = torch.as_tensor(boxes, device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((rows >= b[:, 0, None, None]) & (rows < b[:, 1, None, None])
              & (cols >= b[:, 2, None, None]) & (cols < b[:, 3, None, None]))  # [B, H, W]
    inside = inside.unsqueeze(3) if hd == 1 else inside.unsqueeze(1)
    return torch.where(inside, x.index_select(0, perm), base)

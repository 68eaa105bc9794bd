"""Tensor kernels shared by the mixing methods: blend, paste boxes, or one of the two per sample.

Images are ``uint8 [B, H, W, C]`` (what decoders emit) or float ``[B, C, H, W]``
(what models eat); ``layout="auto"`` picks by dtype. uint8 is blended in float32 with the
weights ``float32(lam)`` and ``float32(1-lam)`` (each rounded once, as timm does), rounded
half-to-even and cast back (timm's FastCollateMixup rounds with ``np.rint``).
Inputs are never modified; outputs are fresh batches, recycled from earlier calls where
nothing refers to them any more (:mod:`mixflow.mix.buffer_pool`). On CPU, contiguous
batches go through compiled single-pass loops (:mod:`mixflow.mix.cpu_kernels`: the blend
for uint8 and float32, memcpy rows for copies and boxes, any dtype); the rest through
torch ops a cache-sized chunk at a time, or numpy views one sample at a time.
``benchmarks/mixing_kernels.py`` measures them against timm- and torchvision-style
implementations.
"""

from __future__ import annotations

import numpy as np
import torch

from mixflow.mix import cpu_kernels
from mixflow.mix.buffer_pool import output_like
from mixflow.mix.checks import check_auto_layout

LAYOUTS = ("auto", "NHWC", "NCHW")


def spatial_dims(x: torch.Tensor, layout: str = "auto") -> tuple[int, int]:
    """Indices of the (H, W) dimensions of an image batch."""
    if x.dim() != 4:
        raise ValueError(f"expected an image batch with 4 dims, got shape {tuple(x.shape)}")
    if layout == "auto":
        check_auto_layout(x)  # a uint8 batch that looks NCHW is refused, not mixed as NHWC
        layout = "NHWC" if x.dtype == torch.uint8 else "NCHW"
    if layout == "NHWC":
        return 1, 2
    if layout == "NCHW":
        return 2, 3
    raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def _view(lam: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return lam.view(-1, *([1] * (x.dim() - 1)))


# Torch-op blends work on this many elements at a time: float32 temporaries of a
# cache-sized chunk instead of batch-sized ones.
CHUNK_ELEMS = 1 << 19


def blend(x: torch.Tensor, perm: torch.Tensor, lam: np.ndarray) -> torch.Tensor:
    """``lam*x + (1-lam)*x[perm]`` in float32 with per-sample ``lam``; uint8 is rounded back.

    The weights are ``float32(lam)`` and ``float32(1-lam)``, each rounded once from ``lam``
    (float64 here), as timm computes them: ``rint(float32(lam)*a + float32(1-lam)*b)``.

    Returns ``x`` itself when every lam is 1; samples with lam 1 are copied, not computed.
    Two products then a sum (no fused multiply-add), so the result equals the plain
    float reference bit for bit.
    """
    lam = np.asarray(lam, dtype=np.float64)
    rows = np.flatnonzero(lam != 1.0)
    if len(rows) == 0:
        return x
    out = output_like(x)
    copy_and_paste(x, perm, np.flatnonzero(lam == 1.0), out)
    blend_rows(x, perm, lam, rows, out)
    return out


def paste_boxes(x: torch.Tensor, perm: torch.Tensor, boxes: np.ndarray, layout: str = "auto",
                base: torch.Tensor | None = None) -> torch.Tensor:
    """Copy ``x[perm[i]]`` into ``out[i]`` inside box ``(y1, y2, x1, x2)``; empty boxes copy nothing.

    ``base`` (default ``x``) is what lies outside the boxes; the output is a fresh batch.
    On CPU see :func:`copy_and_paste`. Elsewhere, one gather of the region for a box
    shared by the batch, or one masked select for per-sample boxes (one kernel instead of ``B``).
    """
    hd, wd = spatial_dims(x, layout)
    base = x if base is None else base
    if base.shape != x.shape:
        raise ValueError(f"base must have the batch's shape {tuple(x.shape)}, got {tuple(base.shape)}")
    boxes = per_sample_boxes(boxes, len(x))
    cpu_kernels.check_boxes(boxes, x.shape[hd], x.shape[wd])
    if x.device.type != "cpu":
        if not np.all(boxes == boxes[0]):
            return paste_boxes_masked(x, perm, boxes, hd, wd, base)
        out = base.clone()
        region = _region(x.dim(), hd, wd, boxes[0])
        if region is not None:
            out[region] = x[region].index_select(0, perm)
        return out
    out = output_like(base)
    copy_and_paste(x, perm, np.arange(len(x)), out, base, boxes, hd, wd)
    return out


def blend_or_paste(x: torch.Tensor, perm: torch.Tensor, lam: np.ndarray, boxes: np.ndarray, cut: np.ndarray,
                   layout: str = "auto") -> torch.Tensor:
    """Per sample, CutMix or MixUp: where ``cut``, paste ``x[perm[i]]`` inside box ``i``, elsewhere
    :func:`blend` with ``lam[i]``; each sample is written once. Returns ``x`` itself when no
    sample changes (every box empty, every other lam 1)."""
    hd, wd = spatial_dims(x, layout)
    lam = np.asarray(lam, dtype=np.float64)
    cut = np.asarray(cut, dtype=bool)
    boxes = np.where(cut[:, None], per_sample_boxes(boxes, len(x)), 0)
    cpu_kernels.check_boxes(boxes, x.shape[hd], x.shape[wd])
    mixed = ~cut & (lam != 1.0)
    if not mixed.any() and not np.any((boxes[:, 1] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 2])):
        return x
    if x.device.type != "cpu":
        return paste_boxes(x, perm, boxes, layout, base=blend(x, perm, np.where(cut, 1.0, lam)))
    out = output_like(x)
    copy_and_paste(x, perm, np.flatnonzero(~mixed), out, x, boxes, hd, wd)
    blend_rows(x, perm, lam, np.flatnonzero(mixed), out)
    return out


def per_sample_boxes(boxes: np.ndarray, n: int) -> np.ndarray:
    """``[n, 4]`` int64 boxes from one box or one per sample."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    return np.broadcast_to(boxes, (n, 4)) if len(boxes) == 1 else boxes


def _host_view(t: torch.Tensor):
    """A numpy view of a CPU tensor, or the tensor itself for dtypes numpy lacks (bfloat16)."""
    try:
        return t.detach().numpy()
    except TypeError:
        return t


def copy_and_paste(x: torch.Tensor, perm: torch.Tensor, rows: np.ndarray, out: torch.Tensor,
                   base: torch.Tensor | None = None, boxes: np.ndarray | None = None,
                   hd: int = 0, wd: int = 0) -> None:
    """For ``i`` in ``rows``: ``out[i] = base[i]`` (default ``x``), then ``x[perm[i]]`` pasted inside
    ``boxes[i]`` (spatial dims ``hd``/``wd``) when boxes are given.

    On CPU, contiguous batches go through one compiled loop of memcpys that writes each
    element once (:func:`mixflow.mix.cpu_kernels.copy_and_paste`); other CPU batches
    sample by sample through numpy views. Elsewhere, plain copies are one ``index_copy_``.
    """
    if len(rows) == 0:
        return
    if x.device.type != "cpu" and boxes is None:
        index = torch.as_tensor(rows, device=x.device)
        out.index_copy_(0, index, (x if base is None else base).index_select(0, index))
        return
    base = x if base is None else base
    if cpu_kernels.fits(x, out, base, dtypes=None):
        cpu_kernels.copy_and_paste(x, perm, rows, out, base, boxes, hd, wd)
        return
    src, dst, below = _host_view(x), _host_view(out), _host_view(base)
    source = perm.tolist()
    if boxes is None:
        boxes = np.zeros((len(x), 4), np.int64)
    for i in rows.tolist():
        dst[i] = below[i]
        region = _region(x.dim() - 1, hd - 1, wd - 1, boxes[i])
        if region is not None:
            dst[i][region] = src[source[i]][region]


def blend_rows(x: torch.Tensor, perm: torch.Tensor, lam: np.ndarray, rows: np.ndarray, out: torch.Tensor) -> None:
    """``out[i] = lam[i]*x[i] + (1-lam[i])*x[perm[i]]`` for ``i`` in ``rows``.

    Contiguous uint8 and float32 batches on CPU: one fused pass
    (:func:`mixflow.mix.cpu_kernels.blend_rows`). Otherwise torch ops, a cache-sized chunk
    of rows at a time: a float32 batch is written straight into ``out`` where the rows are
    consecutive; other dtypes go through chunk-sized float32 buffers, are rounded
    (integers) and cast back by :func:`_store_rows`."""
    if len(rows) == 0:
        return
    if cpu_kernels.fits(x, out):
        cpu_kernels.blend_rows(x, perm, lam, rows, out)
        return
    step = max(1, CHUNK_ELEMS // max(1, x[0].numel()))
    chunk = (min(step, len(rows)), *x.shape[1:])
    uniform = bool(np.all(lam[rows] == lam[rows[0]]))
    own_w, partner_w = cpu_kernels.blend_weights(lam)
    weights = torch.as_tensor(own_w, device=x.device)
    partner_weights = torch.as_tensor(partner_w, device=x.device)
    partner = torch.empty(chunk, dtype=torch.float32, device=x.device)
    own = torch.empty(chunk, dtype=torch.float32, device=x.device)
    picked = torch.empty(chunk, dtype=x.dtype, device=x.device)
    gathered = torch.empty(chunk, dtype=x.dtype, device=x.device) if len(rows) < rows[-1] + 1 - rows[0] else None
    rows_t = torch.as_tensor(rows, device=x.device)
    for s in range(0, len(rows), step):
        lo, hi = int(rows[s]), int(rows[min(len(rows), s + step) - 1]) + 1
        k = min(step, len(rows) - s)
        consecutive = hi - lo == k
        index = slice(lo, hi) if consecutive else rows_t[s:s + k]
        w = weights[lo] if uniform else _view(weights[index], x)
        v = partner_weights[lo] if uniform else _view(partner_weights[index], x)
        mine = x[lo:hi] if consecutive else torch.index_select(x, 0, index, out=gathered[:k])
        other = torch.index_select(x, 0, perm[index], out=picked[:k])
        if x.dtype == torch.float32:
            mixed = torch.mul(mine, w, out=out[lo:hi] if consecutive else own[:k]).add_(other.mul_(v))
            if consecutive:
                continue
        else:
            mixed = own[:k].copy_(mine).mul_(w).add_(partner[:k].copy_(other).mul_(v))
            if not x.dtype.is_floating_point:
                mixed.round_()
        _store_rows(mixed, out, slice(lo, hi) if consecutive else rows[s:s + k])


def _store_rows(values: torch.Tensor, out: torch.Tensor, rows: slice | np.ndarray) -> None:
    """``out[rows] = values`` cast to ``out``'s dtype; ``rows`` a slice or scattered row indices.

    On CPU through numpy: its float32 -> uint8 cast is several times faster than torch's
    (and exact for the rounded values 0..255), and row copies beat ``index_copy_``.
    """
    src, dst = _host_view(values), _host_view(out)
    if isinstance(src, np.ndarray) and isinstance(dst, np.ndarray):
        if isinstance(rows, slice):
            np.copyto(dst[rows], src, casting="unsafe")
        else:
            for t, i in enumerate(rows.tolist()):
                np.copyto(dst[i], src[t], casting="unsafe")
    elif isinstance(rows, slice):
        out[rows].copy_(values)
    else:
        out.index_copy_(0, torch.as_tensor(rows, device=out.device), values.to(out.dtype))


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

"""Single-pass CPU loops for the mixing hot path (blend, box paste, mask select), compiled by numba.

Torch's CPU ops each make one pass over memory: an exact uint8 blend written as ops
(cast, multiply, cast, multiply, add, round, cast) is seven passes over the batch and
ran at a fifth of this machine's copy bandwidth. Here the whole per-element
computation is one loop that LLVM vectorises, so the blend runs at memory speed. Box
pastes and binary-mask selects copy each output run once (memcpy), from the sample or
its partner, without a Python call per sample or per run.

numba compiles without fast-math: no fused multiply-add and no reassociation, so
``w*a + v*b`` (both weights passed in, ``w = float32(lam)``, ``v = float32(1-lam)``, see
:func:`blend_weights`) is two rounded products and a rounded sum in float32, exactly what
torch's ``mul`` / ``add_`` give, and uint8 is rounded half-to-even (``np.rint``) like
:func:`mixflow.mix.ops.blend`'s reference. Compiled code is cached next to this file
(``cache=True``), so only the first process after an install compiles (about a second
per dtype).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

FUSED_DTYPES = (torch.uint8, torch.float32)


@numba.njit(cache=True, nogil=True)
def _blend_uint8(src, partner, w, v, rows, dst):  # pragma: no cover - compiled
    for r in rows:
        a, b, o = src[r], src[partner[r]], dst[r]
        wr, vr = w[r], v[r]
        for k in range(a.shape[0]):
            o[k] = np.uint8(np.rint(np.float32(a[k]) * wr + np.float32(b[k]) * vr))


@numba.njit(cache=True, nogil=True)
def _blend_float32(src, partner, w, v, rows, dst):  # pragma: no cover - compiled
    for r in rows:
        a, b, o = src[r], src[partner[r]], dst[r]
        wr, vr = w[r], v[r]
        for k in range(a.shape[0]):
            o[k] = a[k] * wr + b[k] * vr


@numba.njit(cache=True, nogil=True)
def _cycle_order(partner, rows):  # pragma: no cover - compiled
    # ``rows`` reordered along the cycles of ``partner``: i, partner[i], partner[partner[i]], ...
    wanted = np.zeros(partner.shape[0], np.bool_)
    wanted[rows] = True
    seen = np.zeros(partner.shape[0], np.bool_)
    order = np.empty(rows.shape[0], np.int64)
    k = 0
    for start in rows:
        i = start
        while not seen[i]:
            seen[i] = True
            if wanted[i]:
                order[k] = i
                k += 1
            i = partner[i]
    return order[:k]  # repeated rows appear once


@intrinsic
def _memcpy(typingctx, dst, dst_at, src, src_at, nbytes):
    """``dst[dst_at:dst_at+nbytes] = src[src_at:src_at+nbytes]`` for 1-d uint8 arrays, as one
    ``llvm.memcpy`` (libc's memcpy): numba's own slice copies run byte by byte."""
    if not all(isinstance(a, types.Array) and a.ndim == 1 and a.dtype == types.uint8 for a in (dst, src)):
        return None  # byte offsets into flat uint8 views only
    sig = types.void(dst, types.intp, src, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        d, da, s, sa, n = args
        to = context.make_array(signature.args[0])(context, builder, d)
        frm = context.make_array(signature.args[2])(context, builder, s)
        cgutils.raw_memcpy(builder, builder.gep(to.data, [da]), builder.gep(frm.data, [sa]), n, 1)
        return context.get_dummy_value()
    return sig, codegen


@numba.njit(cache=True, nogil=True)
def _copy_and_paste(src, below, partner, boxes, rows, dst, planes, height, row):  # pragma: no cover - compiled
    # flat byte arrays of samples [planes, height, row bytes]; box (y1, y2, byte q1, byte q2)
    sample = planes * height * row
    for r in rows:
        at, frm = r * sample, partner[r] * sample
        y1, y2, q1, q2 = boxes[r, 0], boxes[r, 1], boxes[r, 2], boxes[r, 3]
        if y2 <= y1 or q2 <= q1:
            _memcpy(dst, at, below, at, sample)
            continue
        for p in range(planes):
            plane = p * height * row
            _memcpy(dst, at + plane, below, at + plane, y1 * row)
            for h in range(y1, y2):
                o = plane + h * row
                _memcpy(dst, at + o, below, at + o, q1)
                _memcpy(dst, at + o + q1, src, frm + o + q1, q2 - q1)
                _memcpy(dst, at + o + q2, below, at + o + q2, row - q2)
            o = plane + y2 * row
            _memcpy(dst, at + o, below, at + o, (height - y2) * row)


@numba.njit(cache=True, nogil=True)
def _select(src, partner, keep, dst, positions, unit):  # pragma: no cover - compiled
    # flat byte arrays of samples [positions, unit bytes]; keep [1 or B, positions]: each run
    # of equal keep values is one memcpy from the sample (True) or its partner (False)
    sample = positions * unit
    for r in range(partner.shape[0]):
        mask = keep[0] if keep.shape[0] == 1 else keep[r]
        at, frm = r * sample, partner[r] * sample
        k = 0
        while k < positions:
            own = mask[k]
            end = k + 1
            while end < positions and mask[end] == own:
                end += 1
            _memcpy(dst, at + k * unit, src, (at if own else frm) + k * unit, (end - k) * unit)
            k = end


def _indices(perm: torch.Tensor, rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``perm`` and ``rows`` as int64 arrays, checked: the kernels do not bounds-check, so an index
    outside the batch would read or write outside it."""
    partner = np.ascontiguousarray(perm.detach().cpu().numpy(), dtype=np.int64)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if partner.shape != (n,) or (n and (partner.min() < 0 or partner.max() >= n)):
        raise ValueError(f"perm must hold {n} partner indices in 0..{n - 1}, got shape {partner.shape}"
                         + (f", values {partner.min()}..{partner.max()}" if partner.size else ""))
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"rows must be sample indices in 0..{n - 1}, got {rows.min()}..{rows.max()}")
    return partner, rows


def check_boxes(boxes: np.ndarray, h: int, w: int) -> None:
    """Every non-empty box ``(y1, y2, x1, x2)`` must lie inside the ``h`` x ``w`` image (an empty one,
    ``y2 <= y1`` or ``x2 <= x1``, pastes nothing wherever it is)."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    filled = (boxes[:, 1] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 2])
    outside = filled & ((boxes[:, 0] < 0) | (boxes[:, 1] > h) | (boxes[:, 2] < 0) | (boxes[:, 3] > w))
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise ValueError(f"box {i} (y1, y2, x1, x2) = {tuple(int(v) for v in boxes[i])} is outside the "
                         f"{h}x{w} image; clip boxes to 0 <= y1 < y2 <= {h}, 0 <= x1 < x2 <= {w}")


def fits(x: torch.Tensor, *others: torch.Tensor, dtypes: tuple = FUSED_DTYPES) -> bool:
    """Whether these kernels can run on ``x`` and ``others``: on CPU, contiguous, of one shape and
    dtype (one of ``dtypes``; ``None``: any), not tracked by autograd (the kernels write
    outside it; torch ops then keep the graph or refuse)."""
    return (x.device.type == "cpu" and (dtypes is None or x.dtype in dtypes) and x.numel() > 0
            and all(t.device == x.device and t.dtype == x.dtype and t.shape == x.shape and t.is_contiguous()
                    and not t.requires_grad for t in (x, *others)))


def _bytes(*tensors: torch.Tensor) -> list[np.ndarray]:
    """Flat uint8 numpy views of contiguous CPU tensors (any dtype, bfloat16 included)."""
    return [t.detach().reshape(-1).view(torch.uint8).numpy() for t in tensors]


def _check_batches(kernel: str, x: torch.Tensor, dtypes: tuple | None = None, **buffers: torch.Tensor) -> None:
    """The compiled loops index raw memory and trust every size: ``x`` and each buffer (``out``,
    ``base``) must be CPU tensors, contiguous, of ``x``'s shape and dtype (one of ``dtypes``),
    not tracked by autograd (the loops write outside it). A smaller ``out`` would be written
    past its end, a smaller ``base`` read past it."""
    for name, t in (("x", x), *buffers.items()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{kernel}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"{kernel}: {name} must be on the CPU, got device {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{kernel}: {name} must be contiguous (strides {t.stride()} for shape {tuple(t.shape)})")
        if t.requires_grad:
            raise ValueError(f"{kernel}: {name} must not require grad (the kernel writes outside autograd)")
        if name != "x" and (t.shape != x.shape or t.dtype != x.dtype):
            raise ValueError(f"{kernel}: {name} must have x's shape {tuple(x.shape)} and dtype {x.dtype}, "
                             f"got {tuple(t.shape)} {t.dtype}")
    if dtypes is not None and x.dtype not in dtypes:
        raise ValueError(f"{kernel}: x must be one of {', '.join(str(d) for d in dtypes)}, got {x.dtype}")


def copy_and_paste(x: torch.Tensor, perm: torch.Tensor, rows: np.ndarray, out: torch.Tensor, base: torch.Tensor,
                   boxes: np.ndarray | None, hd: int, wd: int) -> None:
    """For ``i`` in ``rows``: ``out[i] = base[i]`` outside box ``i`` (y1, y2, x1, x2 over dims
    ``hd``/``wd`` of a 4-dim NHWC or NCHW batch) and ``x[perm[i]]`` inside it, each byte written
    once with memcpy; any dtype. Without boxes, whole samples of any shape are copied."""
    _check_batches("copy_and_paste", x, out=out, base=base)
    n = len(x)
    if boxes is None:  # whole samples
        planes, height, row, boxes = 1, 1, x[0].numel(), np.zeros((n, 4), np.int64)
    elif x.dim() != 4 or (hd, wd) not in ((1, 2), (2, 3)):
        raise ValueError(f"boxes need a 4-dim NHWC or NCHW batch, got shape {tuple(x.shape)} with "
                         f"spatial dims {(hd, wd)}")
    else:
        boxes = np.array(boxes, dtype=np.int64).reshape(n, 4)
        check_boxes(boxes, x.shape[hd], x.shape[wd])  # empty boxes, wherever they are, copy only
        if (hd, wd) == (1, 2):  # NHWC: a row is W*C elements, the box spans x1*C .. x2*C
            planes, height, row = 1, x.shape[1], x.shape[2] * x.shape[3]
            boxes[:, 2:] *= x.shape[3]
        else:  # NCHW: C planes of H rows of W
            planes, height, row = x.shape[1], x.shape[2], x.shape[3]
    size = x.element_size()
    boxes[:, 2:] *= size
    partner, rows = _indices(perm, rows, n)
    src, below, dst = _bytes(x, base, out)
    _copy_and_paste(src, below, partner, boxes, rows, dst, planes, height, row * size)


def select_rows(x: torch.Tensor, perm: torch.Tensor, keep: torch.Tensor, out: torch.Tensor) -> None:
    """``out[i] = where(keep[i or 0], x[i], x[perm[i]])`` per spatial position for every sample of a
    channels-last batch; ``keep`` is bool ``[1 or B, *S]``; ``x`` and ``out`` as :func:`fits` requires."""
    _check_batches("select_rows", x, out=out)
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.device.type != "cpu" or keep.dim() < 2:
        raise ValueError(f"select_rows: keep must be a bool CPU tensor [1 or B, *S], got "
                         f"{getattr(keep, 'dtype', type(keep).__name__)} of shape {tuple(getattr(keep, 'shape', ()))}")
    n = len(x)
    positions = keep[0].numel() if len(keep) else 0
    if len(keep) not in (1, n) or positions == 0 or x[0].numel() % positions:
        raise ValueError(f"keep of shape {tuple(keep.shape)} does not fit a batch of shape {tuple(x.shape)}")
    partner, _ = _indices(perm, np.arange(0), n)
    src, dst = _bytes(x, out)
    mask = keep.detach().reshape(len(keep), positions).contiguous().numpy()
    _select(src, partner, mask, dst, positions, x[0].numel() // positions * x.element_size())


def blend_rows(x: torch.Tensor, perm: torch.Tensor, lam: np.ndarray, rows: np.ndarray, out: torch.Tensor) -> None:
    """``out[i] = float32(lam[i])*x[i] + float32(1-lam[i])*x[perm[i]]`` for ``i`` in ``rows``
    (uint8 rounded half-to-even); ``x`` and ``out`` as :func:`fits` requires.

    Both weights are rounded to float32 once from ``lam``'s own precision, as timm does
    (``float32(1-lam)``, not ``1-float32(lam)``): see :func:`blend_weights`."""
    _check_batches("blend_rows", x, FUSED_DTYPES, out=out)
    finite = np.isfinite(np.asarray(lam, dtype=np.float64).reshape(-1))
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"blend_rows: lam must be finite, got {np.asarray(lam).reshape(-1)[i]} at sample {i}")
    n = len(x)
    lam = np.asarray(lam)
    if lam.shape != (n,):
        raise ValueError(f"lam must hold one weight per sample ({n}), got shape {np.shape(lam)}")
    w, v = blend_weights(lam)
    partner, rows = _indices(perm, rows, n)
    src, dst = x.detach().numpy().reshape(n, -1), out.detach().numpy().reshape(n, -1)
    kernel = _blend_uint8 if x.dtype == torch.uint8 else _blend_float32
    # Along the pairing's cycles, a sample's partner is the next sample's own input and is
    # still in cache when that sample is mixed (15% faster on a float32 batch here).
    kernel(src, partner, w, v, _cycle_order(partner, rows), dst)


def blend_weights(lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(float32(lam), float32(1 - lam))``: the own and partner weights of a blend, each rounded to
    float32 once from ``lam``'s precision (timm's ``FastCollateMixup`` multiplies the float32
    pixels by the Python floats ``lam`` and ``1 - lam``). ``1 - float32(lam)`` can differ in the
    last bit and turn a uint8 result that lies just below a half into the next level up."""
    lam = np.asarray(lam)
    lam = lam if lam.dtype in (np.float32, np.float64) else lam.astype(np.float64)
    return (np.ascontiguousarray(lam, dtype=np.float32).reshape(-1),
            np.ascontiguousarray(1 - lam, dtype=np.float32).reshape(-1))


def warm_up() -> None:
    """Load (or compile) every kernel for every fused dtype now, on tiny batches.

    A process's first call of a numba kernel costs about half a second even when the
    compiled code is cached (numba initialises LLVM and reads the cache): long-lived
    mixing processes call this when they start, so that cost is not paid mid-stream.
    """
    perm, rows = torch.tensor([1, 0]), np.arange(2)
    for x in (torch.zeros(2, 4, 4, 3, dtype=torch.uint8), torch.zeros(2, 3, 4, 4)):
        out = torch.empty_like(x)
        blend_rows(x, perm, np.array([0.5, 0.25]), rows, out)
        hd, wd = (1, 2) if x.dtype == torch.uint8 else (2, 3)
        copy_and_paste(x, perm, rows, out, x, np.array([[0, 2, 1, 3]] * 2), hd, wd)
        if x.dtype == torch.uint8:
            select_rows(x, perm, torch.ones(1, 4, 4, dtype=torch.bool), out)

"""Applying per-pixel masks to a batch, and mixing segmentation masks with the same region.

A mask holds, per sample and per spatial position, the weight of the sample's *own*
content: 1 keeps ``x[i]``, 0 takes the partner ``x[perm[i]]``. Binary masks select
(exact for every dtype; on CPU, channels last, one memcpy per run of equal mask values,
:func:`mixflow.mix.cpu_kernels.select_rows`); soft masks blend in float32, and uint8 is
rounded half-to-even and cast back, like :func:`mixflow.mix.ops.blend`.

Inputs are channels-last (``uint8 [B, *S, C]``, what decoders emit) or channels-first
(float ``[B, C, *S]``, what models eat) with 1, 2 or 3 spatial dims ``S``;
``layout="auto"`` picks by dtype, as :func:`mixflow.mix.ops.spatial_dims` does for images.
"""

from __future__ import annotations

import torch

from mixflow.mix import cpu_kernels
from mixflow.mix.buffer_pool import output_like
from mixflow.mix.checks import check_auto_layout

CHANNELS_LAST = {3: "NLC", 4: "NHWC", 5: "NDHWC"}
CHANNELS_FIRST = {3: "NCL", 4: "NCHW", 5: "NCDHW"}


def channels_last(x: torch.Tensor, layout: str = "auto") -> bool:
    """Whether ``x`` keeps its channels in the last dim; checks ``layout`` against ``x.dim()``."""
    if x.dim() not in CHANNELS_LAST:
        raise ValueError(f"expected a batch with 1, 2 or 3 spatial dims plus batch and channel dims, "
                         f"got shape {tuple(x.shape)}")
    last, first = CHANNELS_LAST[x.dim()], CHANNELS_FIRST[x.dim()]
    if layout == "auto":
        check_auto_layout(x)  # a uint8 batch that looks channels-first is refused, not mixed as channels-last
        return x.dtype == torch.uint8
    if layout in (last, first):
        return layout == last
    raise ValueError(f"layout {layout!r} does not fit a {x.dim()}-dim batch; choose one of auto, {first}, {last}")


def spatial_shape(x: torch.Tensor, layout: str = "auto") -> tuple[int, ...]:
    """The spatial sizes ``S`` of a batch."""
    return tuple(x.shape[1:-1] if channels_last(x, layout) else x.shape[2:])


def apply_mask(x: torch.Tensor, perm: torch.Tensor, keep: torch.Tensor, layout: str = "auto") -> torch.Tensor:
    """``keep*x + (1-keep)*x[perm]`` per position; ``keep`` is ``[B or 1, *S]``, bool or float in [0, 1]."""
    last = channels_last(x, layout)
    # Channels last, a mask value covers C contiguous elements, which torch.where can only reach
    # through an expanded mask: memcpy runs win (4x on uint8 NHWC here). Channels first, runs are
    # short (cell-wide) and torch.where's vectorised select wins (2x on float32 NCHW).
    if (last and keep.dtype == torch.bool and keep.device.type == "cpu" and cpu_kernels.fits(x, dtypes=None)
            and len(keep) in (1, len(x)) and tuple(keep.shape[1:]) == spatial_shape(x, layout)):
        out = output_like(x)
        cpu_kernels.select_rows(x, perm, keep, out)
        return out
    keep = keep.unsqueeze(-1) if last else keep.unsqueeze(1)
    if keep.dtype == torch.bool and x.device.type == "cpu":
        return _select_per_sample(x, perm, keep)
    partner = x.index_select(0, perm)
    if keep.dtype == torch.bool:
        return torch.where(keep, x, partner)
    ct = x.dtype if x.is_floating_point() else torch.float32
    w = keep.to(ct)
    # Two products then a sum (no fused multiply-add), so it equals the plain float reference.
    mixed = torch.mul(x, w).add_(partner.to(ct).mul_(1 - w))
    return mixed.round_().to(torch.uint8) if x.dtype == torch.uint8 else mixed.to(x.dtype)


def _select_per_sample(x: torch.Tensor, perm: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """CPU, binary masks: one ``torch.where`` per sample into a fresh batch, no batch-sized partner
    copy; a mask that broadcasts over the last dim (channels-last) is expanded first, once per
    distinct mask, so the select runs on contiguous memory (a stride-0 inner dim is not vectorised)."""
    out = output_like(x)
    shared = len(keep) == 1
    full = None
    for i, j in enumerate(perm.tolist()):
        if full is None or not shared:
            full = keep[0 if shared else i]
            if full.shape[-1] != x.shape[-1]:
                full = full.expand(x.shape[1:]).contiguous()
        torch.where(full, x[i], x[j], out=out[i])
    return out


def check_seg(seg: torch.Tensor, n: int, spatial: tuple[int, ...]) -> None:
    """``seg`` must be an integer ``[B, *S]`` tensor matching the batch."""
    if seg.dtype.is_floating_point or seg.dtype.is_complex or seg.dtype == torch.bool:
        raise ValueError(f"seg must hold integer class ids, got dtype {seg.dtype}")
    if tuple(seg.shape) != (n, *spatial):
        raise ValueError(f"seg must have shape {(n, *spatial)} (batch, spatial dims of x), got {tuple(seg.shape)}")


def mix_seg(seg: torch.Tensor, perm: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Segmentation ids under the same mask: own id where ``keep`` (soft masks: ``keep >= 0.5``)."""
    if keep.dtype != torch.bool:
        keep = keep >= 0.5
    perm = perm.to(seg.device)
    return torch.where(keep.to(seg.device), seg, seg.index_select(0, perm))

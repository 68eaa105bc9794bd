"""Trainer-side helpers that finish what a model-side mixing method planned (pure torch).

The pipeline's methods draw every random choice and leave a plan in ``MixedBatch.plan``
(:mod:`mixflow.mix.plans`); these helpers need the model's outputs:

* TransMix (J.-N. Chen et al., CVPR 2022) — :func:`finish_transmix`: the CutMix sample's
  label weight becomes the average of the area lam and the class-attention mass outside
  the pasted box, ``lam = ratio*lam_area + (1-ratio)*lam_attn`` (ratio 0.5). ``lam_area`` is
  ``1 - box_area/(H*W)`` of the box actually pasted, whatever the batch's ``correct_lam``
  (as the official code computes it from the box).
* SMMix (M. Chen et al., ICCV 2023) — :func:`apply_smmix`: pastes the partner's
  most-attended ``side x side`` token window over the sample's least-attended one
  (attention of the *unmixed* images) and returns the per-token source mask for the
  fine-grained token labels; the image label keeps the area lam, as in the paper.
  :func:`smmix_consistency_target` is the target of its feature-consistency term.
* MixPro (Zhao et al., ICLR 2023) progressive attention labels — :func:`finish_mixpro`:
  ``lam' = a*lam_attn + (1-a)*lam`` with the progressive factor ``a`` = cosine similarity
  between the model's prediction and the area-based soft target (official code).
* Manifold mixup (Verma et al., ICML 2019) — :class:`ManifoldMixupHook` mixes the hidden
  state entering block ``layer`` of a sequence of blocks.

Attention maps are the class token's attention to the patch tokens of the last block,
``[B, N]`` or per head ``[B, heads, N]`` (averaged over heads), i.e. ``attn[:, :, 0, 1:]``
of a ViT attention matrix; they are detached, since a label is a target, not something
to optimise. Patch tokens are in row-major order on a ``gh x gw`` grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from mixflow.mix.mixed_batch import MixedBatch
from mixflow.mix.ops import spatial_dims
from mixflow.mix.plans import BoxPlan, LayerPlan, PatchMaskPlan, SideLengthPlan


def class_attention(attn: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` class-token attention (float32, detached) from ``[B, N]`` or ``[B, heads, N]``."""
    if attn.dim() == 3:
        attn = attn.mean(dim=1)
    if attn.dim() != 2:
        raise ValueError(f"attn must be [B, N] or [B, heads, N] (class token to patch tokens), "
                         f"got shape {tuple(attn.shape)}")
    return attn.detach().to(torch.float32)


def _plan(batch: MixedBatch, kind: type, helper: str):
    if not isinstance(batch.plan, kind):
        raise ValueError(f"{helper} needs a batch whose plan is a {kind.__name__} "
                         f"(method {batch.method!r} left {type(batch.plan).__name__})")
    return batch.plan


def token_grid(num_tokens: int, image_size: tuple[int, int]) -> tuple[int, int]:
    """``(gh, gw)`` with ``gh*gw = num_tokens`` and the image's aspect ratio."""
    h, w = image_size
    gh = max(1, round(math.sqrt(num_tokens * h / w)))
    gw = num_tokens // gh
    if gh * gw != num_tokens:
        raise ValueError(f"cannot lay {num_tokens} tokens on a grid with the aspect of a {h}x{w} image; "
                         f"pass grid=(gh, gw)")
    return gh, gw


def box_token_mask(boxes: torch.Tensor, image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """``[B, gh, gw]`` bool: tokens inside each ``(y1, y2, x1, x2)`` pixel box.

    Nearest-neighbour downsampling of the pixel mask, as TransMix does: token ``(r, c)``
    counts as pasted when pixel ``(floor(r*H/gh), floor(c*W/gw))`` lies in the box.
    """
    (h, w), (gh, gw) = image_size, grid
    b = boxes.to(torch.int64)
    rows = torch.arange(gh, device=b.device) * h // gh
    cols = torch.arange(gw, device=b.device) * w // gw
    in_rows = (rows >= b[:, 0:1]) & (rows < b[:, 1:2])
    in_cols = (cols >= b[:, 2:3]) & (cols < b[:, 3:4])
    return in_rows[:, :, None] & in_cols[:, None, :]


def attention_lam(attn: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Share of each row's attention mass on the sample's own tokens (``own [B, N]`` bool)."""
    a = class_attention(attn)
    own = own.reshape(a.shape).to(a.device)
    return (a * own).sum(dim=1) / a.sum(dim=1)


def transmix_lam(lam: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int], attn: torch.Tensor,
                 grid: tuple[int, int] | None = None, ratio: float = 0.5) -> torch.Tensor:
    """TransMix label weight of the sample's own class: ``ratio*lam_area + (1-ratio)*lam_attn`` with
    ``lam_area = 1 - box_area/(H*W)`` from ``boxes`` (not ``lam``: a batch drawn with
    ``correct_lam=False`` carries the uncorrected Beta lam, the official code always uses the
    box's area). Samples with an empty box (MixUp samples) keep ``lam``."""
    a = class_attention(attn)
    grid = grid or token_grid(a.shape[1], image_size)
    if grid[0] * grid[1] != a.shape[1]:
        raise ValueError(f"grid {grid} has {grid[0] * grid[1]} tokens but attn has {a.shape[1]}")
    boxes = boxes.to(a.device)
    pasted = box_token_mask(boxes, image_size, grid).flatten(1)
    lam_attn = attention_lam(a, ~pasted)
    lam = lam.to(a.device, torch.float32)
    has_box = (boxes[:, 1] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 2])
    h, w = image_size
    area = ((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])).to(torch.float64)
    lam_area = (1.0 - area / float(h * w)).to(torch.float32)
    return torch.where(has_box, ratio * lam_area + (1.0 - ratio) * lam_attn, lam)


def finish_transmix(batch: MixedBatch, attn: torch.Tensor, grid: tuple[int, int] | None = None,
                    ratio: float = 0.5) -> MixedBatch:
    """The batch with TransMix labels, from the attention of the forward pass on ``batch.x``."""
    plan = _plan(batch, BoxPlan, "finish_transmix")
    lam = transmix_lam(batch.lam, plan.boxes, plan.image_size, attn, grid, ratio)
    return replace(batch, lam=lam, plan=None)


def _to_patches(x: torch.Tensor, g: int, layout: str) -> torch.Tensor:
    hd, _ = spatial_dims(x, layout)
    b, p = len(x), x.shape[hd] // g
    if hd == 1:  # NHWC
        c = x.shape[3]
        return x.reshape(b, g, p, g, p, c).permute(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * c)
    c = x.shape[1]
    return x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)


def _from_patches(patches: torch.Tensor, like: torch.Tensor, g: int, layout: str) -> torch.Tensor:
    hd, _ = spatial_dims(like, layout)
    b, p = len(like), like.shape[hd] // g
    if hd == 1:
        c = like.shape[3]
        return patches.reshape(b, g, g, p, p, c).permute(0, 1, 3, 2, 4, 5).reshape(like.shape)
    c = like.shape[1]
    return patches.reshape(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(like.shape)


def smmix_windows(attn: torch.Tensor, side: int, grid: int, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left ``(row, col)`` ``[B, 2]`` of the sample's least-attended window and of its
    partner's most-attended window (window sums of ``side x side`` tokens; ties: first in row-major)."""
    a = class_attention(attn)
    if a.shape[1] != grid * grid:
        raise ValueError(f"attn has {a.shape[1]} tokens but the SMMix plan's grid is {grid}x{grid}")
    sums = F.unfold(a.view(-1, 1, grid, grid), side).sum(dim=1)  # [B, (grid-side+1)^2]
    m = grid - side + 1
    dst = sums.argmin(dim=1)
    src = sums.argmax(dim=1).index_select(0, perm.to(a.device))
    return torch.stack([dst // m, dst % m], 1), torch.stack([src // m, src % m], 1)


def apply_smmix(batch: MixedBatch, attn: torch.Tensor, layout: str = "auto") -> tuple[MixedBatch, torch.Tensor]:
    """Paste the partner's max-attention window over the sample's min-attention window.

    ``attn`` comes from a forward pass (no grad, eval mode in the official code) on the
    unmixed ``batch.x``. Returns the mixed batch (label: the area lam already in
    ``batch.lam``) and ``pasted [B, N]`` bool, True on tokens taken from the partner.
    """
    plan = _plan(batch, SideLengthPlan, "apply_smmix")
    x, g, s = batch.x, plan.grid, plan.side
    hd, wd = spatial_dims(x, layout)
    if x.shape[hd] != x.shape[wd] or x.shape[hd] % g:
        raise ValueError(f"image {x.shape[hd]}x{x.shape[wd]} is not a square multiple of the token grid {g}")
    n = len(x)
    dev = x.device
    perm = batch.perm.to(dev)
    dst, src = (t.to(dev) for t in smmix_windows(attn, s, g, perm))
    idx = torch.arange(g, device=dev)
    in_r = (idx >= dst[:, 0:1]) & (idx < dst[:, 0:1] + s)  # [B, g]
    in_c = (idx >= dst[:, 1:2]) & (idx < dst[:, 1:2] + s)
    inside = in_r[:, :, None] & in_c[:, None, :]  # [B, g, g]
    src_r = idx - dst[:, 0:1] + src[:, 0:1]
    src_c = idx - dst[:, 1:2] + src[:, 1:2]
    own_token = torch.arange(g * g, device=dev).view(1, g, g)
    token = torch.where(inside, src_r[:, :, None] * g + src_c[:, None, :], own_token).flatten(1)
    image = torch.where(inside, perm.view(n, 1, 1), torch.arange(n, device=dev).view(n, 1, 1)).flatten(1)
    patches = _to_patches(x, g, layout)
    out = _from_patches(patches[image, token], x, g, layout)
    return replace(batch, x=out, plan=None), inside.flatten(1)


def smmix_consistency_target(unmixed_logits: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``lam*z + (1-lam)*z[perm]``: the mixed prediction SMMix's consistency term (KL to the
    softmax of this target) pulls the mixed image's output towards; ``z`` from the unmixed images."""
    lam = lam.to(unmixed_logits.device, unmixed_logits.dtype).view(-1, 1)
    return lam * unmixed_logits + (1 - lam) * unmixed_logits.index_select(0, perm.to(unmixed_logits.device))


def progressive_factor(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """MixPro's ``a`` per sample: cosine similarity of ``softmax(logits)`` and the area-based soft
    target (low early in training, when attention is unreliable). Detached."""
    probs = F.softmax(logits.detach().to(torch.float32), dim=-1)
    return F.cosine_similarity(probs, targets.to(probs.device, torch.float32), dim=1)


def pal_lam(lam: torch.Tensor, lam_attn: torch.Tensor, a: torch.Tensor | float) -> torch.Tensor:
    """Progressive attention labeling: ``a*lam_attn + (1-a)*lam``."""
    return a * lam_attn + (1 - a) * lam.to(lam_attn.device, lam_attn.dtype)


def finish_mixpro(batch: MixedBatch, attn: torch.Tensor, logits: torch.Tensor) -> MixedBatch:
    """The batch with MixPro's progressive attention labels (``attn`` and ``logits`` of the forward on ``batch.x``)."""
    plan = _plan(batch, PatchMaskPlan, "finish_mixpro")
    keep = plan.keep.flatten(1)
    if keep.shape[1] != class_attention(attn).shape[1]:
        raise ValueError(f"the plan's mask has {keep.shape[1]} tokens but attn has {class_attention(attn).shape[1]}")
    lam_attn = attention_lam(attn, keep)
    a = progressive_factor(logits, batch.targets)
    return replace(batch, lam=pal_lam(batch.lam, lam_attn, a), plan=None)


def mix_hidden(h: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``lam*h + (1-lam)*h[perm]`` with per-sample ``lam [B]``."""
    w = lam.to(h.device, h.dtype).view(-1, *([1] * (h.dim() - 1)))
    return w * h + (1 - w) * h.index_select(0, perm.to(h.device))


class ManifoldMixupHook:
    """Mix the hidden state entering ``blocks[layer]`` (``layer`` from the batch's
    :class:`~mixflow.mix.plans.LayerPlan`; 0 mixes the input itself)::

        with ManifoldMixupHook(model.blocks, batch):   # any indexable sequence of modules,
            logits = model(batch.x)                    # e.g. an nn.Sequential
        loss = pair_cross_entropy(logits, batch.y_a, batch.y_b, batch.lam)

    The hidden state is mixed once per ``with`` block (the first call of that block);
    leaving the block without the layer having run is an error.
    """

    def __init__(self, blocks: Sequence[nn.Module], batch: MixedBatch):
        plan = _plan(batch, LayerPlan, "ManifoldMixupHook")
        if not 0 <= plan.layer < len(blocks):
            raise ValueError(f"manifold mixup layer {plan.layer} is not a block index 0..{len(blocks) - 1}")
        self.block = blocks[plan.layer]
        self.layer = plan.layer
        self.perm = batch.perm
        self.lam = batch.lam
        self.fired = False
        self._handle = None

    def _hook(self, module: nn.Module, args: tuple):
        if self.fired:
            return None
        self.fired = True
        return (mix_hidden(args[0], self.perm, self.lam), *args[1:])

    def __enter__(self) -> "ManifoldMixupHook":
        self.fired = False
        self._handle = self.block.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._handle.remove()
        if exc_type is None and not self.fired:
            raise RuntimeError(f"manifold mixup: block {self.layer} never ran inside the with-block")

"""MaskMix: Zhao et al., "MixPro: Data Augmentation with MaskMix and Progressive Attention
Labeling for Vision Transformer", ICLR 2023.

The image is cut into a grid of ``T = ceil(H/mask_patch) * ceil(W/mask_patch)`` cells
(``ceil(H/mask_patch)^2`` for square images). ``lam ~ Beta(alpha, alpha)``; each sample keeps
its own content in ``count = ceil(T*lam)`` cells chosen at random per sample, and takes the
partner's everywhere else; lam is re-quantised to ``count/T``. ``mask_patch`` is a multiple
of the model's ``patch_size`` and ``H``, ``W`` are multiples of ``patch_size``, so every
model patch (token) comes from exactly one image.

Defaults ``patch_size=14``, ``mask_patch=56`` are the official MixPro DeiT configs
(``deit_*_patch14_mask56_224``: a 4x4 grid at 224 px). The "16 / 56" sometimes quoted is not
valid (56 is no multiple of 16); for a patch-16 model pick ``mask_patch`` 32, 48, 64, ...
(OpenMixup's port uses 16 / 64, whose ``ceil`` leaves partial edge cells at 224 px; lam is
still ``count/T`` as in the reference code).

Progressive Attention Labeling (``lam' = a*lam_attn + (1-a)*lam``) needs the model's
attention, so the batch carries a :class:`~mixflow.mix.plans.PatchMaskPlan` with the
token-level mask (``[B, H/patch_size, W/patch_size]``) for the trainer-side helper.
"""

from __future__ import annotations

import numpy as np
import torch

from mixflow.mix.checks import check_mix_call
from mixflow.mix.grid_masks import cells_to_pixels, check_patch_grid, grid_shape, random_cells
from mixflow.mix.lam import apply_prob, beta_lam
from mixflow.mix.mask_ops import apply_mask, check_seg, mix_seg
from mixflow.mix.mixed_batch import MixedBatch
from mixflow.mix.ops import spatial_dims
from mixflow.mix.pairing import partner_index
from mixflow.mix.plans import PatchMaskPlan


def maskmix(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, *, num_classes: int,
            alpha: float = 1.0, patch_size: int = 14, mask_patch: int = 56, mode: str = "batch",
            pairing: str = "derangement", prob: float = 1.0, label_smoothing: float = 0.0,
            seg: torch.Tensor | None = None, layout: str = "auto") -> MixedBatch:
    """MaskMix a batch (uint8 NHWC or float NCHW). Cells are drawn per sample in every ``mode``;
    ``mode`` decides which samples share lam (and so the number of kept cells)."""
    check_mix_call(x, y, num_classes, prob=prob, label_smoothing=label_smoothing, alpha=alpha)
    hd, wd = spatial_dims(x, layout)
    h, w = x.shape[hd], x.shape[wd]
    check_patch_grid(h, w, patch_size, mask_patch)
    if seg is not None:
        check_seg(seg, len(x), (h, w))
    perm = partner_index(len(x), pairing, rng, mode)
    lam = apply_prob(beta_lam(alpha, mode, perm, rng), prob, mode, perm, rng)
    gh, gw = grid_shape(h, w, mask_patch)
    cells = gh * gw
    count = np.ceil(cells * lam).astype(np.int64)
    lam = count / cells
    keep_cells = torch.as_tensor(random_cells(count, gh, gw, rng), device=x.device)
    keep = cells_to_pixels(keep_cells, mask_patch, h, w)
    scale = mask_patch // patch_size
    token_keep = cells_to_pixels(keep_cells, scale, h // patch_size, w // patch_size)
    perm_t = torch.as_tensor(perm, device=x.device)
    out = apply_mask(x, perm_t, keep, "NHWC" if hd == 1 else "NCHW")
    return MixedBatch(out, y, y[perm_t.to(y.device)], torch.as_tensor(lam, dtype=torch.float32), perm_t,
                      num_classes, label_smoothing, "maskmix",
                      seg=None if seg is None else mix_seg(seg, perm_t, keep),
                      plan=PatchMaskPlan(token_keep))

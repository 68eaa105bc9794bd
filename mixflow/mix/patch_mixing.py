"""Patch Mixing: Lee et al., "Hardwiring ViT Patch Selectivity into CNNs using Patch
Mixing", arXiv:2306.17848, 2023.

The image is cut into the model's patch grid (``N = H*W / patch_size^2`` patches); a
random subset of ``N_1`` patches is replaced by the partner's patches at the same places,
and the label weight of the sample's own class is the fraction of patches kept,
``lam = (N - N_1)/N``. The paper treats the replaced proportion ``r = N_1/N`` as a
hyperparameter without fixing how it is drawn; here ``lam ~ Beta(alpha, alpha)`` (alpha 1:
``r`` uniform) and ``N - N_1 = round(lam*N)`` patches are kept, so lam is exactly the kept
fraction. ``patch_size`` 16 matches the 14x14 grid used for 224 px ConvNeXt / Swin.
"""

from __future__ import annotations

import numpy as np
import torch

from mixflow.mix.checks import check_mix_call
from mixflow.mix.grid_masks import cells_to_pixels, check_patch_grid, random_cells
from mixflow.mix.lam import apply_prob, beta_lam
from mixflow.mix.mask_ops import apply_mask, check_seg, mix_seg
from mixflow.mix.mixed_batch import MixedBatch
from mixflow.mix.ops import spatial_dims
from mixflow.mix.pairing import partner_index


def patch_mixing(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, *, num_classes: int,
                 alpha: float = 1.0, patch_size: int = 16, mode: str = "batch", pairing: str = "derangement",
                 prob: float = 1.0, label_smoothing: float = 0.0, seg: torch.Tensor | None = None,
                 layout: str = "auto") -> MixedBatch:
    """Patch-mix a batch (uint8 NHWC or float NCHW). Patches are drawn per sample in every ``mode``;
    ``mode`` decides which samples share lam (and so the number of kept patches)."""
    check_mix_call(x, y, num_classes, prob=prob, label_smoothing=label_smoothing, alpha=alpha)
    hd, wd = spatial_dims(x, layout)
    h, w = x.shape[hd], x.shape[wd]
    check_patch_grid(h, w, patch_size)
    if seg is not None:
        check_seg(seg, len(x), (h, w))
    perm = partner_index(len(x), pairing, rng, mode)
    lam = apply_prob(beta_lam(alpha, mode, perm, rng), prob, mode, perm, rng)
    gh, gw = h // patch_size, w // patch_size
    kept = np.rint(lam * gh * gw).astype(np.int64)
    lam = kept / (gh * gw)
    keep = cells_to_pixels(torch.as_tensor(random_cells(kept, gh, gw, rng), device=x.device), patch_size, h, w)
    perm_t = torch.as_tensor(perm, device=x.device)
    out = apply_mask(x, perm_t, keep, "NHWC" if hd == 1 else "NCHW")
    return MixedBatch(out, y, y[perm_t.to(y.device)], torch.as_tensor(lam, dtype=torch.float32), perm_t,
                      num_classes, label_smoothing, "patch_mixing",
                      seg=None if seg is None else mix_seg(seg, perm_t, keep))

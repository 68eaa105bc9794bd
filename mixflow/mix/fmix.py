"""FMix: Harris et al., "FMix: Enhancing Mixed Sample Data Augmentation", arXiv:2002.12047, 2020.

``lam ~ Beta(alpha, alpha)``; a low-frequency Fourier mask with mean lam (see
:mod:`mixflow.mix.fmix_masks`) keeps the sample's own content where it is 1 and shows the
partner's where it is 0: ``x = mask*x + (1-mask)*x[perm]``. The label weight is the mask's
mean (``round(lam*N)/N``). Defaults ``alpha=1``, ``decay_power=3`` follow the paper.

Batches may have 1, 2 or 3 spatial dims: ``[B, C, L]`` / ``[B, L, C]`` (audio, sequences),
images, ``[B, C, D, H, W]`` / ``[B, D, H, W, C]`` (volumes); ``layout="auto"`` takes uint8 as
channels-last and floats as channels-first. In ``batch`` mode one mask serves the whole
batch (as in the official code); ``pair`` shares a mask within each pairing cycle and
``elem`` draws one per sample, all in one batched FFT.
"""

from __future__ import annotations

import numpy as np
import torch

from mixflow.mix.checks import check_mix_call
from mixflow.mix.fmix_masks import sample_fmix_masks
from mixflow.mix.lam import apply_prob, beta_lam
from mixflow.mix.mask_ops import apply_mask, check_seg, mix_seg, spatial_shape
from mixflow.mix.mixed_batch import MixedBatch
from mixflow.mix.pairing import cycle_ids, partner_index


def mask_groups(mode: str, perm: np.ndarray) -> np.ndarray:
    """Which mask each sample uses: ``[B]`` ids ``0..k-1`` (one per batch, per pairing cycle, or per sample)."""
    n = len(perm)
    if mode == "batch":
        return np.zeros(n, dtype=np.int64)
    if mode == "elem":
        return np.arange(n)
    return np.unique(cycle_ids(perm), return_inverse=True)[1].reshape(-1)


def fmix(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, *, num_classes: int, alpha: float = 1.0,
         decay_power: float = 3.0, max_soft: float = 0.0, reference_spectrum: bool = False, mode: str = "batch",
         pairing: str = "derangement", prob: float = 1.0, label_smoothing: float = 0.0,
         seg: torch.Tensor | None = None, layout: str = "auto") -> MixedBatch:
    """FMix a batch; ``seg`` (integer ``[B, *S]``) follows the mask (soft masks: where it is >= 0.5)."""
    check_mix_call(x, y, num_classes, prob=prob, label_smoothing=label_smoothing, alpha=alpha)
    shape = spatial_shape(x, layout)
    if seg is not None:
        check_seg(seg, len(x), shape)
    if len(x) == 0:  # nothing to mix (and no mask to draw: an FFT of zero masks fails)
        empty = torch.zeros(0, dtype=torch.int64, device=x.device)
        return MixedBatch(x, y, y, torch.zeros(0, dtype=torch.float32), empty, num_classes, label_smoothing,
                          "fmix", seg=seg)
    perm = partner_index(len(x), pairing, rng, mode)
    lam = apply_prob(beta_lam(alpha, mode, perm, rng), prob, mode, perm, rng)
    groups = mask_groups(mode, perm)
    first = np.unique(groups, return_index=True)[1]
    masks, means = sample_fmix_masks(shape, lam[first], rng, decay_power=decay_power, max_soft=max_soft,
                                     reference_spectrum=reference_spectrum, device=x.device)
    keep = masks > 0.5 if max_soft == 0 else masks
    if mode != "batch":
        keep = keep.index_select(0, torch.as_tensor(groups, device=x.device))
    perm_t = torch.as_tensor(perm, device=x.device)
    out = apply_mask(x, perm_t, keep, layout)
    return MixedBatch(out, y, y[perm_t.to(y.device)], torch.as_tensor(means[groups], dtype=torch.float32), perm_t,
                      num_classes, label_smoothing, "fmix",
                      seg=None if seg is None else mix_seg(seg, perm_t, keep.expand(len(x), *shape)))

"""timm's ``Mixup`` recipe: MixUp or CutMix chosen per batch (or per element / pair).

DeiT (Touvron et al., "Training data-efficient image transformers & distillation
through attention", ICML 2021) trains with MixUp alpha 0.8 + CutMix alpha 1.0,
switch probability 0.5, label smoothing 0.1; timm ``timm/data/mixup.py`` is the
reference for the semantics kept here (``prob``, ``switch_prob``, ``mode``); the box bounds
are ``minmax`` as in :func:`mixflow.mix.cutmix.cutmix` and :func:`mixflow.mix.transmix.transmix`
(timm's ``cutmix_minmax``; :class:`mixflow.mix.timm_mixup.Mixup` takes timm's names and defaults).
"""

from __future__ import annotations

import numpy as np
import torch

from mixflow.mix.checks import check_fraction, check_mix_call
from mixflow.mix.cutmix import box_lam, cutmix, cutmix_boxes
from mixflow.mix.lam import apply_prob, beta_lam, per_mode
from mixflow.mix.mixed_batch import MixedBatch, unmixed
from mixflow.mix.mixup import mixup
from mixflow.mix.ops import blend_or_paste, spatial_dims
from mixflow.mix.pairing import partner_index


def mixup_cutmix(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, *, num_classes: int,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 minmax: tuple[float, float] | None = None, prob: float = 1.0,
                 switch_prob: float = 0.5, mode: str = "batch", pairing: str = "derangement",
                 label_smoothing: float = 0.0, correct_lam: bool = True, layout: str = "auto") -> MixedBatch:
    check_mix_call(x, y, num_classes, prob=prob, label_smoothing=label_smoothing, mixup_alpha=mixup_alpha,
                   cutmix_alpha=cutmix_alpha)
    check_fraction(switch_prob, "switch_prob")
    use_mixup = mixup_alpha > 0
    use_cutmix = cutmix_alpha > 0 or minmax is not None
    if use_cutmix:
        spatial_dims(x, layout)  # the layout is checked whichever method the batch draws
    if not (use_mixup or use_cutmix):
        raise ValueError("mixup_cutmix needs mixup_alpha > 0, cutmix_alpha > 0 or minmax")
    common = dict(num_classes=num_classes, mode=mode, pairing=pairing, label_smoothing=label_smoothing)
    if mode == "batch":
        if rng.random() >= prob:
            return unmixed(x, y, num_classes, label_smoothing)
        pick_cut = use_cutmix and (not use_mixup or rng.random() < switch_prob)
        if pick_cut:
            return cutmix(x, y, rng, alpha=cutmix_alpha if cutmix_alpha > 0 else 1.0, correct_lam=correct_lam,
                          minmax=minmax, layout=layout, **common)
        return mixup(x, y, rng, alpha=mixup_alpha, **common)

    # Per element / per pair: each group picks its own method and lam.
    hd, wd = spatial_dims(x, layout)
    h, w = x.shape[hd], x.shape[wd]
    perm = partner_index(len(x), pairing, rng, mode)
    if use_mixup and use_cutmix:
        cut = per_mode(lambda k: rng.random(k) < switch_prob, mode, perm).astype(bool)
    else:
        cut = np.full(len(x), use_cutmix)
    lam_mix = beta_lam(mixup_alpha, mode, perm, rng) if use_mixup else np.ones(len(x))
    lam_cut = beta_lam(cutmix_alpha, mode, perm, rng) if cutmix_alpha > 0 else np.full(len(x), 0.5)
    lam = apply_prob(np.where(cut, lam_cut, lam_mix), prob, mode, perm, rng)
    cut_lam = np.where(cut, lam, 1.0)
    boxes = cutmix_boxes(cut_lam, h, w, rng, mode, perm, minmax)
    if correct_lam or minmax is not None:
        lam = np.where(cut & (lam < 1.0), box_lam(boxes, h, w), lam)
    perm_t = torch.as_tensor(perm, device=x.device)
    out = blend_or_paste(x, perm_t, lam, boxes, cut, layout)
    return MixedBatch(out, y, y[perm_t.to(y.device)], torch.as_tensor(lam, dtype=torch.float32),
                      perm_t, num_classes, label_smoothing, "mixup_cutmix")

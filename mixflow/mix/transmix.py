"""TransMix: J.-N. Chen, Sun, He, Torr, Yuille and Bai, "TransMix: Attend to Mix for Vision
Transformers", CVPR 2022.

Pixels are mixed exactly as CutMix (box with cut ratio ``sqrt(1-lam)``, partner pasted
inside), alternating with MixUp per batch / element with ``switch_prob`` as in the
DeiT recipe TransMix trains with (mixup 0.8, cutmix 1.0, switch 0.5). The pipeline
emits the boxes in a :class:`~mixflow.mix.plans.BoxPlan`; on the trainer,
:func:`mixflow.train.mix_label_helpers.finish_transmix` re-weights the label of the
CutMix samples with the class attention of the mixed image (the attention mass outside
the pasted region, averaged with the area lam). MixUp samples carry an empty box and
keep their lam. Until the helper runs, ``lam`` is the CutMix area lam, so the batch is a
valid CutMix batch on its own.
"""

from __future__ import annotations

import numpy as np
import torch

from mixflow.mix.checks import check_fraction, check_mix_call
from mixflow.mix.cutmix import box_lam, cutmix_boxes
from mixflow.mix.lam import apply_prob, beta_lam, per_mode
from mixflow.mix.mixed_batch import MixedBatch
from mixflow.mix.ops import blend_or_paste, spatial_dims
from mixflow.mix.pairing import partner_index
from mixflow.mix.plans import BoxPlan


def transmix(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, *, num_classes: int,
             mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5,
             minmax: tuple[float, float] | None = None, prob: float = 1.0, mode: str = "batch",
             pairing: str = "derangement", label_smoothing: float = 0.0, correct_lam: bool = True,
             layout: str = "auto") -> MixedBatch:
    """CutMix (or MixUp, chosen with ``1 - switch_prob``) pixels plus the boxes for the attention label."""
    check_mix_call(x, y, num_classes, prob=prob, label_smoothing=label_smoothing, mixup_alpha=mixup_alpha,
                   cutmix_alpha=cutmix_alpha)
    check_fraction(switch_prob, "switch_prob")
    if not (cutmix_alpha > 0 or minmax is not None):
        raise ValueError("transmix needs cutmix_alpha > 0 or minmax: its attention label is defined on CutMix boxes")
    hd, wd = spatial_dims(x, layout)
    h, w = x.shape[hd], x.shape[wd]
    n = len(x)
    perm = partner_index(n, pairing, rng, mode)
    use_mixup = mixup_alpha > 0
    cut = (per_mode(lambda k: rng.random(k) < switch_prob, mode, perm).astype(bool) if use_mixup
           else np.ones(n, dtype=bool))
    lam_mix = beta_lam(mixup_alpha, mode, perm, rng) if use_mixup else np.ones(n)
    lam_cut = beta_lam(cutmix_alpha, mode, perm, rng) if cutmix_alpha > 0 else np.full(n, 0.5)
    lam = apply_prob(np.where(cut, lam_cut, lam_mix), prob, mode, perm, rng)
    boxes = cutmix_boxes(np.where(cut, lam, 1.0), h, w, rng, mode, perm, minmax)
    if correct_lam or minmax is not None:
        lam = np.where(cut & (lam < 1.0), box_lam(boxes, h, w), lam)
    perm_t = torch.as_tensor(perm, device=x.device)
    out = blend_or_paste(x, perm_t, lam, boxes, cut, layout)
    plan = BoxPlan(torch.as_tensor(boxes, device=x.device), (h, w))
    return MixedBatch(out, y, y[perm_t.to(y.device)], torch.as_tensor(lam, dtype=torch.float32),
                      perm_t, num_classes, label_smoothing, "transmix", plan=plan)

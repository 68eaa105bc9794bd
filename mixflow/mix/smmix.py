"""SMMix: Chen, Lin, Lin, Zhang, Chao and Ji, "SMMix: Self-Motivated Image Mixing for Vision
Transformers", ICCV 2023.

Max-min attention region mixing: on the token grid (``grid x grid``, 14 for a 224-pixel
DeiT with 16-pixel patches), the ``side x side`` window where the partner's attention is
*largest* is pasted over the window where the sample's attention is *smallest*; both
windows come from the model's class attention on the unmixed images. ``side`` is drawn
uniformly from ``int(grid*min_side_ratio) .. int(grid*max_side_ratio)`` (0.25 / 0.75),
one per batch, and the label weight is the area ``lam = 1 - side^2 / grid^2``. Batches
alternate with MixUp: SMMix with probability ``switch_prob`` (0.5), MixUp (alpha 0.8)
otherwise, as in the official code.

The windows depend on the model, so the pipeline only draws the side length and the
partner (:class:`~mixflow.mix.plans.SideLengthPlan`) and leaves ``x`` unmixed;
:func:`mixflow.train.mix_label_helpers.apply_smmix` pastes the windows on the trainer
and returns the token masks for SMMix's fine-grained (per-token) labels.
"""

from __future__ import annotations

import numpy as np
import torch

from mixflow.mix.checks import check_fraction, check_mix_call
from mixflow.mix.mixed_batch import MixedBatch, unmixed
from mixflow.mix.mixup import mixup
from mixflow.mix.ops import spatial_dims
from mixflow.mix.pairing import partner_index
from mixflow.mix.plans import SideLengthPlan


def smmix_sides(token_grid: int, min_side_ratio: float, max_side_ratio: float) -> range:
    """The window side lengths SMMix draws from (tokens)."""
    lo, hi = int(token_grid * min_side_ratio), int(token_grid * max_side_ratio)
    if not 1 <= lo <= hi <= token_grid:
        raise ValueError(f"SMMix side range int({token_grid}*min_side_ratio)..int({token_grid}*max_side_ratio) "
                         f"= {lo}..{hi} must satisfy 1 <= min <= max <= token_grid")
    return range(lo, hi + 1)


def smmix(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, *, num_classes: int,
          mixup_alpha: float = 0.8, switch_prob: float = 0.5, token_grid: int = 14,
          min_side_ratio: float = 0.25, max_side_ratio: float = 0.75, prob: float = 1.0,
          pairing: str = "derangement", label_smoothing: float = 0.0, layout: str = "auto") -> MixedBatch:
    """Per batch: an SMMix plan (``x`` unmixed) with probability ``switch_prob``, else MixUp."""
    check_mix_call(x, y, num_classes, prob=prob, label_smoothing=label_smoothing, mixup_alpha=mixup_alpha)
    check_fraction(switch_prob, "switch_prob")
    sides = smmix_sides(token_grid, min_side_ratio, max_side_ratio)
    hd, wd = spatial_dims(x, layout)
    h, w = x.shape[hd], x.shape[wd]
    if h != w or h % token_grid:
        raise ValueError(f"SMMix needs square images whose side is a multiple of token_grid={token_grid}, "
                         f"got {h}x{w}")
    if rng.random() >= prob:
        return unmixed(x, y, num_classes, label_smoothing)
    if mixup_alpha > 0 and rng.random() >= switch_prob:
        return mixup(x, y, rng, num_classes=num_classes, alpha=mixup_alpha, pairing=pairing,
                     label_smoothing=label_smoothing)
    side = int(rng.choice(sides))
    perm_t = torch.as_tensor(partner_index(len(x), pairing, rng), device=x.device)
    lam = torch.full((len(x),), 1.0 - side * side / float(token_grid * token_grid), dtype=torch.float32)
    return MixedBatch(x, y, y[perm_t.to(y.device)], lam, perm_t, num_classes, label_smoothing, "smmix",
                      plan=SideLengthPlan(side, token_grid))

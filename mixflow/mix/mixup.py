"""MixUp: Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018.

``x = lam*x + (1-lam)*x[perm]``, ``lam ~ Beta(alpha, alpha)``.
"""

from __future__ import annotations

import numpy as np
import torch

from mixflow.mix.checks import check_mix_call
from mixflow.mix.lam import apply_prob, beta_lam
from mixflow.mix.mixed_batch import MixedBatch
from mixflow.mix.ops import blend
from mixflow.mix.pairing import partner_index


def mixup(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, *, num_classes: int,
          alpha: float = 0.8, mode: str = "batch", pairing: str = "derangement", prob: float = 1.0,
          label_smoothing: float = 0.0) -> MixedBatch:
    """MixUp a batch. ``mode``: one lam per batch, per pair, or per element (see :mod:`mixflow.mix.lam`)."""
    check_mix_call(x, y, num_classes, prob=prob, label_smoothing=label_smoothing, alpha=alpha)
    perm = partner_index(len(x), pairing, rng, mode)
    lam = apply_prob(beta_lam(alpha, mode, perm, rng), prob, mode, perm, rng)
    perm_t = torch.as_tensor(perm, device=x.device)
    out = blend(x, perm_t, lam)
    return MixedBatch(out, y, y[perm_t.to(y.device)], torch.as_tensor(lam, dtype=torch.float32),
                      perm_t, num_classes, label_smoothing, "mixup")

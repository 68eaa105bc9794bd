"""Manifold Mixup: Verma, Lamb, Beckham, Najafi, Mitliagkas, Lopez-Paz and Bengio,
"Manifold Mixup: Better Representations by Interpolating Hidden States", ICML 2019.

Each step picks a layer ``k`` uniformly from the eligible ``layers`` (the paper uses
``{0, 1, 2}`` for PreAct ResNets, 0 being the input) and mixes the hidden states after
``k`` blocks, ``h = lam*h + (1-lam)*h[perm]``, with ``lam ~ Beta(alpha, alpha)``
(``alpha = 2.0`` in the paper's best runs); the label is mixed with the same lam.

The pipeline cannot reach hidden states: it draws ``(perm, lam, layer)``, leaves ``x``
unmixed and records the layer in a :class:`~mixflow.mix.plans.LayerPlan`; the label
(``y_a``, ``y_b``, ``lam``) is already final.
:class:`mixflow.train.mix_label_helpers.ManifoldMixupHook` mixes at the chosen layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mixflow.mix.checks import check_mix_call
from mixflow.mix.lam import apply_prob, beta_lam
from mixflow.mix.mixed_batch import MixedBatch
from mixflow.mix.pairing import partner_index
from mixflow.mix.plans import LayerPlan


def manifold_mixup(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, *, num_classes: int,
                   alpha: float = 2.0, layers: Sequence[int] = (0, 1, 2), mode: str = "batch",
                   pairing: str = "derangement", prob: float = 1.0, label_smoothing: float = 0.0) -> MixedBatch:
    """Draw ``(perm, lam, layer)``; ``x`` is returned unchanged."""
    check_mix_call(x, y, num_classes, prob=prob, label_smoothing=label_smoothing, alpha=alpha)
    if len(layers) == 0 or min(layers) < 0:
        raise ValueError(f"layers must be a non-empty list of block indices >= 0, got {list(layers)}")
    perm = partner_index(len(x), pairing, rng, mode)
    lam = apply_prob(beta_lam(alpha, mode, perm, rng), prob, mode, perm, rng)
    layer = int(layers[int(rng.integers(len(layers)))])
    perm_t = torch.as_tensor(perm, device=x.device)
    return MixedBatch(x, y, y[perm_t.to(y.device)], torch.as_tensor(lam, dtype=torch.float32), perm_t,
                      num_classes, label_smoothing, "manifold_mixup", plan=LayerPlan(layer))

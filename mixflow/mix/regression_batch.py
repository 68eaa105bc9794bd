"""The result of mixing a regression batch: inputs and continuous targets mixed linearly."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RegressionMixedBatch:
    """``x[i] = lam[i]*x_in[i] + (1-lam[i])*x_in[perm[i]]`` and ``y`` likewise.

    Regression targets have no classes, so there is no pair form: ``y`` already is the
    mixed target (``[B]`` or ``[B, D]``, float) that a regression loss (MSE, L1) compares
    against. ``perm[i]`` is the partner index inside the batch; unlike the classification
    methods it is not a permutation (C-Mixup draws each partner independently, so one
    sample can be the partner of several).
    """

    x: torch.Tensor
    y: torch.Tensor
    lam: torch.Tensor
    perm: torch.Tensor
    method: str = "none"

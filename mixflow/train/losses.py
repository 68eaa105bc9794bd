"""Losses for mixed batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross entropy against dense soft targets ``[B, C]`` (timm ``SoftTargetCrossEntropy``)."""
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()

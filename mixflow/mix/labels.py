"""Soft targets with label smoothing applied before mixing (timm ``mixup_target``)."""

from __future__ import annotations

import torch


def smooth_one_hot(y: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot rows with ``off = s/C`` everywhere and ``on = 1 - s + off`` at the label."""
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = y[(y < 0) | (y >= num_classes)][0].item()
        raise ValueError(f"label {bad} outside 0..{num_classes - 1}")
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    out = torch.full((len(y), num_classes), off, dtype=torch.float32, device=y.device)
    return out.scatter_(1, y.long().view(-1, 1), on)


def mix_targets(y_a: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor, num_classes: int,
                smoothing: float = 0.0) -> torch.Tensor:
    """``t = lam*onehot(y_a) + (1-lam)*onehot(y_b)``, per-sample ``lam``; rows sum to 1."""
    lam = lam.to(torch.float32).view(-1, 1).to(y_a.device)
    return lam * smooth_one_hot(y_a, num_classes, smoothing) + (1 - lam) * smooth_one_hot(y_b, num_classes, smoothing)

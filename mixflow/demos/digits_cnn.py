"""The digits demo's model: a LeNet-style CNN (LeCun et al., "Gradient-based learning applied to
document recognition", 1998) with batch norm, CPU-sized. Trained by :mod:`mixflow.demos.digits_loop`
(``trainer.model: digits_cnn``)."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """A LeNet-style CNN for 32x32 RGB inputs (the digits demo)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


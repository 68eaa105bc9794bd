"""The result of a batch mixing method: mixed inputs plus both label forms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mixflow.mix.labels import mix_targets


@dataclass
class MixedBatch:
    """``x`` mixed; sample ``i`` keeps weight ``lam[i]`` of label ``y_a[i]`` and ``1-lam[i]`` of ``y_b[i]``.

    ``perm[i]`` is the partner whose content was mixed into sample ``i``.
    ``targets`` is the dense soft-target form ``[B, C]`` (rows sum to 1).
    """

    x: torch.Tensor
    y_a: torch.Tensor
    y_b: torch.Tensor
    lam: torch.Tensor
    perm: torch.Tensor
    num_classes: int
    label_smoothing: float = 0.0
    method: str = "none"
    seg: torch.Tensor | None = None
    """Segmentation masks mixed with the same box / mask as ``x`` (when the method was given some)."""
    plan: Any = None
    """For methods whose label needs the model (TransMix, SMMix, MixPro attention labels, manifold
    mixup): what the trainer-side helper needs to finish the label."""

    @property
    def targets(self) -> torch.Tensor:
        return mix_targets(self.y_a, self.y_b, self.lam, self.num_classes, self.label_smoothing)


def unmixed(x: torch.Tensor, y: torch.Tensor, num_classes: int, label_smoothing: float = 0.0) -> MixedBatch:
    """A batch left as it is (lam = 1, every sample its own partner)."""
    n = len(y)
    return MixedBatch(x, y, y, torch.ones(n, dtype=torch.float32), torch.arange(n), num_classes,
                      label_smoothing, "none")

"""Label plans: what a model-side method leaves in ``MixedBatch.plan`` for the trainer.

Some methods cannot finish the label (or even the image) in the data pipeline because
they need the model under training: its attention map, or its hidden states. The
pipeline draws everything random (partner, lam, box, side length, layer) so the stream
stays seeded and reproducible, and records it in a plan; a helper in
:mod:`mixflow.train.mix_label_helpers` finishes the job on the trainer. The partner is
always ``MixedBatch.perm`` and the pipeline's lam is ``MixedBatch.lam``; a plan holds
only what comes on top.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BoxPlan:
    """TransMix: the CutMix boxes ``[B, 4]`` as ``(y1, y2, x1, x2)`` pixels (empty = not pasted)
    in images of ``image_size = (H, W)``. ``x`` is already mixed; the label waits for attention."""

    boxes: torch.Tensor
    image_size: tuple[int, int]


@dataclass(frozen=True)
class SideLengthPlan:
    """SMMix: paste a ``side x side`` token window of the partner into the sample, on a
    ``grid x grid`` token grid. ``x`` is *not* mixed yet: where the windows go depends on
    the model's attention over the unmixed images."""

    side: int
    grid: int


@dataclass(frozen=True)
class PatchMaskPlan:
    """MixPro (MaskMix + progressive attention labels): ``keep [B, gh, gw]`` bool on the
    model's token grid, True where the token comes from the sample itself."""

    keep: torch.Tensor


@dataclass(frozen=True)
class LayerPlan:
    """Manifold mixup: mix hidden states after ``layer`` blocks (0 = the input). ``x`` is unmixed."""

    layer: int

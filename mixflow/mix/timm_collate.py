"""A drop-in for ``timm.data.FastCollateMixup``: collate ``(image, label)`` samples and mix them.

MixUp (Zhang et al., ICLR 2018) / CutMix (Yun et al., ICCV 2019) while collating, as timm's
fast-collate loaders do: samples are uint8 images (``numpy`` arrays or tensors) and the batch
stays uint8 (blends are computed in float32, ``rint(float32(lam)*a + float32(1-lam)*b)``, and
rounded back). Constructor, defaults, draws and modes are :class:`mixflow.mix.timm_mixup.Mixup`'s
(timm's), plus timm's ``half`` mode (the first half of the batch is mixed with the second and
only it is returned). Use it as a ``DataLoader`` ``collate_fn``::

    collate = FastCollateMixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=1000)
    loader = DataLoader(dataset, batch_size=256, collate_fn=collate)   # -> (uint8 batch, soft target)

Samples may be ``C x H x W`` (timm's layout) or ``H x W x C`` (what PIL and most decoders give);
the batch keeps the samples' layout. :attr:`FastCollateMixup.layout` is ``"auto"``: ``CHW`` when the
first dim has 1, 3 or 4 entries, else ``HWC`` when the last has; set it to ``"CHW"`` or ``"HWC"``
for other channel counts.
"""

from __future__ import annotations

import numpy as np
import torch

from mixflow.mix.timm_mixup import TIMM_MODES, Mixup, timm_mixup_target

SAMPLE_LAYOUTS = ("auto", "CHW", "HWC")
CHANNEL_COUNTS = (1, 3, 4)


def sample_layout(shape: tuple[int, ...], layout: str = "auto") -> str:
    """``"CHW"`` or ``"HWC"`` for an image sample of ``shape``."""
    if len(shape) != 3:
        raise ValueError(f"expected image samples C x H x W or H x W x C, got shape {tuple(shape)}")
    if layout not in SAMPLE_LAYOUTS:
        raise ValueError(f"unknown sample layout {layout!r}; choose one of {', '.join(SAMPLE_LAYOUTS)}")
    if layout != "auto":
        return layout
    if shape[0] in CHANNEL_COUNTS:
        return "CHW"
    if shape[-1] in CHANNEL_COUNTS:
        return "HWC"
    raise ValueError(f"cannot tell the channel dim of a {tuple(shape)} sample; set .layout to 'CHW' or 'HWC'")


def stack_samples(images: list) -> torch.Tensor:
    """One batch tensor from numpy (uint8) or tensor samples of one shape."""
    if all(isinstance(im, torch.Tensor) for im in images):
        return torch.stack([im.detach().cpu() for im in images])
    if not all(isinstance(im, np.ndarray) for im in images):
        raise ValueError("samples must all be numpy arrays or all torch tensors")
    if any(im.dtype != np.uint8 for im in images):
        raise ValueError(f"numpy samples must be uint8 images, got {sorted({str(im.dtype) for im in images})}")
    return torch.from_numpy(np.stack(images))


class FastCollateMixup(Mixup):
    """``collate(batch) -> (images [B, ...] in the samples' dtype, soft targets [B, num_classes])``."""

    _modes = (*TIMM_MODES, "half")

    def __init__(self, mixup_alpha=1., cutmix_alpha=0., cutmix_minmax=None, prob=1.0, switch_prob=0.5,
                 mode='batch', correct_lam=True, label_smoothing=0.1, num_classes=1000):
        super().__init__(mixup_alpha, cutmix_alpha, cutmix_minmax, prob, switch_prob, mode, correct_lam,
                         label_smoothing, num_classes)
        self.layout = "auto"

    def __call__(self, batch, _=None) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(batch)
        if n % 2:
            raise ValueError(f"batch size should be even when using this (flip pairing), got {n}")
        x = stack_samples([sample[0] for sample in batch])
        layout = sample_layout(tuple(x.shape[1:]), self.layout)
        h, w = (x.shape[2], x.shape[3]) if layout == "CHW" else (x.shape[1], x.shape[2])
        target = torch.tensor([sample[1] for sample in batch], dtype=torch.int64)
        nchw = "NCHW" if layout == "CHW" else "NHWC"
        if self.mode == "half":  # timm: the first half mixed with the second (elem mode), only it returned
            k = n // 2
            lam, use_cutmix = self._params_per_elem(k)
            boxes = np.zeros((n, 4), dtype=np.int64)
            for i in range(k):
                if lam[i] != 1. and use_cutmix[i]:
                    boxes[i], lam[i] = self._box(h, w, lam[i])
            timm_lam = np.concatenate((lam, np.ones(k)))  # float64, as timm's
            cut = np.concatenate((use_cutmix, np.zeros(k, dtype=bool)))
            out = self._mix(x, nchw, timm_lam, boxes, cut)[:k]
            soft = timm_mixup_target(target, self.num_classes, torch.tensor(timm_lam).unsqueeze(1),
                                     self.label_smoothing, "cpu")
            return out.clone(), soft[:k]
        lam, boxes, cut, timm_lam = self._draw(n, h, w, collate=True)
        out = self._mix(x, nchw, lam, boxes, cut)
        if self.mode != "batch":  # timm: torch.tensor(lam_batch).unsqueeze(1), float32
            timm_lam = torch.tensor(timm_lam).unsqueeze(1)
        return out, timm_mixup_target(target, self.num_classes, timm_lam, self.label_smoothing, "cpu")

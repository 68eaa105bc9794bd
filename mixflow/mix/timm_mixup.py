"""A drop-in for ``timm.data.Mixup`` (timm 1.0.31): same constructor, defaults, draws and results.

MixUp: Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018. CutMix: Yun et al.,
"CutMix: Regularization Strategy to Train Strong Classifiers with Localizable Features",
ICCV 2019. Switching between the two per batch / pair / element is timm's recipe, the one DeiT
(Touvron et al., ICML 2021) trains with.

A timm user swaps one import::

    from mixflow.mix import Mixup          # was: from timm.data import Mixup
    mixup_fn = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=1000)
    x, target = mixup_fn(x, target)        # x [B, C, H, W], target [B] -> soft target [B, C]

What stays as in timm: the signature and defaults (``mixup_alpha=1``, ``cutmix_alpha=0``,
``label_smoothing=0.1``, ``num_classes=1000``), ``cutmix_minmax`` forcing ``cutmix_alpha = 1``,
the ``mixup_enabled`` switch, flip pairing (sample ``i`` mixes with ``B-1-i``; even batches
only), the ``batch`` / ``pair`` / ``elem`` modes, and every random draw, taken from numpy's
global random state in timm's order (``np.random.seed(s)`` before either gives the same
batch; set :attr:`Mixup.random_state` to a ``np.random.RandomState`` for a private stream).
The CutMix box is timm >= 1.0.29's (:func:`mixflow.mix.cutmix.centred_boxes`), the blend
``float32(lam)*a + float32(1-lam)*b`` (:func:`mixflow.mix.cpu_kernels.blend_weights`).

What differs: ``x`` is not modified in place; the mixed batch is returned (a new tensor, or
``x`` itself when nothing was mixed), computed by mixflow's kernels
(:func:`mixflow.mix.ops.blend_or_paste`). A uint8 batch is blended in float32 and rounded
half-to-even (timm's ``FastCollateMixup`` rule; timm's ``Mixup`` would truncate). Unknown
modes and unusable settings raise ``ValueError`` at construction instead of asserting later.
:class:`mixflow.mix.timm_collate.FastCollateMixup` is the collate form.
"""

from __future__ import annotations

import numpy as np
import torch

from mixflow.mix.cutmix import box_lam, centred_boxes, check_minmax, cut_sizes
from mixflow.mix.labels import smooth_one_hot
from mixflow.mix.ops import blend_or_paste

TIMM_MODES = ("batch", "pair", "elem")


def timm_mixup_target(target: torch.Tensor, num_classes: int, lam, smoothing: float, device) -> torch.Tensor:
    """timm ``mixup_target``: ``y1*lam + y2*(1-lam)`` with ``y2`` the flipped batch's smoothed one-hot
    rows; ``lam`` a float or ``[B, 1]`` tensor, in the dtype timm gives it (so the result is timm's)."""
    target = target.to(device)
    y1 = smooth_one_hot(target, num_classes, smoothing)
    y2 = smooth_one_hot(target.flip(0), num_classes, smoothing)
    return y1 * lam + y2 * (1. - lam)


class Mixup:
    """MixUp / CutMix with timm's per-batch, per-pair or per-element parameters (see the module doc).

    Args are timm's: ``mixup_alpha`` (MixUp on if > 0), ``cutmix_alpha`` (CutMix on if > 0),
    ``cutmix_minmax`` (box sides drawn in ``[min, max)`` of the image instead, CutMix on),
    ``prob`` (chance a batch / pair / element is mixed), ``switch_prob`` (chance of CutMix when
    both are on), ``mode`` (``batch``, ``pair`` or ``elem``), ``correct_lam`` (lam from the
    clipped box area), ``label_smoothing`` and ``num_classes`` of the soft target.
    """

    _modes = TIMM_MODES

    def __init__(self, mixup_alpha=1., cutmix_alpha=0., cutmix_minmax=None, prob=1.0, switch_prob=0.5,
                 mode='batch', correct_lam=True, label_smoothing=0.1, num_classes=1000):
        if not num_classes > 0:
            raise ValueError(f"num_classes must be set for target generation, got {num_classes}")
        if mode not in self._modes:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(self._modes)}")
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.cutmix_minmax = cutmix_minmax
        if cutmix_minmax is not None:
            if len(cutmix_minmax) != 2:
                raise ValueError(f"cutmix_minmax must be (min, max), got {cutmix_minmax}")
            check_minmax(cutmix_minmax)
            self.cutmix_alpha = 1.0  # as timm: minmax boxes, lam drawn only to choose "mixed or not"
        if not (mixup_alpha > 0 or self.cutmix_alpha > 0):
            raise ValueError("one of mixup_alpha > 0, cutmix_alpha > 0 or cutmix_minmax must be set")
        self.mix_prob = prob
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes
        self.mode = mode
        self.correct_lam = correct_lam
        self.mixup_enabled = True  # set to False to pass batches through unmixed (e.g. for the last epochs)
        self.random_state = np.random  # numpy's global legacy state, as timm; or a np.random.RandomState

    # ------------------------------------------------------------------ timm's draws, in timm's order

    def _params_per_elem(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``(lam float32 [n], use_cutmix bool [n])``: timm ``Mixup._params_per_elem``."""
        lam = np.ones(n, dtype=np.float32)
        use_cutmix = np.zeros(n, dtype=bool)
        if self.mixup_enabled:
            r = self.random_state
            if self.mixup_alpha > 0. and self.cutmix_alpha > 0.:
                use_cutmix = r.rand(n) < self.switch_prob
                lam_mix = np.where(use_cutmix, r.beta(self.cutmix_alpha, self.cutmix_alpha, size=n),
                                   r.beta(self.mixup_alpha, self.mixup_alpha, size=n))
            elif self.mixup_alpha > 0.:
                lam_mix = r.beta(self.mixup_alpha, self.mixup_alpha, size=n)
            else:
                use_cutmix = np.ones(n, dtype=bool)
                lam_mix = r.beta(self.cutmix_alpha, self.cutmix_alpha, size=n)
            lam = np.where(r.rand(n) < self.mix_prob, lam_mix.astype(np.float32), lam)
        return lam, use_cutmix

    def _params_per_batch(self) -> tuple[float, bool]:
        """``(lam, use_cutmix)`` for the whole batch: timm ``Mixup._params_per_batch``."""
        lam, use_cutmix = 1., False
        r = self.random_state
        if self.mixup_enabled and r.rand() < self.mix_prob:
            if self.mixup_alpha > 0. and self.cutmix_alpha > 0.:
                use_cutmix = bool(r.rand() < self.switch_prob)
                alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
                lam_mix = r.beta(alpha, alpha)
            elif self.mixup_alpha > 0.:
                lam_mix = r.beta(self.mixup_alpha, self.mixup_alpha)
            else:
                use_cutmix = True
                lam_mix = r.beta(self.cutmix_alpha, self.cutmix_alpha)
            lam = float(lam_mix)
        return lam, use_cutmix

    def _box(self, h: int, w: int, lam):
        """One box ``(y1, y2, x1, x2)`` and its lam: timm ``cutmix_bbox_and_lam`` (``lam`` keeps its
        dtype, float32 per element as in timm, so the box side is computed in the same precision)."""
        r = self.random_state
        if self.cutmix_minmax is not None:
            lo, hi = self.cutmix_minmax
            cut_h = r.randint(int(h * lo), int(h * hi))
            cut_w = r.randint(int(w * lo), int(w * hi))
            y1 = r.randint(0, h - cut_h + 1)  # every origin where the box fits (timm >= 1.0.29)
            x1 = r.randint(0, w - cut_w + 1)
            box = np.array([y1, y1 + cut_h, x1, x1 + cut_w], dtype=np.int64)
        else:
            cut_h, cut_w = cut_sizes(lam, h, w)
            cy = r.randint(0, h)
            cx = r.randint(0, w)
            box = centred_boxes(cy, cx, cut_h, cut_w, h, w)[0]
        if self.correct_lam or self.cutmix_minmax is not None:
            lam = box_lam(box[None], h, w)[0]
        return box, lam

    def _draw(self, n: int, h: int, w: int, collate: bool = False):
        """Per sample of a batch of ``n``: ``lam`` (float64), ``boxes [n, 4]``, ``cut [n]``, plus the
        lam timm hands to ``mixup_target`` (a float in batch mode, timm's float32 array otherwise).
        ``collate``: timm's collate draws the batch's box even for lam 1 (``Mixup`` does not)."""
        boxes = np.zeros((n, 4), dtype=np.int64)
        if self.mode == "batch":
            lam, use_cutmix = self._params_per_batch()
            if use_cutmix and (lam != 1. or collate):
                box, lam = self._box(h, w, lam)
                boxes[:] = box
            return np.full(n, float(lam)), boxes, np.full(n, use_cutmix), lam
        k = n // 2 if self.mode == "pair" else n
        lam, use_cutmix = self._params_per_elem(k)
        for i in range(k):
            if lam[i] != 1. and use_cutmix[i]:
                boxes[i], lam[i] = self._box(h, w, lam[i])
        if self.mode == "pair":  # sample B-1-i shares pair i's lam and box
            lam = np.concatenate((lam, lam[::-1]))
            boxes[k:] = boxes[:k][::-1]
            use_cutmix = np.concatenate((use_cutmix, use_cutmix[::-1]))
        return lam.astype(np.float64), boxes, use_cutmix, lam

    def _mix(self, x: torch.Tensor, layout: str, lam: np.ndarray, boxes: np.ndarray, cut: np.ndarray) -> torch.Tensor:
        flip = torch.arange(len(x) - 1, -1, -1, device=x.device)
        return blend_or_paste(x, flip, lam, boxes, cut, layout)

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix ``x`` (``[B, C, H, W]``, any float dtype or uint8; B even) and return it with the soft
        targets ``[B, num_classes]`` (on ``x``'s device)."""
        if x.dim() != 4:
            raise ValueError(f"expected an image batch [B, C, H, W], got shape {tuple(x.shape)}")
        if len(x) % 2:
            raise ValueError(f"batch size should be even when using this (flip pairing), got {len(x)}")
        if len(target) != len(x):
            raise ValueError(f"x has {len(x)} samples but target has {len(target)}")
        lam, boxes, cut, timm_lam = self._draw(len(x), x.shape[-2], x.shape[-1])
        out = self._mix(x, "NCHW", lam, boxes, cut)
        if self.mode != "batch":  # timm: torch.tensor(lam_batch, dtype=x.dtype).unsqueeze(1)
            dtype = x.dtype if x.is_floating_point() else torch.float32
            timm_lam = torch.tensor(timm_lam, device=x.device, dtype=dtype).unsqueeze(1)
        return out, timm_mixup_target(target, self.num_classes, timm_lam, self.label_smoothing, x.device)

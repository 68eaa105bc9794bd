"""MixUp / CutMix numerics equal current timm (1.0.31) exactly.

timm is not installed here: its rules are restated below as a reference (``rand_bbox``,
``rand_bbox_minmax``, ``cutmix_bbox_and_lam``, ``Mixup`` and the ``FastCollateMixup`` blend),
with the two rules this suite pins down:

* CutMix box (timm >= 1.0.29): rows ``[cy - cut_h//2, cy + (cut_h+1)//2)``, columns likewise,
  clipped; an unclipped box is exactly ``cut_h x cut_w`` (mixflow's old ``cy +- cut//2`` was one
  pixel short for odd sizes);
* uint8 blend: ``rint(float32(lam)*a + float32(1-lam)*b)``, the partner weight ``1-lam`` rounded
  to float32 once (mixflow's old ``1-float32(lam)`` rounds some values the other way).

mixflow's own methods are driven with forced draws (a stand-in for ``np.random.Generator``);
the timm-compatible :class:`mixflow.mix.Mixup` / :class:`mixflow.mix.FastCollateMixup` draw
from numpy's global state as timm does, so the reference runs with the same seed.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixflow.mix import FastCollateMixup, Mixup, cutmix, mixup, mixup_cutmix, transmix
from mixflow.mix import cpu_kernels, ops
from mixflow.mix.ops import blend
from mixflow.mix.plans import BoxPlan
from mixflow.train.losses import rankmixup_loss
from mixflow.train.mix_label_helpers import finish_transmix

C = 10
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# =========================================================================== timm 1.0.31, restated


def ref_rand_bbox(h, w, lam, cy, cx):
    """timm ``rand_bbox`` with its centre given: ``(yl, yh, xl, xh)``."""
    ratio = np.sqrt(1 - lam)
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    yl, yh = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + (cut_h + 1) // 2, 0, h)
    xl, xh = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + (cut_w + 1) // 2, 0, w)
    return int(yl), int(yh), int(xl), int(xh)


def ref_bbox_and_lam(h, w, lam, minmax=None, correct_lam=True):
    """timm ``cutmix_bbox_and_lam``, drawing from ``np.random`` in timm's order."""
    if minmax is not None:  # rand_bbox_minmax: sides, then every origin where the box fits
        cut_h = np.random.randint(int(h * minmax[0]), int(h * minmax[1]))
        cut_w = np.random.randint(int(w * minmax[0]), int(w * minmax[1]))
        yl = np.random.randint(0, h - cut_h + 1)
        xl = np.random.randint(0, w - cut_w + 1)
        box = (yl, yl + cut_h, xl, xl + cut_w)
    else:
        cy = np.random.randint(0, h)
        cx = np.random.randint(0, w)
        box = ref_rand_bbox(h, w, lam, cy, cx)
    if correct_lam or minmax is not None:
        lam = 1. - (box[1] - box[0]) * (box[3] - box[2]) / float(h * w)
    return box, lam


def ref_blend_uint8(a, b, lam):
    """timm ``FastCollateMixup`` blend of numpy uint8 images: float32, the Python-float weights, rint."""
    return np.rint(a.astype(np.float32) * lam + b.astype(np.float32) * (1 - lam)).astype(np.uint8)


def ref_target(target, num_classes, lam, smoothing):
    """timm ``mixup_target``: smoothed one-hot of the batch and of its flip, mixed by lam."""
    off = smoothing / num_classes
    on = 1. - smoothing + off
    full = torch.full((len(target), num_classes), off, device=target.device)
    y1 = full.clone().scatter_(1, target.long().view(-1, 1), on)
    y2 = full.clone().scatter_(1, target.flip(0).long().view(-1, 1), on)
    return y1 * lam + y2 * (1. - lam)


class TimmRef:
    """timm ``Mixup`` / ``FastCollateMixup`` semantics (draw order, dtypes, in-place updates)."""

    def __init__(self, mixup_alpha=1., cutmix_alpha=0., cutmix_minmax=None, prob=1.0, switch_prob=0.5,
                 mode='batch', correct_lam=True, label_smoothing=0.1, num_classes=1000):
        self.mixup_alpha, self.cutmix_alpha, self.minmax = mixup_alpha, cutmix_alpha, cutmix_minmax
        if cutmix_minmax is not None:
            self.cutmix_alpha = 1.0
        self.prob, self.switch_prob, self.mode, self.correct_lam = prob, switch_prob, mode, correct_lam
        self.smoothing, self.num_classes, self.enabled = label_smoothing, num_classes, True

    def elem_params(self, n):
        lam, use_cut = np.ones(n, dtype=np.float32), np.zeros(n, dtype=bool)
        if not self.enabled:
            return lam, use_cut
        m, c = self.mixup_alpha, self.cutmix_alpha
        if m > 0 and c > 0:
            use_cut = np.random.rand(n) < self.switch_prob
            cut_lam = np.random.beta(c, c, size=n)
            mix_lam = np.random.beta(m, m, size=n)
            drawn = np.where(use_cut, cut_lam, mix_lam)
        elif m > 0:
            drawn = np.random.beta(m, m, size=n)
        else:
            use_cut = np.ones(n, dtype=bool)
            drawn = np.random.beta(c, c, size=n)
        return np.where(np.random.rand(n) < self.prob, drawn.astype(np.float32), lam), use_cut

    def batch_params(self):
        if not (self.enabled and np.random.rand() < self.prob):
            return 1., False
        m, c = self.mixup_alpha, self.cutmix_alpha
        if m > 0 and c > 0:
            use_cut = np.random.rand() < self.switch_prob
            a = c if use_cut else m
            return float(np.random.beta(a, a)), use_cut
        if m > 0:
            return float(np.random.beta(m, m)), False
        return float(np.random.beta(c, c)), True

    def box(self, h, w, lam):
        return ref_bbox_and_lam(h, w, lam, self.minmax, self.correct_lam)

    def __call__(self, x, target):
        """timm ``Mixup.__call__`` on a float NCHW batch (mixed in place, as timm does)."""
        n, (h, w) = len(x), x.shape[-2:]
        if self.mode == "batch":
            lam, use_cut = self.batch_params()
            if lam != 1.:
                if use_cut:
                    (yl, yh, xl, xh), lam = self.box(h, w, lam)
                    x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
                else:
                    x_flipped = x.flip(0).mul_(1. - lam)
                    x.mul_(lam).add_(x_flipped)
        else:
            k = n // 2 if self.mode == "pair" else n
            lam_b, use_cut = self.elem_params(k)
            orig = x.clone()
            for i in range(k):
                j, lam = n - i - 1, lam_b[i]
                if lam == 1.:
                    continue
                if use_cut[i]:
                    (yl, yh, xl, xh), lam_b[i] = self.box(h, w, lam)
                    x[i][:, yl:yh, xl:xh] = orig[j][:, yl:yh, xl:xh]
                    if self.mode == "pair":
                        x[j][:, yl:yh, xl:xh] = orig[i][:, yl:yh, xl:xh]
                else:
                    x[i] = x[i] * lam + orig[j] * (1 - lam)
                    if self.mode == "pair":
                        x[j] = x[j] * lam + orig[i] * (1 - lam)
            if self.mode == "pair":
                lam_b = np.concatenate((lam_b, lam_b[::-1]))
            lam = torch.tensor(lam_b, dtype=x.dtype).unsqueeze(1)
        return x, ref_target(target, self.num_classes, lam, self.smoothing)

    def collate(self, batch):
        """timm ``FastCollateMixup.__call__`` on numpy uint8 CHW samples."""
        n = len(batch)
        half = self.mode == "half"
        out_n = n // 2 if half else n
        h, w = batch[0][0].shape[-2:]
        output = torch.zeros((out_n, *batch[0][0].shape), dtype=torch.uint8)
        if self.mode == "batch":
            lam, use_cut = self.batch_params()
            if use_cut:
                (yl, yh, xl, xh), lam = self.box(h, w, lam)
            for i in range(n):
                mixed = batch[i][0]
                if lam != 1.:
                    if use_cut:
                        mixed = mixed.copy()
                        mixed[:, yl:yh, xl:xh] = batch[n - i - 1][0][:, yl:yh, xl:xh]
                    else:
                        mixed = ref_blend_uint8(mixed, batch[n - i - 1][0], lam)
                output[i].copy_(torch.from_numpy(mixed.astype(np.uint8)))
        elif self.mode == "pair":
            lam_b, use_cut = self.elem_params(n // 2)
            for i in range(n // 2):
                j = n - i - 1
                lam, mi, mj = lam_b[i], batch[i][0].copy(), batch[j][0].copy()
                if lam < 1.:
                    if use_cut[i]:
                        (yl, yh, xl, xh), lam_b[i] = self.box(h, w, lam)
                        patch = mi[:, yl:yh, xl:xh].copy()
                        mi[:, yl:yh, xl:xh] = mj[:, yl:yh, xl:xh]
                        mj[:, yl:yh, xl:xh] = patch
                    else:
                        mi, mj = ref_blend_uint8(mi, mj, lam), ref_blend_uint8(mj, mi, lam)
                output[i].copy_(torch.from_numpy(mi))
                output[j].copy_(torch.from_numpy(mj))
            lam = torch.tensor(np.concatenate((lam_b, lam_b[::-1]))).unsqueeze(1)
        else:  # elem / half
            lam_b, use_cut = self.elem_params(out_n)
            for i in range(out_n):
                j, lam, mixed = n - i - 1, lam_b[i], batch[i][0].copy()
                if lam != 1.:
                    if use_cut[i]:
                        (yl, yh, xl, xh), lam_b[i] = self.box(h, w, lam)
                        mixed[:, yl:yh, xl:xh] = batch[j][0][:, yl:yh, xl:xh]
                    else:
                        mixed = ref_blend_uint8(mixed, batch[j][0], lam)
                output[i].copy_(torch.from_numpy(mixed))
            if half:
                lam_b = np.concatenate((lam_b, np.ones(out_n)))
            lam = torch.tensor(lam_b).unsqueeze(1)
        target = torch.tensor([b[1] for b in batch], dtype=torch.int64)
        return output, ref_target(target, self.num_classes, lam, self.smoothing)[:out_n]


# =========================================================================== forced draws


class Forced:
    """Stands in for ``np.random.Generator``: each call returns the next queued value(s)."""

    def __init__(self, **queues):
        self.queues = {k: list(v) for k, v in queues.items()}

    def _next(self, name, size):
        v = self.queues[name].pop(0)
        if size is None:
            return v
        return np.broadcast_to(np.asarray(v), (size,) if np.isscalar(size) else size).copy()

    def beta(self, a, b, size=None):
        return self._next("beta", size)

    def integers(self, lo, hi=None, size=None):
        v = self._next("integers", size)
        assert np.all((lo <= np.asarray(v)) & (np.asarray(v) < hi)), (lo, hi, v)
        return v

    def random(self, size=None):
        return self._next("random", size)

    def done(self):
        return all(not q for q in self.queues.values())


def two_images(h=224, w=224):
    """Sample 0 all zeros, sample 1 all ones (float NCHW): pasted pixels are the ones in sample 0."""
    return torch.stack([torch.zeros(3, h, w), torch.ones(3, h, w)])


def pasted(out0):
    m = out0[0] == 1
    assert torch.all((out0 == 1) == m.unsqueeze(0))
    return m


def box_of(mask):
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


# =========================================================================== CutMix box


def test_odd_cut_box_is_timms_19881_pixels_lam_0_603775():
    """lam 0.6 on 224x224, centre (112, 112): cut 141 (odd); timm pastes 141x141 = 19881 pixels,
    lam 1 - 19881/50176 = 0.603775 (the old ``cy +- cut//2`` pasted 140x140 = 19600, lam 0.609375)."""
    assert ref_rand_bbox(224, 224, 0.6, 112, 112) == (42, 183, 42, 183)
    y = torch.tensor([0, 1])
    draws = Forced(beta=[0.6], integers=[112, 112])
    mb = cutmix(two_images(), y, draws, num_classes=C, pairing="flip")
    assert draws.done()
    m = pasted(mb.x[0])
    assert int(m.sum()) == 19881 == 141 * 141
    assert box_of(m) == (42, 183, 42, 183)
    assert mb.lam[0].item() == np.float32(1 - 19881 / 50176) and abs(mb.lam[0].item() - 0.603775) < 1e-6
    # uncorrected lam keeps the draw; the box is the same
    mb = cutmix(two_images(), y, Forced(beta=[0.6], integers=[112, 112]), num_classes=C, pairing="flip",
                correct_lam=False)
    assert int(pasted(mb.x[0]).sum()) == 19881 and mb.lam[0].item() == np.float32(0.6)


@pytest.mark.parametrize("lam, cy, cx, h, w", [(0.6, 112, 112, 224, 224), (0.37, 0, 5, 15, 17), (0.9, 14, 16, 15, 17),
                                               (0.05, 7, 8, 15, 17), (0.5, 3, 12, 16, 16), (0.999, 5, 5, 31, 9)])
def test_cutmix_box_and_lam_equal_timm_for_forced_draws(lam, cy, cx, h, w):
    want = ref_rand_bbox(h, w, lam, cy, cx)
    want_lam = 1. - (want[1] - want[0]) * (want[3] - want[2]) / float(h * w)
    mb = cutmix(two_images(h, w), torch.tensor([0, 1]), Forced(beta=[lam], integers=[cy, cx]), num_classes=C,
                pairing="flip")
    m = pasted(mb.x[0])
    assert int(m.sum()) == (want[1] - want[0]) * (want[3] - want[2])
    if m.any():
        assert box_of(m) == want
    assert mb.lam[0].item() == np.float32(want_lam)
    # uint8 NHWC: the same box
    x8 = (two_images(h, w) * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    mb8 = cutmix(x8, torch.tensor([0, 1]), Forced(beta=[lam], integers=[cy, cx]), num_classes=C, pairing="flip")
    assert torch.equal(mb8.x[0, ..., 0] == 255, m)


def test_switcher_boxes_equal_timm_batch_and_elem():
    y = torch.tensor([0, 1])
    # batch: prob draw, switch draw (0.0 < 0.5: CutMix), lam, centre
    draws = Forced(random=[0.0, 0.0], beta=[0.6], integers=[112, 112])
    mb = mixup_cutmix(two_images(), y, draws, num_classes=C, pairing="flip")
    assert draws.done() and mb.method == "cutmix"
    assert box_of(pasted(mb.x[0])) == ref_rand_bbox(224, 224, 0.6, 112, 112)
    assert mb.lam[0].item() == np.float32(1 - 19881 / 50176)
    # elem: switch per sample, both lams, then the centres of the CutMix samples
    draws = Forced(random=[[0.0, 0.0]], beta=[[0.3, 0.3], [0.6, 0.45]], integers=[[112, 30], [112, 200]])
    mb = mixup_cutmix(two_images(), y, draws, num_classes=C, mode="elem", pairing="flip")
    assert draws.done()
    assert box_of(pasted(mb.x[0])) == ref_rand_bbox(224, 224, 0.6, 112, 112)
    want1 = ref_rand_bbox(224, 224, 0.45, 30, 200)
    assert box_of(mb.x[1, 0] == 0) == want1
    area1 = (want1[1] - want1[0]) * (want1[3] - want1[2])
    assert mb.lam.tolist() == [np.float32(1 - 19881 / 50176), np.float32(1 - area1 / 50176)]


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_transmix_emits_timms_box(mode):
    y = torch.tensor([0, 1])
    k = 1 if mode == "batch" else 2
    draws = Forced(random=[[0.0] * k], beta=[[0.3] * k, [0.6] * k], integers=[[112] * k, [112] * k])
    mb = transmix(two_images(), y, draws, num_classes=C, mode=mode, pairing="flip")
    assert draws.done()
    assert isinstance(mb.plan, BoxPlan)
    assert mb.plan.boxes.tolist() == [[42, 183, 42, 183]] * 2
    assert int(pasted(mb.x[0]).sum()) == 19881
    assert mb.lam.tolist() == [np.float32(1 - 19881 / 50176)] * 2


# =========================================================================== uint8 rounding

LAM = 0.18939403145651657  # 226*lam + 160*(1-lam) = 172.4999...: timm 172, 1-float32(lam) gives 173


def test_uint8_blend_rounds_like_timm_172_not_173(monkeypatch):
    own, partner = np.full((1, 1, 3), 226, np.uint8), np.full((1, 1, 3), 160, np.uint8)
    assert ref_blend_uint8(own, partner, LAM)[0, 0, 0] == 172
    assert np.rint(np.float32(226) * np.float32(LAM) + np.float32(160) * (1 - np.float32(LAM))) == 173
    x = torch.from_numpy(np.stack([own, partner]))  # uint8 NHWC [2, 1, 1, 3]
    flip = torch.tensor([1, 0])
    want = torch.from_numpy(np.stack([ref_blend_uint8(own, partner, LAM), ref_blend_uint8(partner, own, LAM)]))
    out = blend(x, flip, np.full(2, LAM))  # numba kernel
    assert out[0, 0, 0].tolist() == [172] * 3 and torch.equal(out, want)
    monkeypatch.setattr(ops.cpu_kernels, "fits", lambda *a, **k: False)  # the torch-op path
    assert torch.equal(blend(x, flip, np.full(2, LAM)), want)
    monkeypatch.undo()
    mb = mixup(x, torch.tensor([0, 1]), Forced(beta=[LAM]), num_classes=C, pairing="flip")
    assert torch.equal(mb.x, want)


def test_blend_weights_are_float32_of_lam_and_of_one_minus_lam():
    lam = np.array([LAM, 0.3, 0.7, 1 / 3])
    w, v = cpu_kernels.blend_weights(lam)
    assert w.dtype == v.dtype == np.float32
    assert np.array_equal(w, lam.astype(np.float32)) and np.array_equal(v, (1 - lam).astype(np.float32))
    # float32 batches get the same two products and one sum as timm's float Mixup
    x = torch.randn(4, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    flip = torch.arange(3, -1, -1)
    want = torch.stack([x[i] * np.float32(lam[i]) + x[3 - i] * np.float32(1 - lam[i]) for i in range(4)])
    assert torch.equal(blend(x, flip, lam), want)


def test_uint8_blend_equals_timm_over_many_lams():
    rng = np.random.default_rng(0)
    x = torch.randint(0, 256, (8, 6, 5, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    src = x.numpy()
    for _ in range(20):
        lam = rng.random(8)
        out = blend(x, torch.arange(7, -1, -1), lam).numpy()
        want = np.stack([ref_blend_uint8(src[i], src[7 - i], float(lam[i])) for i in range(8)])
        assert np.array_equal(out, want)


# =========================================================================== TransMix label

ATTN = torch.arange(1.0, 17.0)  # 4x4 token grid; token t has attention t+1 (total 136)


def official_transmix_own_weight(box, image_size, attn):
    """TransMix's ``transmix_label`` (official code) for one sample: ``lam0`` = pasted area share,
    ``lam1`` = attention share inside the (nearest-downsampled) box; own-label weight 1 - (lam0+lam1)/2."""
    h, w = image_size
    lam0 = (box[1] - box[0]) * (box[3] - box[2]) / (h * w)
    mask = torch.zeros(h, w)
    mask[box[0]:box[1], box[2]:box[3]] = 1
    mask = nn.Upsample(size=int(math.sqrt(attn.shape[1])))(mask[None, None]).int().view(1, -1)
    w1, w2 = torch.sum((1 - mask) * attn, dim=1), torch.sum(mask * attn, dim=1)
    lam1 = w2 / (w1 + w2)
    return 1. - (lam0 + lam1) / 2


def test_transmix_label_uses_the_pasted_area_even_without_lam_correction():
    x = two_images(16, 16)
    y = torch.tensor([0, 1])
    # CutMix only, lam 0.75 -> cut 8x8, centred on the corner: clipped to 4x4 (area lam 0.9375)
    mb = transmix(x, y, Forced(beta=[0.75], integers=[0, 0]), num_classes=C, mixup_alpha=0.0, pairing="flip",
                  correct_lam=False)
    assert mb.plan.boxes[0].tolist() == [0, 4, 0, 4]
    assert mb.lam[0].item() == 0.75  # uncorrected Beta lam
    attn = torch.stack([ATTN, ATTN.flip(0)])
    out = finish_transmix(mb, attn)
    official = official_transmix_own_weight((0, 4, 0, 4), (16, 16), attn[:1])
    torch.testing.assert_close(out.lam[0], official[0], rtol=0, atol=1e-7)
    assert abs(out.lam[0].item() - (0.5 * 0.9375 + 0.5 * 135 / 136)) < 1e-7  # 0.965074, not 0.871324
    # with correction the batch's lam is the area already: the same label
    mb2 = transmix(x, y, Forced(beta=[0.75], integers=[0, 0]), num_classes=C, mixup_alpha=0.0, pairing="flip")
    assert torch.equal(finish_transmix(mb2, attn).lam, out.lam)


# =========================================================================== RankMixup


def official_mrl(clean, mixed, target_re, margin=0.1):
    """RankMixup's ``RankMixup_MRL`` ranking term: rows whose mixed target has an entry 1 masked out,
    mean over every row."""
    keep = (target_re == 1.0).sum(dim=1) == 0
    diff = mixed.max(dim=1).values - clean.max(dim=1).values
    return (keep * F.relu(diff + margin)).mean()


def test_rankmixup_masks_samples_mixed_with_their_own_class():
    clean = torch.tensor([[2.0, 2.5, 0.0], [1.0, 0.0, 0.3], [2.5, 0.0, 0.1], [0.0, 1.0, 0.2]])
    mixed = torch.tensor([[1.0, 3.0, 0.0], [0.5, 2.2, 0.0], [0.0, 2.45, 0.2], [0.2, 0.1, 1.5]])
    y_a, y_b = torch.tensor([0, 1, 2, 1]), torch.tensor([1, 1, 0, 2])  # row 1: its own class
    lam = torch.tensor([0.7, 0.4, 0.6, 1.0])  # row 3: not mixed (lam 1)
    target_re = lam[:, None] * F.one_hot(y_a, 3) + (1 - lam[:, None]) * F.one_hot(y_b, 3)
    got = rankmixup_loss(mixed, clean, y_a, y_b, lam)
    torch.testing.assert_close(got, 0.1 * official_mrl(clean, mixed, target_re), rtol=0, atol=1e-7)
    # rows 0 and 2 only: gaps 0.6 and 0.05, averaged over all 4 rows
    torch.testing.assert_close(got, torch.tensor(0.1 * (0.6 + 0.05) / 4), rtol=0, atol=1e-7)
    # without lam only the same-class row is masked (row 3: 1.5 - 1.0 + 0.1 = 0.6)
    torch.testing.assert_close(rankmixup_loss(mixed, clean, y_a, y_b), torch.tensor(0.1 * (0.6 + 0.05 + 0.6) / 4))
    # the old behaviour: every row ranked (row 1: 2.2 - 1.0 + 0.1 = 1.3)
    torch.testing.assert_close(rankmixup_loss(mixed, clean, mask_same_class=False),
                               torch.tensor(0.1 * (0.6 + 1.3 + 0.05 + 0.6) / 4))
    with pytest.raises(ValueError, match="pass y_a and y_b"):
        rankmixup_loss(mixed, clean)


# =========================================================================== timm-compatible Mixup

CONFIGS = [
    dict(mixup_alpha=0.8, cutmix_alpha=1.0),
    dict(),  # timm's defaults: MixUp alpha 1 only
    dict(mixup_alpha=0.0, cutmix_alpha=1.0, correct_lam=False),
    dict(mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=(0.2, 0.8), prob=0.7, switch_prob=0.3),
    dict(mixup_alpha=0.4, cutmix_alpha=0.3, prob=0.6, label_smoothing=0.0),
]


def test_constructor_is_timms():
    params = inspect.signature(Mixup.__init__).parameters
    timm = dict(mixup_alpha=1., cutmix_alpha=0., cutmix_minmax=None, prob=1.0, switch_prob=0.5, mode='batch',
                correct_lam=True, label_smoothing=0.1, num_classes=1000)
    assert [p for p in params if p != "self"] == list(timm)
    assert {k: params[k].default for k in timm} == timm
    assert list(inspect.signature(FastCollateMixup.__init__).parameters) == list(params)
    m = Mixup()
    assert m.mixup_enabled is True and m.num_classes == 1000 and m.label_smoothing == 0.1
    assert Mixup(cutmix_minmax=(0.2, 0.8)).cutmix_alpha == 1.0  # timm forces it
    with pytest.raises(ValueError, match="unknown mode"):
        Mixup(mode="half")  # a collate-only mode
    with pytest.raises(ValueError, match="num_classes"):
        Mixup(num_classes=0)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_mixup_equals_timm_with_the_same_seed(mode, config):
    kw = dict(CONFIGS[config], mode=mode, num_classes=C)
    ours, ref = Mixup(**kw), TimmRef(**kw)
    x = torch.randn(8, 3, 15, 17, generator=torch.Generator().manual_seed(config))
    target = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    for seed in range(12):
        np.random.seed(seed)
        out, soft = ours(x, target)
        after_ours = np.random.get_state()
        np.random.seed(seed)
        want_x, want_t = ref(x.clone(), target)
        after_ref = np.random.get_state()
        assert np.array_equal(after_ours[1], after_ref[1]) and after_ours[2:] == after_ref[2:], "the same draws"
        assert torch.equal(out, want_x), f"seed {seed}"
        assert soft.dtype == want_t.dtype and torch.equal(soft, want_t), f"seed {seed}"
    assert torch.equal(x, torch.randn(8, 3, 15, 17, generator=torch.Generator().manual_seed(config)))


def test_mixup_disabled_passes_through_without_drawing():
    m = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=C)
    m.mixup_enabled = False
    x = torch.randn(4, 3, 8, 8)
    target = torch.tensor([0, 1, 2, 3])
    for mode in ("batch", "pair", "elem"):
        m.mode = mode
        np.random.seed(5)
        before = np.random.get_state()
        out, soft = m(x, target)
        after = np.random.get_state()
        assert np.array_equal(before[1], after[1]) and before[2:] == after[2:], "nothing drawn"
        assert torch.equal(out, x)
        torch.testing.assert_close(soft, ref_target(target, C, 1., 0.1), rtol=0, atol=0)


def test_mixup_private_random_state_and_odd_batch():
    m = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=C, mode="elem")
    m.random_state = np.random.RandomState(3)
    x, t = torch.randn(6, 3, 9, 9), torch.arange(6)
    a = m(x, t)
    m.random_state = np.random.RandomState(3)
    b = m(x, t)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="even"):
        m(x[:5], t[:5])


# =========================================================================== FastCollateMixup


def samples(n=8, shape=(3, 15, 17), seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, shape, dtype=np.uint8), int(rng.integers(0, C))) for _ in range(n)]


@pytest.mark.parametrize("mode", ["batch", "pair", "elem", "half"])
@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_collate_equals_timm_with_the_same_seed(mode, config):
    kw = dict(CONFIGS[config], mode=mode, num_classes=C)
    ours, ref = FastCollateMixup(**kw), TimmRef(**kw)
    batch = samples(seed=config)
    for seed in range(10):
        np.random.seed(seed)
        out, soft = ours(batch)
        np.random.seed(seed)
        want_x, want_t = ref.collate(batch)
        assert out.dtype == torch.uint8 and torch.equal(out, want_x), f"seed {seed}"
        assert soft.dtype == want_t.dtype and torch.equal(soft, want_t), f"seed {seed}"
        # tensor samples and H x W x C samples give the same batch (HWC stays HWC)
        np.random.seed(seed)
        assert torch.equal(ours([(torch.from_numpy(a), y) for a, y in batch])[0], want_x)
        np.random.seed(seed)
        hwc, soft_hwc = ours([(a.transpose(1, 2, 0).copy(), y) for a, y in batch])
        assert torch.equal(hwc.permute(0, 3, 1, 2), want_x) and torch.equal(soft_hwc, want_t)


def test_collate_uint8_rounding_example():
    own, partner = np.full((3, 2, 2), 226, np.uint8), np.full((3, 2, 2), 160, np.uint8)

    class OneLam:  # MixUp only, lam forced through the draws of timm's batch mode
        def rand(self, *a):
            return 0.0

        def beta(self, *a, **k):
            return LAM

    collate = FastCollateMixup(num_classes=C)
    collate.random_state = OneLam()
    out, soft = collate([(own, 0), (partner, 1)])
    assert out[0].unique().tolist() == [172]
    assert out[1].unique().tolist() == [ref_blend_uint8(partner, own, LAM)[0, 0, 0]]
    torch.testing.assert_close(soft, ref_target(torch.tensor([0, 1]), C, LAM, 0.1), rtol=0, atol=0)


def test_collate_disabled_and_layout_errors():
    c = FastCollateMixup(num_classes=C, mode="elem")
    c.mixup_enabled = False
    batch = samples(4)
    out, soft = c(batch)
    assert torch.equal(out, torch.from_numpy(np.stack([a for a, _ in batch])))
    torch.testing.assert_close(soft, ref_target(torch.tensor([y for _, y in batch]), C, 1., 0.1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="set .layout"):
        c([(np.zeros((5, 6, 7), np.uint8), 0)] * 2)
    c.layout = "CHW"
    assert c([(np.zeros((5, 6, 7), np.uint8), 0)] * 2)[0].shape == (2, 5, 6, 7)
    with pytest.raises(ValueError, match="uint8"):
        c([(np.zeros((3, 6, 7), np.float32), 0)] * 2)
    with pytest.raises(ValueError, match="even"):
        c(batch[:3])


# =========================================================================== CUDA


@cuda
@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_mixup_on_cuda_equals_timm(mode):
    kw = dict(CONFIGS[0], mode=mode, num_classes=C)
    x = torch.randn(8, 3, 15, 17, generator=torch.Generator().manual_seed(0)).cuda()
    target = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6]).cuda()
    for seed in range(12):
        np.random.seed(seed)
        out, soft = Mixup(**kw)(x, target)
        np.random.seed(seed)
        want_x, want_t = TimmRef(**kw)(x.clone(), target)
        assert out.is_cuda and soft.is_cuda
        assert torch.equal(out, want_x) and torch.equal(soft, want_t), f"seed {seed}"


@cuda
def test_uint8_blend_and_box_on_cuda():
    x = torch.tensor([226, 160], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 1, 3).contiguous().cuda()
    assert blend(x, torch.tensor([1, 0]).cuda(), np.full(2, LAM))[0].flatten().tolist() == [172] * 3
    mb = cutmix(two_images().cuda(), torch.tensor([0, 1]).cuda(), Forced(beta=[0.6], integers=[112, 112]),
                num_classes=C, pairing="flip")
    assert int(pasted(mb.x[0]).sum()) == 19881

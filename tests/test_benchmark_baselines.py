"""The mixing benchmark's uint8 baselines do the work mixflow does, so its ratios compare like
with like: timm's ``FastCollateMixup`` step and the lean per-sample loop give the same batch
as mixflow's own blend / box paste with the same partner, lam and boxes, and leave their
input untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.mixing_kernels import loop_kernel, mixflow_draw, timm_kernel
from benchmarks.timm_style import fast_collate_output, fast_collate_sample
from mixflow.mix.ops import blend_or_paste


def _batch(n: int = 6, h: int = 10, w: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))


def test_fast_collate_step_pastes_blends_and_copies_like_timm():
    x = _batch()
    images = x.numpy()
    before = x.clone()
    out = fast_collate_output(images)
    assert out.dtype == torch.uint8 and not out.any(), "timm collates into a zero-filled uint8 batch"
    fast_collate_sample(out, images, 0, 5, 0.3, (2, 7, 1, 9))   # CutMix: partner's box pasted
    fast_collate_sample(out, images, 1, 4, 0.25, None)          # MixUp: float32 blend, rint
    fast_collate_sample(out, images, 2, 3, 1.0, (2, 7, 1, 9))   # lam 1: the sample as it is
    want = x[0].clone()
    want[2:7, 1:9] = x[5, 2:7, 1:9]
    assert torch.equal(out[0], want)
    blended = np.rint(images[1].astype(np.float32) * 0.25 + images[4].astype(np.float32) * 0.75)
    assert np.array_equal(out[1].numpy(), blended.astype(np.uint8))
    assert torch.equal(out[2], x[2])
    assert not out[3:].any(), "only the rows asked for are written"
    assert torch.equal(x, before), "the input batch is never modified"


@pytest.mark.parametrize("method, mode", [("mixup", "batch"), ("mixup", "elem"), ("cutmix", "batch"),
                                          ("cutmix", "elem"), ("mixup_cutmix", "elem")])
def test_timm_and_loop_baselines_equal_mixflows_mix_with_the_same_draws(method, mode):
    x = _batch()
    n, h, w = x.shape[:3]
    before = x.clone()
    timm_out = timm_kernel(method, mode)(x, np.random.default_rng(11))
    loop_out = loop_kernel(method, mode)(x, np.random.default_rng(11))
    d = mixflow_draw(method, mode, n, h, w, np.random.default_rng(11))
    k = np.zeros(n, np.int64) if mode == "batch" else np.arange(n)
    flip = torch.arange(n - 1, -1, -1)  # timm pairs sample i with B-1-i
    want = blend_or_paste(x, flip, d.lam[k], np.where(d.cut[k, None], d.boxes[k], 0), d.cut[k], "NHWC")
    assert torch.equal(x, before), "no implementation modifies its input"
    assert torch.equal(timm_out, loop_out)
    # mixflow weighs the partner by float32(1-lam), as the baselines' Python-float 1-lam does:
    # blended samples are exact too, not just pasted and untouched ones.
    assert torch.equal(timm_out, want)

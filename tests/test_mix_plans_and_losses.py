"""Model-side mixing methods (TransMix, SMMix, MixPro attention labels, manifold mixup): the
plans the pipeline emits, the trainer-side helpers that finish them, and the losses that
consume the pair form (pair CE, Decoupled Mixup, RankMixup)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixflow.config import validate_mix
from mixflow.errors import ConfigError
from mixflow.mix import build_mixer, mixup
from mixflow.mix.manifold_mixup import manifold_mixup
from mixflow.mix.mixed_batch import MixedBatch
from mixflow.mix.plans import BoxPlan, LayerPlan, PatchMaskPlan, SideLengthPlan
from mixflow.mix.smmix import smmix
from mixflow.mix.transmix import transmix
from mixflow.train.losses import (decoupled_mixup_loss, pair_cross_entropy, rankmixup_loss,
                                  soft_target_cross_entropy)
from mixflow.train.mix_label_helpers import (ManifoldMixupHook, apply_smmix, box_token_mask, finish_mixpro,
                                             finish_transmix, progressive_factor, smmix_consistency_target,
                                             transmix_lam)

C = 5
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def batch(x, lam, perm, plan, y=None, smoothing=0.0, method="test"):
    n = len(x)
    y = torch.arange(n) % C if y is None else y
    perm = torch.as_tensor(perm)
    return MixedBatch(x, y, y[perm.to(y.device)], torch.as_tensor(lam, dtype=torch.float32), perm, C, smoothing, method,
                      plan=plan)


# --------------------------------------------------------------------------- pair-form losses


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_pair_cross_entropy_equals_dense_soft_target_loss(smoothing):
    torch.manual_seed(0)
    logits = torch.randn(12, C) * 3
    x = torch.rand(12, 3, 4, 4)
    y = torch.randint(0, C, (12,))
    for mode in ("batch", "elem"):
        mb = mixup(x, y, rng(1), num_classes=C, mode=mode, label_smoothing=smoothing)
        dense = soft_target_cross_entropy(logits, mb.targets)
        pair = pair_cross_entropy(logits, mb.y_a, mb.y_b, mb.lam, label_smoothing=smoothing)
        torch.testing.assert_close(pair, dense, rtol=0, atol=1e-5)
    # one row by hand: lam*(-log p_a) + (1-lam)*(-log p_b), no smoothing
    z = torch.tensor([[1.0, 2.0, 0.0, 0.0, 0.0]])
    logp = z.log_softmax(1)[0]
    expected = 0.3 * -logp[1] + 0.7 * -logp[0]
    torch.testing.assert_close(pair_cross_entropy(z, torch.tensor([1]), torch.tensor([0]), torch.tensor([0.3])),
                               expected)


def test_decoupled_mixup_loss_hand_computed():
    z = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.5, 3.0], [1.0, 0.0, 0.0]])
    y_a, y_b = torch.tensor([0, 2, 1]), torch.tensor([1, 0, 1])
    lam = torch.tensor([0.7, 0.4, 0.6])
    e = math.exp
    # row 0: CE = 0.7*-log p0 + 0.3*-log p1; regulariser: -log(e^2/(e^2+e^0)) - log(e^1/(e^1+e^0))
    lse0 = math.log(e(2) + e(1) + e(0))
    ce0 = 0.7 * (lse0 - 2) + 0.3 * (lse0 - 1)
    reg0 = -math.log(e(2) / (e(2) + 1)) - math.log(e(1) / (e(1) + 1))
    lse1 = math.log(2 * e(0.5) + e(3))
    ce1 = 0.4 * (lse1 - 3) + 0.6 * (lse1 - 0.5)
    reg1 = -math.log(e(3) / (e(3) + e(0.5))) - math.log(e(0.5) / (e(0.5) + e(0.5)))
    lse2 = math.log(e(1) + 2)
    ce2 = lse2 - 0.0  # y_a == y_b == 1: plain CE, no regulariser
    eta = 0.1
    expected = ((ce0 + eta * reg0) + (ce1 + eta * reg1) + ce2) / 3
    got = decoupled_mixup_loss(z, y_a, y_b, lam, eta=eta)
    assert abs(float(got) - expected) < 1e-6
    # eta = 0 is the pair cross entropy; an unmixed row (lam = 1) gets no regulariser
    torch.testing.assert_close(decoupled_mixup_loss(z, y_a, y_b, lam, eta=0.0), pair_cross_entropy(z, y_a, y_b, lam))
    one = decoupled_mixup_loss(z[:1], y_a[:1], y_b[:1], torch.tensor([1.0]), eta=5.0)
    assert abs(float(one) - (lse0 - 2)) < 1e-6


def test_rankmixup_loss_hand_computed():
    mixed = torch.tensor([[1.0, 3.0], [0.5, 0.2], [0.0, 2.45]])
    clean = torch.tensor([[2.0, 2.5], [1.0, 0.0], [2.5, 0.0]])
    y_a, y_b = torch.tensor([0, 1, 0]), torch.tensor([1, 0, 1])  # every row mixes two classes
    # gaps: 3 - 2.5 + 0.1 = 0.6; 0.5 - 1 + 0.1 < 0; 2.45 - 2.5 + 0.1 = 0.05
    torch.testing.assert_close(rankmixup_loss(mixed, clean, y_a, y_b), torch.tensor(0.1 * (0.6 + 0.05) / 3))
    torch.testing.assert_close(rankmixup_loss(mixed, clean, y_a, y_b, margin=0.0, weight=1.0), torch.tensor(0.5 / 3))
    torch.testing.assert_close(rankmixup_loss(mixed, clean, mask_same_class=False), torch.tensor(0.1 * 0.65 / 3))
    with pytest.raises(ValueError, match="3 rows but clean_logits has 2"):
        rankmixup_loss(mixed, clean[:2], y_a, y_b)


# --------------------------------------------------------------------------- TransMix

ATTN = torch.arange(1.0, 17.0)  # 4x4 token grid, token t has attention t+1 (total 136)


def test_box_token_mask_is_nearest_downsampling():
    boxes = torch.tensor([[2, 6, 0, 4], [3, 8, 5, 8]])  # 8x8 image, 4x4 tokens of 2x2 pixels
    m = box_token_mask(boxes, (8, 8), (4, 4))
    pixels = torch.zeros(2, 1, 8, 8)
    for i, (y1, y2, x1, x2) in enumerate(boxes.tolist()):
        pixels[i, 0, y1:y2, x1:x2] = 1
    assert torch.equal(m, F.interpolate(pixels, size=(4, 4), mode="nearest")[:, 0].bool())
    assert m[0].nonzero().tolist() == [[1, 0], [1, 1], [2, 0], [2, 1]]
    assert m[1].nonzero().tolist() == [[2, 3], [3, 3]]  # rows 4, 6 and column 6 are inside


def test_transmix_label_is_the_attention_mass_outside_the_box_averaged_with_area():
    boxes = torch.tensor([[2, 6, 0, 4], [0, 0, 0, 0]])  # sample 1: empty box (a MixUp element)
    x = torch.zeros(2, 3, 8, 8)
    mb = batch(x, [0.75, 0.4], [1, 0], BoxPlan(boxes, (8, 8)))
    attn = torch.stack([ATTN, ATTN.flip(0)])
    out = finish_transmix(mb, attn)
    inside = 5 + 6 + 9 + 10  # tokens (1,0),(1,1),(2,0),(2,1) -> values t+1
    lam_attn = (136 - inside) / 136
    torch.testing.assert_close(out.lam, torch.tensor([0.5 * 0.75 + 0.5 * lam_attn, 0.4]))
    assert out.plan is None and mb.plan is not None  # the input batch is left as it was
    # per-head maps are averaged over heads first
    heads = torch.stack([attn * 2, torch.zeros_like(attn)], dim=1)
    torch.testing.assert_close(finish_transmix(mb, heads).lam, out.lam)
    # ratio 0: the pure attention label (TransMix's lam1)
    torch.testing.assert_close(transmix_lam(mb.lam, boxes, (8, 8), attn, ratio=0.0)[0], torch.tensor(lam_attn))


def test_transmix_pipeline_pastes_cutmix_boxes_recorded_in_the_plan():
    n, h, w = 6, 16, 16
    x = torch.arange(1.0, n + 1).view(n, 1, 1, 1).expand(n, 3, h, w).contiguous()
    for mode in ("batch", "elem"):
        for seed in range(8):
            mb = transmix(x, torch.arange(n) % C, rng(seed), num_classes=C, mode=mode)
            assert isinstance(mb.plan, BoxPlan) and mb.plan.image_size == (h, w)
            boxes = mb.plan.boxes
            for i in range(n):
                y1, y2, x1, x2 = boxes[i].tolist()
                area = (y2 - y1) * (x2 - x1)
                expected = torch.full((3, h, w), float(x[i, 0, 0, 0]))
                if area:  # CutMix element: partner pixels inside the box, lam = 1 - area/(H*W)
                    expected[:, y1:y2, x1:x2] = x[mb.perm[i], 0, 0, 0]
                    assert torch.equal(mb.x[i], expected)
                    assert float(mb.lam[i]) == pytest.approx(1 - area / (h * w))
                elif float(mb.lam[i]) < 1:  # MixUp element: a blend, no box
                    lam = float(mb.lam[i])
                    torch.testing.assert_close(mb.x[i], lam * x[i] + (1 - lam) * x[mb.perm[i]])
    again = transmix(x, torch.arange(n) % C, rng(3), num_classes=C, mode="elem")
    first = transmix(x, torch.arange(n) % C, rng(3), num_classes=C, mode="elem")
    assert torch.equal(again.x, first.x) and torch.equal(again.plan.boxes, first.plan.boxes)
    with pytest.raises(ValueError, match="cutmix_alpha > 0 or minmax"):
        transmix(x, torch.arange(n) % C, rng(0), num_classes=C, cutmix_alpha=0.0)


def test_transmix_without_mixup_always_cuts():
    x = torch.rand(4, 3, 16, 16)
    for seed in range(5):
        mb = transmix(x, torch.arange(4), rng(seed), num_classes=C, mixup_alpha=0.0)
        b = mb.plan.boxes
        assert bool(((b[:, 1] > b[:, 0]) | (mb.lam == 1)).all())


# --------------------------------------------------------------------------- SMMix


def test_smmix_pipeline_emits_a_side_length_plan_and_leaves_x_unmixed():
    x = torch.rand(6, 3, 28, 28)
    sides = set()
    for seed in range(60):
        mb = smmix(x, torch.arange(6) % C, rng(seed), num_classes=C, switch_prob=1.0)
        assert mb.method == "smmix" and isinstance(mb.plan, SideLengthPlan) and mb.plan.grid == 14
        assert 3 <= mb.plan.side <= 10  # int(14*0.25) .. int(14*0.75)
        assert mb.x is x
        torch.testing.assert_close(mb.lam, torch.full((6,), 1 - mb.plan.side ** 2 / 196))
        sides.add(mb.plan.side)
    assert sides == set(range(3, 11))
    a, b = (smmix(x, torch.arange(6) % C, rng(7), num_classes=C) for _ in range(2))
    assert a.method == b.method and a.plan == b.plan and torch.equal(a.perm, b.perm) and torch.equal(a.x, b.x)
    mixed = smmix(x, torch.arange(6) % C, rng(0), num_classes=C, switch_prob=0.0)
    assert mixed.method == "mixup" and mixed.plan is None
    with pytest.raises(ValueError, match="multiple of token_grid=14"):
        smmix(torch.rand(2, 3, 30, 30), torch.arange(2), rng(0), num_classes=C)
    with pytest.raises(ValueError, match=r"= 0\.\.3 must satisfy"):
        smmix(x, torch.arange(6) % C, rng(0), num_classes=C, min_side_ratio=0.01, max_side_ratio=0.25)


def smmix_case(layout: str):
    """Two 4x4-token images (2-pixel patches), side 2, partners swapped."""
    g, p = 4, 2
    tok = torch.arange(16.0).view(4, 4)
    img = tok.repeat_interleave(p, 0).repeat_interleave(p, 1)  # pixel value = token index
    x = torch.stack([img, img + 100])
    x = x.unsqueeze(3).expand(2, 8, 8, 3) if layout == "NHWC" else x.unsqueeze(1).expand(2, 3, 8, 8)
    x = x.contiguous().to(torch.uint8 if layout == "NHWC" else torch.float32)
    a0 = torch.ones(16)
    a0[[10, 11, 14, 15]] = 0.0  # sample 0 attends least to the bottom-right window (2,2)
    a1 = torch.zeros(16)
    a1[[1, 2, 5, 6]] = 5.0  # sample 1 attends most to window (0,1)
    return batch(x, [0.75, 0.75], [1, 0], SideLengthPlan(2, g)), torch.stack([a0, a1]), tok


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_apply_smmix_pastes_partner_max_window_over_own_min_window(layout):
    mb, attn, tok = smmix_case(layout)
    out, pasted = apply_smmix(mb, attn)
    chan = (lambda t: t[..., 0]) if layout == "NHWC" else (lambda t: t[:, 0])
    got = chan(out.x).to(torch.float32)[:, ::2, ::2]  # one pixel per token
    expected0 = tok.clone()
    expected0[2:4, 2:4] = tok[0:2, 1:3] + 100  # partner 1's max window (0,1) into own min window (2,2)
    assert torch.equal(got[0], expected0)
    # sample 1: own min window is the only all-zero one, (2,0); partner 0's max window is the
    # first (row-major) of its tied windows that avoid the zero corner, (0,0)
    expected1 = tok + 100
    expected1[2:4, 0:2] = tok[0:2, 0:2]
    assert torch.equal(got[1], expected1)
    assert pasted[0].nonzero().flatten().tolist() == [10, 11, 14, 15]
    assert pasted[1].nonzero().flatten().tolist() == [8, 9, 12, 13]
    assert torch.equal(out.lam, mb.lam) and out.plan is None
    assert torch.equal(chan(out.x)[:, 1::2, 1::2].to(torch.float32), got)  # whole patches moved


def test_smmix_consistency_target_mixes_unmixed_logits():
    z = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    t = smmix_consistency_target(z, torch.tensor([0.75, 0.25]), torch.tensor([1, 0]))
    torch.testing.assert_close(t, torch.tensor([[0.75, 0.75], [0.75, 0.75]]))


# --------------------------------------------------------------------------- MixPro progressive attention labels


def test_finish_mixpro_hand_computed():
    keep = torch.tensor([[[True, False], [False, True]], [[True, True], [True, False]]])  # 2x2 tokens
    attn = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    x = torch.zeros(2, 3, 4, 4)
    y = torch.tensor([0, 1])
    mb = batch(x, [0.5, 0.75], [1, 0], PatchMaskPlan(keep), y=y)
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    out = finish_mixpro(mb, attn, logits)
    lam_attn = torch.tensor([0.5, 0.75])  # (0.1 + 0.4) / 1.0 and 3 of 4 equal weights
    probs = logits.softmax(1)
    t = mb.targets
    a = (probs * t).sum(1) / (probs.norm(dim=1) * t.norm(dim=1))
    torch.testing.assert_close(progressive_factor(logits, t), a)
    torch.testing.assert_close(out.lam, a * lam_attn + (1 - a) * mb.lam)
    # hand check of a for row 1: uniform prediction vs target (0.25, 0.75, 0, 0, 0)
    uniform = torch.full((5,), 0.2)
    a1 = float(uniform @ torch.tensor([0.25, 0.75, 0, 0, 0])) / (float(uniform.norm()) * math.sqrt(0.25**2 + 0.75**2))
    assert float(out.lam[1]) == pytest.approx(a1 * 0.75 + (1 - a1) * 0.75)
    assert float(out.lam[0]) == pytest.approx(float(a[0]) * 0.5 + (1 - float(a[0])) * 0.5)


def test_finish_mixpro_moves_lam_towards_attention():
    keep = torch.tensor([[[True, True], [False, False]], [[False, False], [True, True]]])
    mb = batch(torch.zeros(2, 3, 4, 4), [0.5, 0.5], [1, 0], PatchMaskPlan(keep), y=torch.tensor([2, 3]))
    attn = torch.tensor([[0.4, 0.4, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1]])  # lam_attn = 0.8 and 0.2
    confident = torch.tensor([[0.0, 0.0, 30.0, 0.0, 0.0], [0.0, 0.0, 30.0, 0.0, 0.0]])
    lam = finish_mixpro(mb, attn, confident).lam
    # one-hot prediction vs the 50/50 target: a = cos 45 degrees
    a = float(progressive_factor(confident, mb.targets)[0])
    assert a == pytest.approx(math.sqrt(0.5), abs=1e-6)
    torch.testing.assert_close(lam, torch.tensor([a * 0.8 + (1 - a) * 0.5, a * 0.2 + (1 - a) * 0.5]))
    with pytest.raises(ValueError, match="4 tokens but attn has 9"):
        finish_mixpro(mb, torch.rand(2, 9), confident)
    with pytest.raises(ValueError, match="needs a batch whose plan is a PatchMaskPlan"):
        finish_mixpro(batch(torch.zeros(2, 3, 4, 4), [0.5, 0.5], [1, 0], None), attn, confident)


def test_maskmix_plan_feeds_progressive_attention_labels():
    x = torch.rand(6, 3, 56, 56)
    for seed in range(5):
        mb = build_mixer("maskmix", C, patch_size=14, mask_patch=28)(x, torch.arange(6) % C, rng(seed))
        keep = mb.plan.keep.flatten(1).float()
        assert keep.shape == (6, 16)
        torch.testing.assert_close(keep.mean(1), mb.lam)  # kept tokens = re-quantised lam
        # uniform attention: lam_attn = lam, so PAL leaves lam unchanged whatever a is
        out = finish_mixpro(mb, torch.ones(6, 16), torch.randn(6, C))
        torch.testing.assert_close(out.lam, mb.lam)


# --------------------------------------------------------------------------- Manifold mixup


def test_manifold_mixup_pipeline_draws_layer_and_leaves_x():
    x = torch.rand(8, 4)
    layers_seen = set()
    for seed in range(40):
        mb = manifold_mixup(x, torch.arange(8) % C, rng(seed), num_classes=C, layers=(0, 2, 3))
        assert mb.x is x and isinstance(mb.plan, LayerPlan)
        assert bool((mb.perm != torch.arange(8)).all()) and bool(((mb.lam > 0) & (mb.lam < 1)).all())
        layers_seen.add(mb.plan.layer)
    assert layers_seen == {0, 2, 3}
    a = manifold_mixup(x, torch.arange(8) % C, rng(5), num_classes=C)
    b = manifold_mixup(x, torch.arange(8) % C, rng(5), num_classes=C)
    assert a.plan == b.plan and torch.equal(a.perm, b.perm) and torch.equal(a.lam, b.lam)
    with pytest.raises(ValueError, match="layers must be a non-empty list"):
        manifold_mixup(x, torch.arange(8) % C, rng(0), num_classes=C, layers=())


def scaled_chain():
    """Three blocks: h -> 2h, h -> h + 1, h -> h^2 (elementwise, so mixing order matters)."""
    class Scale(nn.Module):
        def forward(self, h):
            return 2 * h

    class Shift(nn.Module):
        def forward(self, h):
            return h + 1

    class Square(nn.Module):
        def forward(self, h):
            return h * h

    return nn.Sequential(Scale(), Shift(), Square())


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_manifold_mixup_hook_mixes_at_the_planned_layer_only(layer):
    model = scaled_chain()
    x = torch.tensor([[1.0], [3.0]])
    mb = batch(x, [0.25, 0.5], [1, 0], LayerPlan(layer), y=torch.tensor([0, 1]))

    def mix(h):
        lam = torch.tensor([[0.25], [0.5]])
        return lam * h + (1 - lam) * h[[1, 0]]

    h = x
    for k, block in enumerate(model):
        if k == layer:
            h = mix(h)
        h = block(h)
    with ManifoldMixupHook(model, mb):
        out = model(x)
    torch.testing.assert_close(out, h)
    # by hand for layer 1: hidden after Scale is (2, 6) -> mixed (5, 4) -> +1 -> square = (36, 25)
    if layer == 1:
        torch.testing.assert_close(out, torch.tensor([[36.0], [25.0]]))
    assert torch.equal(model(x), torch.tensor([[9.0], [49.0]]))  # hook removed after the block


def test_manifold_mixup_hook_errors():
    model = scaled_chain()
    x = torch.ones(2, 1)
    with pytest.raises(ValueError, match="layer 3 is not a block index 0..2"):
        ManifoldMixupHook(model, batch(x, [0.5, 0.5], [1, 0], LayerPlan(3)))
    with pytest.raises(RuntimeError, match="block 1 never ran"):
        with ManifoldMixupHook(model, batch(x, [0.5, 0.5], [1, 0], LayerPlan(1))):
            model[0](x)
    with pytest.raises(ValueError, match="plan is a LayerPlan"):
        ManifoldMixupHook(model, batch(x, [0.5, 0.5], [1, 0], BoxPlan(torch.zeros(2, 4), (1, 1))))


def test_manifold_mixup_end_to_end_matches_dense_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, C))
    x, y = torch.randn(6, 4), torch.arange(6) % C
    mb = build_mixer("manifold_mixup", C, layers=(1,), label_smoothing=0.1)(x, y, rng(2))
    with ManifoldMixupHook(model, mb):
        logits = model(mb.x)
    h = model[0](x)
    w = mb.lam.view(-1, 1)
    ref = model[2](model[1](w * h + (1 - w) * h[mb.perm]))
    torch.testing.assert_close(logits, ref)
    torch.testing.assert_close(pair_cross_entropy(logits, mb.y_a, mb.y_b, mb.lam, 0.1),
                               soft_target_cross_entropy(logits, mb.targets), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- config


def test_config_defaults_match_the_papers():
    t = validate_mix({"method": "transmix"})
    assert (t.mixup_alpha, t.cutmix_alpha, t.switch_prob, t.correct_lam) == (0.8, 1.0, 0.5, True)
    s = validate_mix({"method": "smmix"})
    assert (s.token_grid, s.min_side_ratio, s.max_side_ratio) == (14, 0.25, 0.75)
    assert (s.switch_prob, s.mixup_alpha) == (0.5, 0.8)
    m = validate_mix({"method": "manifold_mixup"})
    assert (m.alpha, m.layers) == (2.0, (0, 1, 2))


@pytest.mark.parametrize("mix, field, words", [
    ({"method": "manifold_mixup", "layers": [0, -1]}, "mix.layers.1", "greater than or equal to 0"),
    ({"method": "manifold_mixup", "layers": []}, "mix.layers", "at least 1"),
    ({"method": "transmix", "switch_prob": 2}, "mix.switch_prob", "less than or equal to 1"),
    ({"method": "transmix", "cutmix_alpha": 0}, "mix", "cutmix_alpha > 0 or minmax"),
    ({"method": "smmix", "token_grid": 0}, "mix.token_grid", "greater than or equal to 1"),
    ({"method": "smmix", "max_side_ratio": 0.05}, "mix", "min_side_ratio/max_side_ratio"),
    ({"method": "smmix", "mode": "elem"}, "mix.mode", "unknown field"),
])
def test_config_errors_name_the_field(mix, field, words):
    with pytest.raises(ConfigError) as err:
        validate_mix(mix)
    problems = dict(err.value.problems)
    assert list(problems) == [field] and words in problems[field], problems


def test_spec_sections_build_mixers_with_plans():
    x, y = torch.rand(4, 3, 28, 28), torch.arange(4)
    for raw, plan in (({"method": "transmix", "mixup_alpha": 0}, BoxPlan),
                      ({"method": "smmix", "switch_prob": 1.0}, SideLengthPlan),
                      ({"method": "manifold_mixup", "layers": [2]}, LayerPlan)):
        params = validate_mix(raw).model_dump()
        mb = build_mixer(params.pop("method"), 10, **params)(x, y, rng(0))
        assert isinstance(mb.plan, plan), raw


# --------------------------------------------------------------------------- devices


@cuda
def test_helpers_on_gpu_match_cpu():
    mb, attn, _ = smmix_case("NCHW")
    cpu, _ = apply_smmix(mb, attn)
    gpu_batch = batch(mb.x.cuda(), [0.75, 0.75], torch.tensor([1, 0]).cuda(), mb.plan)
    gpu, pasted = apply_smmix(gpu_batch, attn.cuda())
    assert torch.equal(gpu.x.cpu(), cpu.x) and pasted.is_cuda
    boxes = torch.tensor([[2, 6, 0, 4], [0, 0, 0, 0]])
    lam = transmix_lam(torch.tensor([0.75, 0.4]), boxes.cuda(), (8, 8), torch.stack([ATTN, ATTN]).cuda())
    torch.testing.assert_close(lam.cpu(), transmix_lam(torch.tensor([0.75, 0.4]), boxes, (8, 8),
                                                       torch.stack([ATTN, ATTN])))

"""Unit tests for the pure-torch batch mixing core (``mixflow.mix``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixflow.mix import METHODS, build_mixer, cutmix, mixup, mixup_cutmix
from mixflow.mix.pairing import cycle_ids, derangement, partner_index

C = 10
METHOD_NAMES = ("mixup", "cutmix", "mixup_cutmix")
MODES = ("batch", "pair", "elem")


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def distinct_nhwc(b: int, h: int, w: int, c: int = 3) -> torch.Tensor:
    """uint8 NHWC batch where sample i is filled with the constant i+1."""
    return torch.arange(1, b + 1, dtype=torch.uint8).view(b, 1, 1, 1).expand(b, h, w, c).contiguous()


def distinct_nchw(b: int, h: int, w: int, c: int = 3) -> torch.Tensor:
    """float32 NCHW batch where sample i is filled with the constant i+1."""
    return torch.arange(1, b + 1, dtype=torch.float32).view(b, 1, 1, 1).expand(b, c, h, w).contiguous()


def pasted_mask(out: torch.Tensor, x: torch.Tensor, layout: str) -> torch.Tensor:
    """[B, H, W] bool: pixels whose value changed (any channel)."""
    diff = out != x
    return diff.any(dim=3) if layout == "NHWC" else diff.any(dim=1)


def box_sides(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (height, width, rows_any, cols_any) of a [B, H, W] mask; asserts each mask is one rectangle."""
    rows_any = mask.any(dim=2)
    cols_any = mask.any(dim=1)
    assert torch.equal(mask, rows_any[:, :, None] & cols_any[:, None, :]), "pasted region is not a rectangle"
    for band in (rows_any, cols_any):
        n = band.shape[1]
        count = band.sum(dim=1)
        first = band.to(torch.int64).argmax(dim=1)
        last = n - 1 - band.flip(1).to(torch.int64).argmax(dim=1)
        has = count > 0
        assert torch.equal(count[has], (last - first + 1)[has]), "pasted rows/cols are not contiguous"
    return rows_any.sum(dim=1), cols_any.sum(dim=1), rows_any, cols_any


def expand_mask(mask: torch.Tensor, layout: str) -> torch.Tensor:
    return mask.unsqueeze(3) if layout == "NHWC" else mask.unsqueeze(1)


def call(method: str, x, y, seed: int, **kw):
    return METHODS[method](x, y, rng(seed), num_classes=C, **kw)


# --------------------------------------------------------------------------- soft targets


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_targets_rows_sum_to_one_and_match_lam(method, mode, smoothing):
    b = 12
    x = torch.rand(b, 3, 8, 10)
    y = torch.arange(b) % C
    mb = call(method, x, y, seed=5, mode=mode, label_smoothing=smoothing)
    t = mb.targets
    assert t.shape == (b, C)
    assert t.dtype == torch.float32
    torch.testing.assert_close(t.sum(dim=1), torch.ones(b), atol=1e-6, rtol=0)
    off = smoothing / C
    assert float(t.min()) >= off - 1e-7
    # Explicit form: lam*smoothed(y_a) + (1-lam)*smoothed(y_b).
    on = 1.0 - smoothing + off
    lam = mb.lam.view(-1, 1)
    onehot_a = F.one_hot(mb.y_a, C).float()
    onehot_b = F.one_hot(mb.y_b, C).float()
    ref = lam * (off + (on - off) * onehot_a) + (1 - lam) * (off + (on - off) * onehot_b)
    torch.testing.assert_close(t, ref, atol=1e-6, rtol=0)
    assert torch.equal(mb.y_a, y)
    assert torch.equal(mb.y_b, y[mb.perm])


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.25])
def test_unmixed_rows_with_label_smoothing(smoothing):
    b = 6
    x = torch.rand(b, 3, 4, 4)
    y = torch.tensor([0, 3, 9, 3, 5, 1])
    for mb in (call("mixup", x, y, 1, prob=0.0, label_smoothing=smoothing),
               call("none", x, y, 1, label_smoothing=smoothing)):
        t = mb.targets
        off = smoothing / C
        for i in range(b):
            expected = torch.full((C,), off, dtype=torch.float32)
            expected[y[i]] = 1.0 - smoothing + off
            torch.testing.assert_close(t[i], expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("mode", MODES)
def test_pair_form_and_dense_form_give_same_loss(method, mode):
    b = 16
    torch.manual_seed(0)
    x = torch.rand(b, 3, 8, 8)
    y = torch.randint(0, C, (b,))
    logits = torch.randn(b, C, dtype=torch.float32) * 3
    mixed = 0
    for seed in range(6):
        mb = call(method, x, y, seed, mode=mode)
        mixed += int((mb.lam < 1).sum())
        pair = mb.lam * F.cross_entropy(logits, mb.y_a, reduction="none") \
            + (1 - mb.lam) * F.cross_entropy(logits, mb.y_b, reduction="none")
        dense = F.cross_entropy(logits, mb.targets, reduction="none")
        torch.testing.assert_close(pair, dense, atol=1e-5, rtol=0)
    assert mixed > 0


# --------------------------------------------------------------------------- CutMix


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("mode", MODES)
def test_cutmix_lam_equals_one_minus_pasted_area(layout, mode):
    b, h, w = 8, 12, 20
    x = distinct_nhwc(b, h, w) if layout == "NHWC" else distinct_nchw(b, h, w)
    y = torch.arange(b)
    clipped = 0
    for seed in range(40):
        mb = cutmix(x, y, rng(seed), num_classes=C, mode=mode, alpha=1.0)
        mask = pasted_mask(mb.x, x, layout)
        area = mask.sum(dim=(1, 2)).to(torch.float64)
        expected = (1.0 - area / (h * w)).to(torch.float32)
        assert torch.equal(mb.lam, expected), (seed, mb.lam, expected)
        _, _, rows_any, cols_any = box_sides(mask)
        # inside the box: the partner's pixels exactly; outside: untouched
        assert torch.equal(mb.x, torch.where(expand_mask(mask, layout), x[mb.perm], x))
        border = rows_any[:, 0] | rows_any[:, -1] | cols_any[:, 0] | cols_any[:, -1]
        clipped += int(border.sum())
    assert clipped > 0, "no box touched the border: clipping not exercised"


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_cutmix_correct_lam_false_keeps_beta_lam(mode):
    b, h, w, alpha = 8, 16, 16, 1.0
    x = distinct_nchw(b, h, w)
    y = torch.arange(b)
    differs = 0
    for seed in range(30):
        mb = cutmix(x, y, rng(seed), num_classes=C, mode=mode, alpha=alpha, correct_lam=False)
        # the Beta draw is the next rng value after the partner permutation
        r = rng(seed)
        perm = partner_index(b, "derangement", r, mode)
        k = 1 if mode == "batch" else b
        beta = np.broadcast_to(r.beta(alpha, alpha, size=k), (b,)).copy()
        assert torch.equal(mb.perm, torch.as_tensor(perm))
        assert torch.equal(mb.lam, torch.as_tensor(beta, dtype=torch.float32))
        # same boxes as with correct_lam=True
        mb2 = cutmix(x, y, rng(seed), num_classes=C, mode=mode, alpha=alpha, correct_lam=True)
        assert torch.equal(mb.x, mb2.x)
        bh, bw, _, _ = box_sides(pasted_mask(mb.x, x, "NCHW"))
        cut = torch.as_tensor((h * np.sqrt(1 - beta)).astype(np.int64))
        assert torch.all(bh <= cut) and torch.all(bw <= cut)
        if not torch.equal(mb.lam, mb2.lam):
            differs += 1
    assert differs > 0


@pytest.mark.parametrize("minmax", [(0.2, 0.6), (0.5, 0.9)])
@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_cutmix_minmax_box_side_bounds(minmax, mode):
    b, h, w = 8, 20, 30
    x = distinct_nhwc(b, h, w)
    y = torch.arange(b)
    lo_h, hi_h = int(h * minmax[0]), int(h * minmax[1])
    lo_w, hi_w = int(w * minmax[0]), int(w * minmax[1])
    seen_h, seen_w = set(), set()
    for seed in range(40):
        mb = cutmix(x, y, rng(seed), num_classes=C, mode=mode, minmax=minmax, correct_lam=False)
        mask = pasted_mask(mb.x, x, "NHWC")
        area = mask.sum(dim=(1, 2)).to(torch.float64)
        # minmax always corrects lam, even with correct_lam=False
        assert torch.equal(mb.lam, (1.0 - area / (h * w)).to(torch.float32))
        bh, bw, _, _ = box_sides(mask)
        assert torch.all((lo_h <= bh) & (bh < hi_h)), (bh, lo_h, hi_h)
        assert torch.all((lo_w <= bw) & (bw < hi_w)), (bw, lo_w, hi_w)
        assert torch.equal(mb.x, torch.where(expand_mask(mask, "NHWC"), x[mb.perm], x))
        seen_h.update(bh.tolist())
        seen_w.update(bw.tolist())
    assert len(seen_h) > 2 and len(seen_w) > 2


def test_cutmix_minmax_invalid_raises():
    x = distinct_nhwc(4, 8, 8)
    with pytest.raises(ValueError, match="minmax"):
        cutmix(x, torch.arange(4), rng(0), num_classes=C, minmax=(0.6, 0.3))


@pytest.mark.parametrize("mode", MODES)
def test_mixup_cutmix_elem_each_sample_is_cut_or_blended(mode):
    b, h, w = 10, 8, 12
    x = distinct_nchw(b, h, w)
    y = torch.arange(b)
    n_cut = n_mix = 0
    for seed in range(20):
        mb = mixup_cutmix(x, y, rng(seed), num_classes=C, mode=mode)
        for i in range(b):
            a, p = float(i + 1), float(int(mb.perm[i]) + 1)
            vals = torch.unique(mb.x[i])
            lam = float(mb.lam[i])
            if len(vals) == 1 and abs(float(vals[0]) - (lam * a + (1 - lam) * p)) < 1e-5 and lam < 1:
                n_mix += 1
            else:
                assert set(vals.tolist()) <= {a, p}
                frac_partner = float((mb.x[i, 0] == p).sum()) / (h * w)
                assert mb.lam[i] == torch.tensor(1.0 - frac_partner, dtype=torch.float32)
                n_cut += 1
    if mode == "batch":
        assert n_cut > 0 and n_mix > 0
    else:
        assert n_cut > 20 and n_mix > 20


# --------------------------------------------------------------------------- MixUp


@pytest.mark.parametrize("mode", ["batch", "elem", "pair"])
@pytest.mark.parametrize("shape", [(8, 5, 7, 3), (48, 64, 64, 3)])  # the second spans several chunks
def test_mixup_uint8_exact(mode, shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    y = torch.arange(shape[0]) % C
    for seed in range(2):
        mb = mixup(x, y, rng(seed), num_classes=C, mode=mode)
        lam = mb.lam.to(torch.float32).view(-1, 1, 1, 1)
        ref = (lam * x.float() + (1 - lam) * x[mb.perm].float()).round().to(torch.uint8)
        assert mb.x.dtype == torch.uint8
        assert torch.equal(mb.x, ref)


def test_mixup_float_matches_formula():
    x = torch.randn(12, 3, 6, 6)
    y = torch.arange(12) % C
    mb = mixup(x, y, rng(3), num_classes=C, mode="elem")
    lam = mb.lam.view(-1, 1, 1, 1)
    torch.testing.assert_close(mb.x, lam * x + (1 - lam) * x[mb.perm], atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_elem_mode_gives_per_sample_lam(method):
    x = torch.rand(64, 3, 64, 64)
    y = torch.arange(64) % C
    mb = call(method, x, y, 11, mode="elem")
    assert len(torch.unique(mb.lam)) >= 40
    batch = call(method, x, y, 11, mode="batch")
    assert len(torch.unique(batch.lam)) == 1


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("b", [2, 8, 64])
def test_pair_mode_lam_shared_by_partners(method, b):
    x = torch.rand(b, 3, 16, 16)
    y = torch.arange(b) % C
    for seed in range(5):
        mb = call(method, x, y, seed, mode="pair")
        perm = mb.perm
        assert torch.equal(perm[perm], torch.arange(b)), "pair-mode partner map is not an involution"
        assert not torch.any(perm == torch.arange(b))
        assert torch.equal(mb.lam, mb.lam[perm])
        if b >= 8:
            assert len(torch.unique(mb.lam)) > 1


@pytest.mark.parametrize("b", [3, 7])
def test_pair_mode_odd_batch_three_cycle(b):
    x = torch.rand(b, 3, 4, 4)
    mb = mixup(x, torch.zeros(b, dtype=torch.long), rng(0), num_classes=C, mode="pair")
    perm = mb.perm.numpy()
    assert not np.any(perm == np.arange(b))
    assert np.array_equal(np.sort(perm), np.arange(b))
    assert torch.equal(mb.lam, mb.lam[mb.perm])


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_batch_mode_single_lam(method):
    x = torch.rand(32, 3, 16, 16)
    y = torch.arange(32) % C
    for seed in range(5):
        mb = call(method, x, y, seed, mode="batch")
        assert torch.all(mb.lam == mb.lam[0])


# --------------------------------------------------------------------------- pairing


def test_derangement_has_no_fixed_points():
    r = rng(0)
    for b in range(2, 51):
        for _ in range(3):
            p = derangement(b, r)
            assert np.array_equal(np.sort(p), np.arange(b))
            assert not np.any(p == np.arange(b))
    # through the mixers
    for b in range(2, 51):
        mb = mixup(torch.rand(b, 1, 2, 2), torch.zeros(b, dtype=torch.long), rng(b), num_classes=C)
        assert not torch.any(mb.perm == torch.arange(b))


def test_flip_and_roll_pairings():
    for b in (1, 2, 5, 8):
        assert np.array_equal(partner_index(b, "flip", rng(0)), np.arange(b)[::-1])
        assert np.array_equal(partner_index(b, "roll", rng(0)), np.roll(np.arange(b), 1))
    x = torch.rand(6, 3, 4, 4)
    mb = mixup(x, torch.arange(6), rng(0), num_classes=C, pairing="flip")
    assert torch.equal(mb.perm, torch.tensor([5, 4, 3, 2, 1, 0]))
    assert torch.equal(mb.y_b, torch.tensor([5, 4, 3, 2, 1, 0]))
    mb = mixup(x, torch.arange(6), rng(0), num_classes=C, pairing="roll")
    assert torch.equal(mb.perm, torch.tensor([5, 0, 1, 2, 3, 4]))
    torch.testing.assert_close(mb.x, mb.lam[0] * x + (1 - mb.lam[0]) * x.roll(1, 0), atol=1e-6, rtol=0)


def test_unknown_pairing_raises():
    with pytest.raises(ValueError, match="derangement, flip, roll"):
        partner_index(4, "shuffle", rng(0))


def test_cycle_ids_hand_made():
    perm = np.array([2, 0, 1, 4, 3, 5, 7, 6])
    assert cycle_ids(perm).tolist() == [0, 0, 0, 3, 3, 5, 6, 6]
    # one long cycle 0 -> 9 -> 8 -> ... -> 1 -> 0
    n = 10
    perm = np.roll(np.arange(n), 1)
    assert cycle_ids(perm).tolist() == [0] * n
    assert cycle_ids(np.arange(4)).tolist() == [0, 1, 2, 3]


def _naive_cycle_ids(perm):
    out = np.empty(len(perm), dtype=np.int64)
    seen = np.zeros(len(perm), bool)
    for i in range(len(perm)):
        if seen[i]:
            continue
        cyc = [i]
        j = perm[i]
        while j != i:
            cyc.append(j)
            j = perm[j]
        out[cyc] = min(cyc)
        seen[cyc] = True
    return out


def test_cycle_ids_random_permutations():
    r = rng(42)
    for n in [1, 2, 3, 17, 64, 129, 1000]:
        for _ in range(5):
            p = r.permutation(n)
            assert np.array_equal(cycle_ids(p), _naive_cycle_ids(p))
    # a single cycle of length n (worst case for pointer doubling)
    for n in [5, 33, 257]:
        order = r.permutation(n)
        p = np.empty(n, dtype=np.int64)
        p[order] = np.roll(order, -1)
        assert np.all(cycle_ids(p) == 0)


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("mode", MODES)
def test_same_seed_same_output_different_seed_differs(method, mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 12, 12, 3), dtype=torch.uint8, generator=g)
    y = torch.arange(16) % C
    a = call(method, x, y, 7, mode=mode)
    b = call(method, x, y, 7, mode=mode)
    assert torch.equal(a.x, b.x) and torch.equal(a.lam, b.lam) and torch.equal(a.perm, b.perm)
    c = call(method, x, y, 8, mode=mode)
    assert not (torch.equal(a.x, c.x) and torch.equal(a.lam, c.lam))


# --------------------------------------------------------------------------- prob = 0


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_prob_zero_leaves_batch_unchanged(method, mode, dtype):
    b = 10
    if dtype == torch.uint8:
        x = torch.randint(0, 256, (b, 8, 8, 3), dtype=torch.uint8)
    else:
        x = torch.rand(b, 3, 8, 8)
    x0 = x.clone()
    y = torch.arange(b) % C
    for seed in range(3):
        mb = call(method, x, y, seed, mode=mode, prob=0.0)
        assert torch.equal(mb.x, x0)
        assert torch.equal(mb.lam, torch.ones(b))
        assert torch.equal(mb.targets, F.one_hot(y, C).float())
    assert torch.equal(x, x0), "input tensor was modified in place"


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_mixing_does_not_modify_input(method):
    x = torch.randint(0, 256, (8, 8, 8, 3), dtype=torch.uint8)
    x0 = x.clone()
    mb = call(method, x, torch.arange(8), 0, mode="elem")
    assert torch.equal(x, x0)
    assert not torch.equal(mb.x, x0)


@pytest.mark.parametrize("mode", MODES)
def test_prob_partial_unmixed_samples_keep_their_pixels(mode):
    b = 32
    x = distinct_nchw(b, 6, 6)
    y = torch.arange(b)
    mb = mixup(x, y, rng(3), num_classes=b, mode=mode, prob=0.5)
    unmixed = mb.lam == 1
    if mode != "batch":
        assert unmixed.any() and (~unmixed).any()
    assert torch.equal(mb.x[unmixed], x[unmixed])


# --------------------------------------------------------------------------- errors


def test_build_mixer_unknown_method():
    with pytest.raises(ValueError) as exc:
        build_mixer("mixupp", C)
    msg = str(exc.value)
    assert "'mixupp'" in msg
    for name in ("none", "mixup", "cutmix", "mixup_cutmix"):
        assert name in msg


def test_build_mixer_binds_parameters():
    x = torch.rand(8, 3, 4, 4)
    y = torch.arange(8)
    f = build_mixer("mixup", C, alpha=0.4, mode="elem", pairing="roll")
    a = f(x, y, rng(1))
    b = mixup(x, y, rng(1), num_classes=C, alpha=0.4, mode="elem", pairing="roll")
    assert a.method == "mixup" and a.num_classes == C
    assert torch.equal(a.x, b.x) and torch.equal(a.lam, b.lam)
    none = build_mixer("none", C, label_smoothing=0.1)(x, y, rng(1))
    assert none.x is x and torch.equal(none.lam, torch.ones(8))


@pytest.mark.parametrize("bad", [10, 12, -1])
@pytest.mark.parametrize("method", ["none", *METHOD_NAMES])
def test_labels_outside_num_classes(bad, method):
    x = torch.rand(4, 3, 4, 4)
    y = torch.tensor([0, 1, bad, 2])
    with pytest.raises(ValueError, match=rf"label {bad}\b"):
        build_mixer(method, C)(x, y, rng(0)).targets


def test_bad_mode_and_alpha():
    x = torch.rand(4, 3, 4, 4)
    y = torch.arange(4)
    with pytest.raises(ValueError, match="batch, pair, elem"):
        mixup(x, y, rng(0), num_classes=C, mode="sample")
    with pytest.raises(ValueError, match="alpha must be > 0"):
        mixup(x, y, rng(0), num_classes=C, alpha=0.0)
    with pytest.raises(ValueError, match="4 dims"):
        cutmix(x[0], y, rng(0), num_classes=C)


def test_mixup_cutmix_batch_mode_switch():
    x = distinct_nchw(8, 16, 16)
    y = torch.arange(8)
    tags: dict[str, int] = {}
    for seed in range(40):
        mb = mixup_cutmix(x, y, rng(seed), num_classes=C, mode="batch")
        tags[mb.method] = tags.get(mb.method, 0) + 1
    assert set(tags) == {"mixup", "cutmix"}
    for seed in range(10):
        assert mixup_cutmix(x, y, rng(seed), num_classes=C, switch_prob=1.0).method == "cutmix"
        assert mixup_cutmix(x, y, rng(seed), num_classes=C, switch_prob=0.0).method == "mixup"
        assert mixup_cutmix(x, y, rng(seed), num_classes=C, cutmix_alpha=0.0).method == "mixup"
        assert mixup_cutmix(x, y, rng(seed), num_classes=C, mixup_alpha=0.0).method == "cutmix"
        assert mixup_cutmix(x, y, rng(seed), num_classes=C, prob=0.0).method == "none"
    with pytest.raises(ValueError, match="needs mixup_alpha > 0"):
        mixup_cutmix(x, y, rng(0), num_classes=C, mixup_alpha=0.0, cutmix_alpha=0.0)


@pytest.mark.parametrize("mode", ["elem", "pair"])
def test_mixup_cutmix_switch_prob_extremes_per_element(mode):
    """switch_prob=0: pure MixUp (every sample one blended value); 1: pure CutMix (only own/partner values)."""
    b, h, w = 8, 16, 16
    x = distinct_nchw(b, h, w)
    y = torch.arange(b)
    for seed in range(5):
        mb = mixup_cutmix(x, y, rng(seed), num_classes=C, mode=mode, switch_prob=0.0)
        lam = mb.lam.view(-1, 1, 1, 1)
        torch.testing.assert_close(mb.x, lam * x + (1 - lam) * x[mb.perm], atol=1e-5, rtol=0)
        mb = mixup_cutmix(x, y, rng(seed), num_classes=C, mode=mode, switch_prob=1.0)
        mask = pasted_mask(mb.x, x, "NCHW")
        box_sides(mask)
        assert torch.equal(mb.x, torch.where(expand_mask(mask, "NCHW"), x[mb.perm], x))
        assert torch.equal(mb.lam, (1.0 - mask.sum(dim=(1, 2)).double() / (h * w)).float())

"""Box / mask mixing methods: ResizeMix, FMix, MaskMix, Patch Mixing, CutMix with seg masks,
and the per-batch method choice (``mixflow.mix``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixflow.config import validate_spec
from mixflow.errors import ConfigError
from mixflow.mix import (METHODS, build_mixer, cutmix, fmix, maskmix, method_choice, patch_mixing, resizemix,
                         sample_fmix_masks)
from mixflow.mix.fmix_masks import (binarise, frequency_grid, low_frequency_images,
                                    reference_frequency_grid)
from mixflow.mix.mixed_batch import unmixed
from mixflow.mix.pairing import cycle_ids, partner_index

C = 10
MODES = ("batch", "pair", "elem")
BOX_MASK_METHODS = ("cutmix", "resizemix", "fmix", "maskmix", "patch_mixing")
NEW_METHODS = ("resizemix", "fmix", "maskmix", "patch_mixing")
# grids small enough for the 16..32 px test images (defaults are checked at 224 px separately)
SMALL = dict(maskmix=dict(patch_size=4, mask_patch=8), patch_mixing=dict(patch_size=4))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def floats(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def ints(high: int, *shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def distinct(b: int, h: int, w: int, layout: str, c: int = 3) -> torch.Tensor:
    """Sample i is the constant i+1 (uint8 NHWC or float32 NCHW): a changed pixel reveals the partner."""
    v = torch.arange(1, b + 1)
    if layout == "NHWC":
        return v.to(torch.uint8).view(b, 1, 1, 1).expand(b, h, w, c).contiguous()
    return v.to(torch.float32).view(b, 1, 1, 1).expand(b, c, h, w).contiguous()


def own_mask(out: torch.Tensor, x: torch.Tensor, layout: str) -> torch.Tensor:
    """[B, H, W] bool: pixels that still show the sample's own (constant) value in every channel."""
    same = out == x
    return same.all(dim=3) if layout == "NHWC" else same.all(dim=1)


def rectangle(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """(y1, y2, x1, x2) of a [H, W] mask that must be exactly one filled rectangle."""
    rows = mask.any(dim=1).nonzero().flatten()
    cols = mask.any(dim=0).nonzero().flatten()
    y1, y2, x1, x2 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    box = torch.zeros_like(mask)
    box[y1:y2, x1:x2] = True
    assert torch.equal(mask, box), "region is not one filled rectangle"
    return y1, y2, x1, x2


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.double() - b.double()).abs().max())


def call(method: str, x, y, seed: int, **kw):
    return METHODS[method](x, y, rng(seed), num_classes=C, **{**SMALL.get(method, {}), **kw})


# --------------------------------------------------------------------------- CutMix + seg


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("mode", MODES)
def test_cutmix_lam_is_exact_pasted_area_and_seg_follows(layout, mode):
    b, h, w = 8, 12, 20
    x = distinct(b, h, w, layout)
    seg = ints(50, b, h, w)
    clipped = 0
    for seed in range(15):
        mb = cutmix(x, torch.arange(b), rng(seed), num_classes=C, mode=mode, seg=seg)
        pasted = ~own_mask(mb.x, x, layout)
        # every changed pixel shows the partner's value
        partner = x[mb.perm]
        expanded = pasted.unsqueeze(3) if layout == "NHWC" else pasted.unsqueeze(1)
        assert torch.equal(mb.x, torch.where(expanded, partner, x))
        area = pasted.sum(dim=(1, 2)).to(torch.float64)
        assert torch.equal(mb.lam, (1.0 - area / (h * w)).to(torch.float32))
        assert torch.equal(mb.seg, torch.where(pasted, seg[mb.perm], seg))
        for i in range(b):
            if pasted[i].any():
                y1, y2, x1, x2 = rectangle(pasted[i])
                clipped += int(y1 == 0 or x1 == 0 or y2 == h or x2 == w)
    assert clipped > 0, "no box touched the border: clipping not exercised"


# --------------------------------------------------------------------------- ResizeMix


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("mode", MODES)
def test_resizemix_pastes_whole_partner_resized(layout, mode):
    b, h, w, scope = 6, 30, 40, (0.1, 0.8)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (b, h, w, 3), generator=gen, dtype=torch.uint8)
    if layout == "NCHW":
        x = x.permute(0, 3, 1, 2).float().div(255)
    seg = torch.arange(b).view(b, 1, 1).expand(b, h, w).contiguous()  # seg reveals the box exactly
    sizes = set()
    for seed in range(6):
        mb = resizemix(x, torch.arange(b), rng(seed), num_classes=C, mode=mode, seg=seg, scope=scope)
        for i in range(b):
            box = mb.seg[i] != i
            assert torch.all(mb.seg[i][box] == mb.perm[i])
            y1, y2, x1, x2 = rectangle(box)
            bh, bw = y2 - y1, x2 - x1
            sizes.add(bh)
            # box = int(H*tau) x int(W*tau) for one tau in scope
            lo = max(bh / h, bw / w, scope[0])
            hi = min((bh + 1) / h, (bw + 1) / w, scope[1] + 1e-12)
            assert lo < hi, (bh, bw)
            assert mb.lam[i] == torch.tensor(1.0 - bh * bw / (h * w), dtype=torch.float32)
            partner = x[mb.perm[i]]
            if layout == "NHWC":
                want = F.interpolate(partner.permute(2, 0, 1)[None], size=(bh, bw), mode="nearest")[0]
                got = mb.x[i, y1:y2, x1:x2].permute(2, 0, 1)
                outside = torch.ones(h, w, dtype=torch.bool)
                outside[y1:y2, x1:x2] = False
                assert torch.equal(mb.x[i][outside], x[i][outside])
            else:
                want = F.interpolate(partner[None], size=(bh, bw), mode="nearest")[0]
                got = mb.x[i, :, y1:y2, x1:x2]
                assert torch.equal(mb.x[i].masked_fill(box, 0), x[i].masked_fill(box, 0))
            assert torch.equal(got, want)
    assert len(sizes) > 1


def test_resizemix_bilinear_matches_interpolate_and_uint8_rounds_float_reference():
    b, h, w = 5, 24, 36
    x8 = torch.randint(0, 256, (b, h, w, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    seg = torch.arange(b).view(b, 1, 1).expand(b, h, w).contiguous()
    for seed in range(3):
        kw = dict(num_classes=C, mode="elem", interpolation="bilinear", seg=seg)
        m8 = resizemix(x8, torch.arange(b), rng(seed), **kw)
        mf = resizemix(x8.float(), torch.arange(b), rng(seed), layout="NHWC", **kw)
        assert torch.equal(m8.x, mf.x.round().to(torch.uint8))
        for i in range(b):
            y1, y2, x1, x2 = rectangle(mf.seg[i] != i)
            want = F.interpolate(x8[mf.perm[i]].permute(2, 0, 1)[None].float(), size=(y2 - y1, x2 - x1),
                                 mode="bilinear", align_corners=False)[0]
            assert max_diff(mf.x[i, y1:y2, x1:x2].permute(2, 0, 1), want) < 1e-3


def test_resizemix_invalid_params():
    x = floats(4, 3, 8, 8)
    with pytest.raises(ValueError, match="scope"):
        resizemix(x, torch.arange(4), rng(0), num_classes=C, scope=(0.8, 0.1))
    with pytest.raises(ValueError, match="interpolation"):
        resizemix(x, torch.arange(4), rng(0), num_classes=C, interpolation="cubic")


# --------------------------------------------------------------------------- FMix masks


@pytest.mark.parametrize("shape", [(64,), (15, 22), (6, 7, 9)])
@pytest.mark.parametrize("reference", [False, True])
def test_fmix_masks_binary_with_mean_lam(shape, reference):
    n = int(np.prod(shape))
    lam = rng(3).random(12)
    masks, means = sample_fmix_masks(shape, lam, rng(4), reference_spectrum=reference)
    assert masks.shape == (12, *shape)
    assert set(torch.unique(masks).tolist()) <= {0.0, 1.0}
    assert np.array_equal(means, np.rint(lam * n) / n)
    assert np.all(np.abs(means - lam) <= 0.5 / n)
    np.testing.assert_array_equal(masks.reshape(12, -1).double().mean(1).numpy(), means)


@pytest.mark.parametrize("shape", [(80,), (16, 20), (5, 6, 8)])
def test_fmix_soft_masks_ramp_only_near_threshold(shape):
    n, max_soft = int(np.prod(shape)), 0.1
    lam = np.array([0.03, 0.3, 0.5, 0.93])
    images = low_frequency_images(shape, len(lam), rng(5))
    masks, means = binarise(images, lam, max_soft)
    flat, img = masks.reshape(len(lam), -1), images.reshape(len(lam), -1)
    for i, lm in enumerate(lam):
        soft = int(n * min(max_soft, lm, 1 - lm))
        num = int(np.rint(lm * n))
        values = flat[i]
        assert int(((values > 0) & (values < 1)).sum()) <= 2 * soft
        assert int((values == 1).sum()) == num - soft + (1 if soft else 0)  # ramp starts at 1
        # the ramp sits on the ranks around the threshold: higher image values never get less mask
        order = torch.argsort(img[i], descending=True)
        assert torch.all(values[order][1:] <= values[order][:-1])
        assert abs(float(values.double().mean()) - means[i]) < 1e-6
        assert means[i] == num / n


def test_fmix_frequency_grids_by_hand():
    # paper: real-FFT grid, fftfreq on leading axes, rfftfreq on the last
    g = frequency_grid((4, 5))
    assert g.shape == (4, 3)
    assert g[2, 2] == pytest.approx(np.hypot(0.5, 0.4))  # fftfreq(4)[2] = -0.5, rfftfreq(5)[2] = 0.4
    assert g[3, 1] == pytest.approx(np.hypot(0.25, 0.2))
    # official code: w//2 + 2 columns for odd w, the 3-D grid ordered (h, z, w)
    r = reference_frequency_grid((4, 5))
    assert r.shape == (4, 4)
    assert r[0, 3] == pytest.approx(0.4)  # fftfreq(5)[3] = -0.4
    r3 = reference_frequency_grid((2, 3, 4))
    assert r3.shape == (2, 4, 3)
    assert r3[1, 2, 1] == pytest.approx(np.sqrt(0.5**2 + 0.5**2 + (1 / 3) ** 2))
    assert frequency_grid((2, 3, 4)).shape == (2, 3, 3)
    np.testing.assert_allclose(reference_frequency_grid((6,)), np.abs(np.fft.fftfreq(6)))


def test_fmix_paper_spectrum_uses_real_and_imag_of_last_axis():
    shape, decay = (8, 10), 3.0
    img = low_frequency_images(shape, 2, rng(9), decay_power=decay).numpy()
    draws = rng(9).standard_normal((2, 8, 6, 2))
    f = np.sqrt(np.fft.fftfreq(8)[:, None] ** 2 + np.fft.rfftfreq(10)[None, :] ** 2)
    expected = (draws[..., 0] + 1j * draws[..., 1]) / np.maximum(f, 1 / 10) ** decay
    got = np.fft.rfftn(img, axes=(1, 2))
    # columns 1..4 are free of the Hermitian constraint (0 and the Nyquist column 5 are not)
    np.testing.assert_allclose(got[:, :, 1:5], expected[:, :, 1:5], rtol=1e-9, atol=1e-9)


def test_fmix_reference_spectrum_differs_from_paper():
    shape = (16, 20)
    paper = low_frequency_images(shape, 4, rng(2)).numpy()
    ref = low_frequency_images(shape, 4, rng(2), reference_spectrum=True).numpy()
    assert not np.allclose(paper, ref)
    # the official spectrum[:, 0] + 1j*spectrum[:, 1] leaves only the two lowest frequencies of the last axis
    ref_energy = np.abs(np.fft.rfft(ref, axis=-1))
    paper_energy = np.abs(np.fft.rfft(paper, axis=-1))
    assert ref_energy[..., 2:].max() < 1e-9 * ref_energy.max()
    assert paper_energy[..., 2:].max() > 1e-3 * paper_energy.max()
    m_paper, _ = sample_fmix_masks(shape, [0.5] * 4, rng(2))
    m_ref, _ = sample_fmix_masks(shape, [0.5] * 4, rng(2), reference_spectrum=True)
    assert not torch.equal(m_paper, m_ref)


def test_fmix_mask_validation():
    with pytest.raises(ValueError, match="max_soft"):
        sample_fmix_masks((8, 8), [0.5], rng(0), max_soft=0.6)
    with pytest.raises(ValueError, match="decay_power"):
        sample_fmix_masks((8, 8), [0.5], rng(0), decay_power=-1)
    with pytest.raises(ValueError, match="1, 2 or 3"):
        sample_fmix_masks((2, 2, 2, 2), [0.5], rng(0))


# --------------------------------------------------------------------------- FMix on batches


@pytest.mark.parametrize("shape,layout", [((3, 40), "NCL"), ((2, 12, 16), "NCHW"), ((10, 12, 3), "NHWC"),
                                          ((2, 4, 6, 8), "NCDHW")])
@pytest.mark.parametrize("mode", MODES)
def test_fmix_batch_lam_is_mask_mean(shape, layout, mode):
    b = 6
    x = torch.arange(1, b + 1, dtype=torch.float32).view(b, *[1] * len(shape)).expand(b, *shape).contiguous()
    if layout == "NHWC":
        x = x.to(torch.uint8)
    channel_dim = len(shape) if layout.endswith("C") else 1
    spatial = shape[:-1] if layout.endswith("C") else shape[1:]
    seg = ints(9, b, *spatial)
    mb = fmix(x, torch.arange(b), rng(11), num_classes=C, mode=mode, seg=seg, layout=layout)
    keep = (mb.x == x).all(dim=channel_dim)
    assert torch.equal(mb.x, torch.where(keep.unsqueeze(channel_dim), x, x[mb.perm]))
    lam = keep.reshape(b, -1).double().mean(1).to(torch.float32)
    assert torch.equal(mb.lam, lam)
    assert torch.equal(mb.seg, torch.where(keep, seg, seg[mb.perm]))
    if mode == "batch":
        assert all(torch.equal(keep[0], k) for k in keep)
    if mode == "pair":
        assert torch.equal(keep, keep[mb.perm])  # a pair shares one mask (and lam)


def test_fmix_soft_uint8_rounds_like_float_reference():
    b = 6
    x8 = torch.randint(0, 256, (b, 16, 16, 3), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    m8 = fmix(x8, torch.arange(b), rng(4), num_classes=C, max_soft=0.2, mode="elem")
    mf = fmix(x8.float(), torch.arange(b), rng(4), num_classes=C, max_soft=0.2, mode="elem", layout="NHWC")
    assert torch.equal(m8.x, mf.x.round().to(torch.uint8))
    assert not torch.equal(mf.x, mf.x.round()), "soft edge not exercised"
    assert torch.equal(m8.lam, mf.lam)


# --------------------------------------------------------------------------- MaskMix


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("mode", MODES)
def test_maskmix_cells_align_and_lam_is_quantised(layout, mode):
    b, side, patch, mask_patch, alpha = 8, 24, 4, 8, 1.0
    x = distinct(b, side, side, layout)
    cells = (side // mask_patch) ** 2
    for seed in range(6):
        mb = maskmix(x, torch.arange(b), rng(seed), num_classes=C, patch_size=patch, mask_patch=mask_patch,
                     alpha=alpha, mode=mode)
        keep = own_mask(mb.x, x, layout)
        # constant on each mask cell (so on each model patch)
        grid = keep[:, ::mask_patch, ::mask_patch]
        assert torch.equal(keep, grid.repeat_interleave(mask_patch, 1).repeat_interleave(mask_patch, 2))
        kept = grid.reshape(b, -1).sum(1)
        assert torch.equal(mb.lam, (kept.double() / cells).to(torch.float32))
        # count = ceil(T * lam) for the Beta draw right after the partner permutation
        r = rng(seed)
        perm = partner_index(b, "derangement", r, mode)
        k = {"batch": 1, "elem": b, "pair": b}[mode]
        beta = r.beta(alpha, alpha, size=k)
        if mode == "pair":
            beta = beta[cycle_ids(perm)]
        expected = np.ceil(cells * np.broadcast_to(beta, (b,)))
        assert np.array_equal(kept.numpy(), expected)
        # the plan holds the same mask on the model's token grid
        assert torch.equal(mb.plan.keep, keep[:, ::patch, ::patch])
        assert mb.plan.keep.shape == (b, side // patch, side // patch)


def test_maskmix_partial_edge_cells_and_defaults():
    # 40 px, mask cells of 16 on patch 8: ceil(40/16) = 3 -> T = 9 cells, the last row/column of cells is half
    b = 6
    x = distinct(b, 40, 40, "NCHW")
    mb = maskmix(x, torch.arange(b), rng(1), num_classes=C, patch_size=8, mask_patch=16, mode="elem")
    keep = own_mask(mb.x, x, "NCHW")
    grid = keep[:, ::16, ::16]
    assert grid.shape == (b, 3, 3)
    assert torch.equal(mb.lam, (grid.reshape(b, -1).sum(1).double() / 9).to(torch.float32))
    # defaults: DeiT patch 14, 4x4 cells of 56 px at 224
    x224 = distinct(2, 224, 224, "NHWC")
    mb = maskmix(x224, torch.arange(2), rng(0), num_classes=C)
    keep = own_mask(mb.x, x224, "NHWC")
    assert torch.equal(keep, keep[:, ::56, ::56].repeat_interleave(56, 1).repeat_interleave(56, 2))
    assert mb.plan.keep.shape == (2, 16, 16)
    assert torch.all((mb.lam * 16) == (mb.lam * 16).round())


def test_maskmix_patch_grid_validation():
    x = floats(4, 3, 32, 32)
    with pytest.raises(ValueError, match="mask_patch must be a positive multiple of patch_size 16"):
        maskmix(x, torch.arange(4), rng(0), num_classes=C, patch_size=16, mask_patch=56)
    with pytest.raises(ValueError, match="not a multiple of patch_size 14"):
        maskmix(x, torch.arange(4), rng(0), num_classes=C)


# --------------------------------------------------------------------------- Patch Mixing


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_patch_mixing_lam_is_kept_patch_fraction(layout, mode):
    b, h, w, patch, alpha = 8, 16, 24, 4, 1.0
    n = (h // patch) * (w // patch)
    x = distinct(b, h, w, layout)
    for seed in range(6):
        mb = patch_mixing(x, torch.arange(b), rng(seed), num_classes=C, patch_size=patch, mode=mode)
        keep = own_mask(mb.x, x, layout)
        grid = keep[:, ::patch, ::patch]
        assert torch.equal(keep, grid.repeat_interleave(patch, 1).repeat_interleave(patch, 2))
        kept = grid.reshape(b, -1).sum(1)
        assert torch.equal(mb.lam, (kept.double() / n).to(torch.float32))
        r = rng(seed)
        partner_index(b, "derangement", r, mode)
        beta = np.broadcast_to(r.beta(alpha, alpha, size=1 if mode == "batch" else b), (b,))
        assert np.array_equal(kept.numpy(), np.rint(beta * n))


def test_patch_mixing_validation():
    with pytest.raises(ValueError, match="not a multiple of patch_size 16"):
        patch_mixing(floats(2, 3, 24, 24), torch.arange(2), rng(0), num_classes=C)


# --------------------------------------------------------------------------- shared properties


@pytest.mark.parametrize("method", BOX_MASK_METHODS)
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_seg_mixed_with_the_same_region(method, layout):
    b, h, w = 6, 16, 24
    x = distinct(b, h, w, layout)
    seg = ints(20, b, h, w)
    for seed in range(4):
        mb = call(method, x, torch.arange(b), seed, mode="elem", seg=seg)
        keep = own_mask(mb.x, x, layout)
        if method == "resizemix":  # nearest-resized partner seg inside the box
            for i in range(b):
                if keep[i].all():
                    continue
                y1, y2, x1, x2 = rectangle(~keep[i])
                want = F.interpolate(seg[mb.perm[i]][None, None].float(), size=(y2 - y1, x2 - x1), mode="nearest")
                assert torch.equal(mb.seg[i, y1:y2, x1:x2], want[0, 0].long())
                assert torch.equal(mb.seg[i][keep[i]], seg[i][keep[i]])
        else:
            assert torch.equal(mb.seg, torch.where(keep, seg, seg[mb.perm]))


@pytest.mark.parametrize("method", BOX_MASK_METHODS)
def test_seg_shape_checked(method):
    x = floats(4, 3, 16, 16)
    with pytest.raises(ValueError, match="seg must have shape"):
        call(method, x, torch.arange(4), 0, seg=torch.zeros(4, 16, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        call(method, x, torch.arange(4), 0, seg=torch.zeros(4, 16, 16))


@pytest.mark.parametrize("method", NEW_METHODS)
def test_elem_mode_gives_per_sample_lam_pair_mode_shares(method):
    b = 12
    x = floats(b, 3, 32, 32)
    mb = call(method, x, torch.arange(b) % C, 3, mode="elem")
    assert len(torch.unique(mb.lam)) > 3
    mb = call(method, x, torch.arange(b) % C, 3, mode="pair")
    assert torch.equal(mb.lam, mb.lam[mb.perm])
    assert len(torch.unique(mb.lam)) > 1
    mb = call(method, x, torch.arange(b) % C, 3, mode="batch")
    assert len(torch.unique(mb.lam)) == 1


@pytest.mark.parametrize("method", NEW_METHODS + ("choice",))
def test_same_seed_same_output(method):
    b = 8
    x = torch.randint(0, 256, (b, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    seg = ints(5, b, 32, 32)
    kw = dict(mode="elem", seg=seg) if method != "choice" else dict(choices=MASK_CHOICES, seg=seg)
    a, c, d = (call(method, x, torch.arange(b), s, **kw) for s in (7, 7, 8))
    for field in ("x", "lam", "perm", "seg"):
        assert torch.equal(getattr(a, field), getattr(c, field))
    assert not torch.equal(a.x, d.x)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_prob_zero_leaves_batch_unchanged(method):
    x = floats(6, 3, 32, 32)
    seg = ints(5, 6, 32, 32)
    for mode in MODES:
        mb = call(method, x, torch.arange(6), 1, prob=0.0, mode=mode, seg=seg)
        assert torch.equal(mb.x, x) and torch.equal(mb.seg, seg)
        assert torch.all(mb.lam == 1.0)


@pytest.mark.parametrize("method", NEW_METHODS + ("choice",))
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_targets_sum_to_one(method, smoothing):
    b = 10
    x = floats(b, 3, 32, 32)
    y = torch.arange(b) % C
    kw = dict(mode="elem") if method != "choice" else dict(choices=DEIT_LIKE)
    mb = call(method, x, y, 2, label_smoothing=smoothing, **kw)
    t = mb.targets
    assert max_diff(t.sum(1), torch.ones(b)) < 1e-6
    off = smoothing / C
    lam = mb.lam.view(-1, 1)
    expected = lam * F.one_hot(y, C) * (1 - smoothing) + (1 - lam) * F.one_hot(mb.y_b, C) * (1 - smoothing) + off
    assert max_diff(t, expected.float()) < 1e-6


@pytest.mark.parametrize("method", NEW_METHODS)
def test_inputs_not_modified(method):
    x = floats(6, 3, 32, 32)
    before = x.clone()
    call(method, x, torch.arange(6), 0, mode="elem")
    assert torch.equal(x, before)


# --------------------------------------------------------------------------- method choice

DEIT_LIKE = [{"weight": 0.5, "mix": {"method": "mixup", "alpha": 0.8}},
             {"weight": 0.5, "mix": {"method": "cutmix", "alpha": 1.0}}]
MASK_CHOICES = [{"weight": 1.0, "mix": {"method": "cutmix", "mode": "elem"}},
                {"weight": 1.0, "mix": {"method": "fmix", "mode": "elem"}}]


def tagged(name):
    """A stand-in mixing method that only reports its name (the policy, not the mixing, is under test)."""
    def mix(x, y, rng, *, num_classes, label_smoothing=0.0, alpha=1.0):
        batch = unmixed(x, y, num_classes, label_smoothing)
        batch.method = name
        return batch
    return mix


def test_method_choice_frequencies_follow_weights():
    methods = {name: tagged(name) for name in ("a", "b", "c")}
    choices = [{"weight": 1.0, "mix": {"method": "a"}},
               {"weight": 3.0, "mix": {"method": "b", "alpha": 0.5}},
               {"weight": 1.0, "mix": {"method": "c"}}]
    x = torch.zeros(2, 1, 1, 1)
    r, trials = rng(0), 2000
    counts = {"a": 0, "b": 0, "c": 0, "none": 0}
    for _ in range(trials):
        counts[method_choice(x, torch.arange(2), r, num_classes=C, choices=choices, methods=methods,
                             prob=0.8).method] += 1
    expected = {"none": 0.2, "a": 0.8 * 0.2, "b": 0.8 * 0.6, "c": 0.8 * 0.2}
    for name, p in expected.items():
        sigma = np.sqrt(trials * p * (1 - p))
        assert abs(counts[name] - trials * p) < 4 * sigma, (name, counts)
    # the registered policy draws the same sequence from the same seed
    real = [{"weight": 1.0, "mix": {"method": "mixup"}}, {"weight": 3.0, "mix": {"method": "cutmix"}},
            {"weight": 1.0, "mix": {"method": "resizemix"}}]
    r1, r2 = rng(5), rng(5)
    picked = [METHODS["choice"](floats(2, 3, 8, 8), torch.arange(2), r1, num_classes=C, choices=real).method
              for _ in range(20)]
    again = [METHODS["choice"](floats(2, 3, 8, 8), torch.arange(2), r2, num_classes=C, choices=real).method
             for _ in range(20)]
    assert picked == again and set(picked) == {"mixup", "cutmix", "resizemix"}


def test_method_choice_uses_choice_smoothing_and_passes_seg():
    x = floats(4, 3, 16, 16)
    seg = ints(3, 4, 16, 16)
    choices = [{"weight": 1.0, "mix": {"method": "cutmix", "label_smoothing": 0.0}}]
    mb = METHODS["choice"](x, torch.arange(4), rng(0), num_classes=C, choices=choices, label_smoothing=0.2,
                           seg=seg)
    assert mb.method == "cutmix" and mb.label_smoothing == 0.2 and mb.seg is not None
    mb = METHODS["choice"](x, torch.arange(4), rng(0), num_classes=C, choices=choices, prob=0.0, seg=seg)
    assert mb.method == "none" and torch.equal(mb.seg, seg)


@pytest.mark.parametrize("choices,match", [
    ([], "at least one"),
    ([{"weight": 0.0, "mix": {"method": "mixup"}}], r"choices\[0\].weight"),
    ([{"weight": 1.0, "mix": {"method": "nope"}}], r"choices\[0\].mix.method 'nope'"),
    ([{"weight": 1.0, "mix": {"method": "mixup", "bogus": 1}}], r"no parameters \['bogus'\]"),
    ([{"weight": 1.0, "mix": {"method": "mixup", "label_smoothing": 0.3}}], "label_smoothing once"),
    ([{"weight": 1.0, "method": "mixup"}], "exactly the keys"),
])
def test_method_choice_errors(choices, match):
    with pytest.raises(ValueError, match=match):
        METHODS["choice"](floats(2, 3, 8, 8), torch.arange(2), rng(0), num_classes=C, choices=choices,
                          label_smoothing=0.1)


def test_method_choice_seg_needs_mask_methods():
    with pytest.raises(ValueError, match="'mixup' cannot mix segmentation masks"):
        METHODS["choice"](floats(2, 3, 8, 8), torch.arange(2), rng(0), num_classes=C, choices=DEIT_LIKE,
                          seg=torch.zeros(2, 8, 8, dtype=torch.long))


# --------------------------------------------------------------------------- config


def spec(mix):
    return validate_spec({"name": "t", "data": {"shards": "shards", "num_classes": C}, "mix": mix})


def test_config_defaults_match_papers():
    assert spec({"method": "resizemix"}).mix.scope == (0.1, 0.8)
    fm = spec({"method": "fmix"}).mix
    assert (fm.alpha, fm.decay_power, fm.max_soft, fm.reference_spectrum) == (1.0, 3.0, 0.0, False)
    mm = spec({"method": "maskmix"}).mix
    assert (mm.patch_size, mm.mask_patch) == (14, 56)
    assert spec({"method": "patch_mixing"}).mix.patch_size == 16


@pytest.mark.parametrize("mix,field", [
    ({"method": "resizemix", "scope": [0.9, 0.2]}, "mix.scope"),
    ({"method": "resizemix", "interpolation": "cubic"}, "mix.interpolation"),
    ({"method": "fmix", "max_soft": 0.7}, "mix.max_soft"),
    ({"method": "fmix", "decay_power": -1}, "mix.decay_power"),
    ({"method": "maskmix", "patch_size": 16, "mask_patch": 56}, "mix.mask_patch"),
    ({"method": "patch_mixing", "patch_size": 0}, "mix.patch_size"),
    ({"method": "fmix", "bogus": 1}, "mix.bogus"),
    ({"method": "choice", "choices": []}, "mix.choices"),
    ({"method": "choice", "choices": [{"weight": -1, "mix": {"method": "mixup"}}]}, "mix.choices.0.weight"),
    ({"method": "choice", "choices": [{"weight": 1, "mix": {"method": "cutmix", "bogus": 2}}]},
     "mix.choices.0.mix.bogus"),
    ({"method": "choice", "choices": [{"weight": 1, "mix": {"method": "cutmix", "label_smoothing": 0.1}}]},
     "mix.choices.0.mix"),
])
def test_config_errors_name_the_field(mix, field):
    with pytest.raises(ConfigError) as err:
        spec(mix)
    assert field in [path for path, _ in err.value.problems], err.value.problems


def test_config_unknown_nested_field_lists_allowed():
    with pytest.raises(ConfigError, match="allowed fields: alpha, correct_lam"):
        spec({"method": "choice", "choices": [{"weight": 1, "mix": {"method": "cutmix", "bogus": 2}}]})


@pytest.mark.parametrize("mix", [
    {"method": "resizemix", "scope": [0.2, 0.5], "interpolation": "bilinear", "mode": "elem"},
    {"method": "fmix", "max_soft": 0.1, "reference_spectrum": True},
    {"method": "maskmix", "patch_size": 4, "mask_patch": 8},
    {"method": "patch_mixing", "patch_size": 8, "mode": "pair"},
    {"method": "choice", "label_smoothing": 0.1, "choices": DEIT_LIKE},
])
def test_config_section_builds_a_mixer(mix):
    params = spec(mix).mix.model_dump()
    method = params.pop("method")
    mb = build_mixer(method, C, **params)(floats(4, 3, 32, 32), torch.arange(4), rng(0))
    assert max_diff(mb.targets.sum(1), torch.ones(4)) < 1e-6
    assert mb.method == method or method == "choice" and mb.method in ("mixup", "cutmix")


# --------------------------------------------------------------------------- CUDA (same code)


@cuda
@pytest.mark.parametrize("method", BOX_MASK_METHODS)
def test_cuda_matches_cpu(method):
    b = 8
    x = torch.randint(0, 256, (b, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    seg = ints(5, b, 32, 32)
    cpu = call(method, x, torch.arange(b), 5, mode="elem", seg=seg)
    gpu = call(method, x.cuda(), torch.arange(b).cuda(), 5, mode="elem", seg=seg.cuda())
    assert gpu.x.is_cuda and gpu.seg.is_cuda
    if method == "fmix":  # float FFTs may differ in the last bit: check the invariants instead
        keep = (gpu.x == x.cuda()).all(dim=3)
        assert torch.equal(gpu.lam, keep.reshape(b, -1).double().mean(1).float().cpu())
        assert torch.allclose(gpu.lam, cpu.lam, atol=2 / (32 * 32))
    else:
        assert torch.equal(gpu.x.cpu(), cpu.x) and torch.equal(gpu.seg.cpu(), cpu.seg)
        assert torch.equal(gpu.lam, cpu.lam)


@cuda
def test_cuda_fmix_masks_binary_mean_lam():
    lam = rng(0).random(16)
    masks, means = sample_fmix_masks((64, 64), lam, rng(1), device="cuda")
    assert masks.is_cuda
    assert set(torch.unique(masks).tolist()) <= {0.0, 1.0}
    np.testing.assert_array_equal(masks.reshape(16, -1).double().mean(1).cpu().numpy(), means)

"""Bad inputs to the mixing API are refused at the call, with the argument named.

Each case here used to give silently wrong output (NaN lam and pixels, a uint8 NCHW batch
mixed as NHWC, every C-Mixup sample paired with the last one) or an error far from its
cause (labels outside ``num_classes`` only when ``.targets`` was read, an MKL error from
FMix on an empty batch).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from mixflow.mix import (METHODS, build_mixer, c_mixup, c_mixup_probs, cutmix, fmix, maskmix, mixup, mixup_cutmix,
                         cpu_kernels, resizemix)

C = 10
# The labelled-image methods and the parameters that make them run on a small 16x16 batch.
IMAGE_METHODS = {"none": {}, "mixup": {}, "cutmix": {}, "mixup_cutmix": {}, "resizemix": {}, "fmix": {},
                 "maskmix": {"patch_size": 4, "mask_patch": 8}, "patch_mixing": {"patch_size": 4},
                 "transmix": {}, "smmix": {"token_grid": 4}, "manifold_mixup": {},
                 "choice": {"choices": [{"weight": 1.0, "mix": {"method": "mixup"}}]}}


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def floats(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(n))


def test_every_image_method_is_covered():
    assert set(IMAGE_METHODS) | {"c_mixup", "mix3d", "beat_sync_mixup"} == set(METHODS)


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("method", ["cutmix", "mixup_cutmix", "resizemix", "fmix", "maskmix", "patch_mixing",
                                    "transmix", "smmix"])
def test_uint8_nchw_is_refused_under_auto_layout(method):
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"x is a uint8 batch of shape \(8, 3, 16, 16\) that looks NCHW .* "
                                         r"pass layout='NCHW'"):
        build_mixer(method, C, **IMAGE_METHODS[method])(x, torch.arange(8) % C, rng())


def test_uint8_nchw_mixes_correctly_when_the_layout_is_given():
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mb = cutmix(x, torch.arange(8), rng(3), num_classes=C, mode="elem", layout="NCHW")
    same = cutmix(x.permute(0, 2, 3, 1).contiguous(), torch.arange(8), rng(3), num_classes=C, mode="elem")
    assert torch.equal(mb.lam, same.lam)
    assert torch.equal(mb.x, same.x.permute(0, 3, 1, 2))
    # The documented forms keep working under "auto": uint8 NHWC, float NCHW.
    nhwc = cutmix(x.permute(0, 2, 3, 1).contiguous(), torch.arange(8), rng(0), num_classes=C)
    assert nhwc.x.shape == (8, 16, 16, 3)
    assert cutmix(x.float(), torch.arange(8), rng(0), num_classes=C).x.shape == (8, 3, 16, 16)


def test_uint8_channels_first_audio_is_refused_by_fmix():
    x = torch.randint(0, 256, (4, 1, 64), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"looks NCL \(channels first\).*pass layout='NCL'"):
        fmix(x, torch.arange(4), rng(), num_classes=C)
    assert fmix(x, torch.arange(4), rng(), num_classes=C, layout="NCL").x.shape == (4, 1, 64)


# --------------------------------------------------------------------------- alpha, prob, smoothing


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 0.0])
@pytest.mark.parametrize("method", ["mixup", "cutmix", "fmix", "maskmix", "patch_mixing", "manifold_mixup"])
def test_alpha_must_be_finite_and_positive(method, bad):
    with pytest.raises(ValueError, match=rf"alpha must be > 0 and finite, got {bad}"):
        build_mixer(method, C, alpha=bad, **IMAGE_METHODS[method])(floats(), torch.arange(6), rng())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5])
@pytest.mark.parametrize("name", ["mixup_alpha", "cutmix_alpha"])
@pytest.mark.parametrize("method", ["mixup_cutmix", "transmix"])
def test_named_alphas_of_the_switchers(method, name, bad):
    # A NaN mixup_alpha used to switch MixUp off silently (NaN > 0 is False) instead of failing.
    with pytest.raises(ValueError, match=rf"{name} must be >= 0 and finite \(0 turns it off\), got {bad}"):
        build_mixer(method, C, **{name: bad})(floats(), torch.arange(6), rng())


def test_alpha_must_be_a_number():
    with pytest.raises(TypeError, match="alpha must be a number, got str"):
        mixup(floats(), torch.arange(6), rng(), num_classes=C, alpha="0.4")


def test_c_mixup_alpha():
    with pytest.raises(ValueError, match="alpha must be > 0 and finite, got nan"):
        c_mixup(torch.randn(4, 2), torch.randn(4), rng(), alpha=float("nan"))


@pytest.mark.parametrize("kw, message", [
    ({"prob": float("nan")}, r"prob must be in \[0, 1\], got nan"),
    ({"prob": 1.5}, r"prob must be in \[0, 1\], got 1.5"),
    ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\), got 1.0"),
    ({"label_smoothing": float("nan")}, r"label_smoothing must be in \[0, 1\), got nan"),
    ({"switch_prob": -0.1}, r"switch_prob must be in \[0, 1\], got -0.1"),
])
def test_probabilities_are_checked(kw, message):
    with pytest.raises(ValueError, match=message):
        mixup_cutmix(floats(), torch.arange(6), rng(), num_classes=C, **kw)


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize("bad", [C, C + 5, -1])
@pytest.mark.parametrize("method", list(IMAGE_METHODS))
def test_labels_outside_num_classes_fail_at_the_call(method, bad):
    y = torch.tensor([0, 1, 2, bad, 4, 5])
    mixer = build_mixer(method, C, **IMAGE_METHODS[method])
    with pytest.raises(ValueError, match=rf"y holds label {bad} at sample 3, outside 0\.\.9 \(num_classes=10\)"):
        mixer(floats(), y, rng())  # not only when .targets is read


@pytest.mark.parametrize("n", [5, 7])
@pytest.mark.parametrize("method", list(IMAGE_METHODS))
def test_y_of_another_length_fails_at_the_call(method, n):
    mixer = build_mixer(method, C, **IMAGE_METHODS[method])
    with pytest.raises(ValueError, match=rf"x has 6 samples but y has {n} labels"):
        mixer(floats(), torch.arange(n) % C, rng())


def test_labels_must_be_integer_class_ids():
    with pytest.raises(TypeError, match="y must hold integer class ids, got dtype torch.float32"):
        mixup(floats(), torch.tensor([0.0, 1.0, float("nan"), 3.0, 4.0, 5.0]), rng(), num_classes=C)
    with pytest.raises(ValueError, match=r"x has 6 samples but y has 6 labels \(shape \(6, 2\)\)"):
        mixup(floats(), torch.zeros(6, 2, dtype=torch.long), rng(), num_classes=C)
    with pytest.raises(ValueError, match="num_classes must be an int >= 1, got 0"):
        mixup(floats(), torch.zeros(6, dtype=torch.long), rng(), num_classes=0)


# --------------------------------------------------------------------------- C-Mixup


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_c_mixup_refuses_a_non_finite_label(bad):
    x, y = torch.randn(5, 3), torch.tensor([0.1, 0.2, bad, 0.4, 0.5])
    # One NaN label used to pair every sample with the last one (perm [4, 4, 4, 4, 4]).
    with pytest.raises(ValueError, match=rf"y holds {bad} at sample 2; C-Mixup pairs samples by label distance"):
        c_mixup(x, y, rng())
    with pytest.raises(ValueError, match=rf"labels holds {bad} at sample 2"):
        c_mixup_probs(y)
    with pytest.raises(ValueError, match="labels holds nan at sample 1"):
        c_mixup_probs(torch.tensor([[0.0, 1.0], [2.0, float("nan")], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="sigma must be > 0 and finite, got nan"):
        c_mixup(x, torch.randn(5), rng(), sigma=float("nan"))


# --------------------------------------------------------------------------- empty batches


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("layout, shape", [("auto", (0, 3, 16, 16)), ("NHWC", (0, 16, 16, 3)), ("NCL", (0, 2, 32))])
def test_fmix_on_an_empty_batch_gives_an_empty_result(mode, layout, shape):
    x = torch.zeros(shape, dtype=torch.uint8 if layout == "NHWC" else torch.float32)
    mb = fmix(x, torch.zeros(0, dtype=torch.long), rng(), num_classes=C, mode=mode, layout=layout)
    assert mb.x.shape == shape and mb.lam.shape == (0,) and mb.perm.shape == (0,)
    assert mb.method == "fmix" and mb.targets.shape == (0, C)


@pytest.mark.parametrize("fn", [mixup, cutmix, mixup_cutmix, resizemix, maskmix])
def test_other_methods_on_an_empty_batch_agree(fn):
    kw = {"patch_size": 4, "mask_patch": 8} if fn is maskmix else {}
    mb = fn(floats(0), torch.zeros(0, dtype=torch.long), rng(), num_classes=C, **kw)
    assert mb.x.shape == (0, 3, 16, 16) and mb.targets.shape == (0, C)


# --------------------------------------------------------------------------- compiled kernels
# The numba loops index raw memory. Before these checks, an ``out`` smaller than ``x`` was
# written past its end (SIGSEGV / heap corruption) and a smaller ``base`` read past its end.


def kernel_batch():
    x = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return x, torch.roll(torch.arange(16), 1), np.arange(16)


def small_buffers(x):
    return {"fewer samples": torch.empty(2, *x.shape[1:], dtype=x.dtype),
            "flat and short": torch.empty(32, dtype=x.dtype),
            "same size, other shape": torch.empty(16, 3, 32, 32, dtype=x.dtype),
            "other dtype": torch.empty(x.shape, dtype=torch.float32)}


@pytest.mark.parametrize("case", ["fewer samples", "flat and short", "same size, other shape", "other dtype"])
def test_kernels_refuse_an_out_that_does_not_match_x(case):
    x, perm, rows = kernel_batch()
    out = small_buffers(x)[case]
    want = re.escape(f"out must have x's shape (16, 32, 32, 3) and dtype torch.uint8, got {tuple(out.shape)}")
    with pytest.raises(ValueError, match="blend_rows: " + want):
        cpu_kernels.blend_rows(x, perm, np.full(16, 0.5), rows, out)
    with pytest.raises(ValueError, match="copy_and_paste: " + want):
        cpu_kernels.copy_and_paste(x, perm, rows, out, x, None, 1, 2)
    with pytest.raises(ValueError, match="copy_and_paste: " + want):
        cpu_kernels.copy_and_paste(x, perm, rows, out, x, np.array([[0, 8, 0, 8]] * 16), 1, 2)
    with pytest.raises(ValueError, match="select_rows: " + want):
        cpu_kernels.select_rows(x, perm, torch.zeros(1, 32, 32, dtype=torch.bool), out)


@pytest.mark.parametrize("case", ["fewer samples", "flat and short", "other dtype"])
def test_copy_and_paste_refuses_a_base_that_does_not_match_x(case):
    x, perm, rows = kernel_batch()
    base = small_buffers(x)[case]
    with pytest.raises(ValueError, match=r"copy_and_paste: base must have x's shape \(16, 32, 32, 3\)"):
        cpu_kernels.copy_and_paste(x, perm, rows, torch.empty_like(x), base, np.array([[0, 8, 0, 8]]), 1, 2)


def test_kernels_refuse_strided_gpu_less_and_autograd_buffers():
    x, perm, rows = kernel_batch()
    strided = torch.empty(16, 32, 64, 3, dtype=torch.uint8)[:, :, ::2]
    with pytest.raises(ValueError, match=r"blend_rows: out must be contiguous \(strides"):
        cpu_kernels.blend_rows(x, perm, np.full(16, 0.5), rows, strided)  # a reshape would write into a copy
    with pytest.raises(ValueError, match=r"copy_and_paste: x must be contiguous"):
        cpu_kernels.copy_and_paste(strided, perm, rows, torch.empty_like(x), x, None, 1, 2)
    f = torch.rand(4, 3, 8, 8)
    with pytest.raises(ValueError, match="blend_rows: out must not require grad"):
        cpu_kernels.blend_rows(f, torch.tensor([1, 2, 3, 0]), np.full(4, 0.5), np.arange(4),
                               torch.empty_like(f).requires_grad_())
    with pytest.raises(TypeError, match="blend_rows: out must be a torch.Tensor, got ndarray"):
        cpu_kernels.blend_rows(f, torch.tensor([1, 2, 3, 0]), np.full(4, 0.5), np.arange(4), np.empty((4, 3, 8, 8)))
    with pytest.raises(ValueError, match=r"blend_rows: x must be one of torch.uint8, torch.float32, got torch.int16"):
        i16 = torch.zeros(4, 3, 8, 8, dtype=torch.int16)
        cpu_kernels.blend_rows(i16, torch.tensor([1, 2, 3, 0]), np.full(4, 0.5), np.arange(4), torch.empty_like(i16))
    with pytest.raises(ValueError, match="blend_rows: lam must be finite, got nan at sample 2"):
        cpu_kernels.blend_rows(f, torch.tensor([1, 2, 3, 0]), np.array([0.5, 0.5, np.nan, 0.5]), np.arange(4),
                               torch.empty_like(f))


def test_select_rows_refuses_a_mask_that_does_not_fit():
    x, perm, _ = kernel_batch()
    out = torch.empty_like(x)
    with pytest.raises(ValueError, match=r"select_rows: keep must be a bool CPU tensor \[1 or B, \*S\], got torch.float32"):
        cpu_kernels.select_rows(x, perm, torch.zeros(1, 32, 32), out)
    with pytest.raises(ValueError, match=r"keep of shape \(3, 32, 32\) does not fit a batch of shape \(16, 32, 32, 3\)"):
        cpu_kernels.select_rows(x, perm, torch.zeros(3, 32, 32, dtype=torch.bool), out)
    with pytest.raises(ValueError, match=r"keep of shape \(0, 32, 32\) does not fit"):
        cpu_kernels.select_rows(x, perm, torch.zeros(0, 32, 32, dtype=torch.bool), out)


def test_kernels_still_mix_when_the_buffers_match():
    x, perm, rows = kernel_batch()
    out = torch.empty_like(x)
    cpu_kernels.blend_rows(x, perm, np.full(16, 0.25), rows, out)
    want = torch.from_numpy(np.rint(np.float32(0.25) * x.numpy().astype(np.float32)
                                    + np.float32(0.75) * x[perm].numpy().astype(np.float32)).astype(np.uint8))
    assert torch.equal(out, want)
    cpu_kernels.copy_and_paste(x, perm, rows, out, x, np.array([[0, 8, 0, 8]] * 16), 1, 2)
    assert torch.equal(out[:, :8, :8], x[perm][:, :8, :8]) and torch.equal(out[:, 8:], x[:, 8:])
    keep = torch.zeros(1, 32, 32, dtype=torch.bool)
    keep[:, :, :16] = True
    cpu_kernels.select_rows(x, perm, keep, out)
    assert torch.equal(out, torch.where(keep.unsqueeze(-1), x, x[perm]))

"""The fast mixing kernels (``mixflow.mix.ops``, ``mixflow.mix.huge_pages``) equal plain references exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mixflow.mix import cpu_kernels, huge_pages, ops
from mixflow.mix.huge_pages import empty_like
from mixflow.mix.fmix_masks import binarise, top_values
from mixflow.mix.mask_ops import apply_mask
from mixflow.mix.ops import blend, blend_or_paste, paste_boxes, paste_boxes_masked


def reference_blend(x: torch.Tensor, perm: torch.Tensor, lam: np.ndarray) -> torch.Tensor:
    """The definition: float32 ``lam*x + (1-lam)*x[perm]`` over the whole batch; integers rounded back.
    Both weights are rounded to float32 once from the float64 lam, as timm does (``float32(1-lam)``)."""
    shape = (-1, *([1] * (x.dim() - 1)))
    w = torch.as_tensor(lam, dtype=torch.float32).view(shape)
    v = torch.as_tensor(1 - np.asarray(lam, dtype=np.float64), dtype=torch.float32).view(shape)
    mixed = w * x.to(torch.float32) + v * x[perm].to(torch.float32)
    return mixed.round().to(x.dtype) if not x.dtype.is_floating_point else mixed.to(x.dtype)


def reference_paste(x, perm, boxes, channels_last, base=None):
    out = (x if base is None else base).clone()
    for i, (y1, y2, x1, x2) in enumerate(np.broadcast_to(np.asarray(boxes).reshape(-1, 4), (len(x), 4)).tolist()):
        if channels_last:
            out[i, y1:y2, x1:x2, :] = x[perm[i], y1:y2, x1:x2, :]
        else:
            out[i, :, y1:y2, x1:x2] = x[perm[i], :, y1:y2, x1:x2]
    return out


def batch(dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    if dtype == torch.int16:
        return torch.randint(-3000, 3000, shape, dtype=torch.int16, generator=g)
    return (torch.randn(shape, generator=g) * 50).to(dtype)


# --------------------------------------------------------------------------- blend


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.float64, torch.float16, torch.bfloat16,
                                   torch.int16])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("chunk", [1 << 19, 700, 100])  # one chunk; several with a partial last one; one sample
def test_blend_equals_reference_bit_for_bit(dtype, per_sample, chunk, monkeypatch):
    monkeypatch.setattr(ops, "CHUNK_ELEMS", chunk)
    x = batch(dtype, (11, 3, 7, 9) if dtype != torch.uint8 else (11, 7, 9, 3))
    rng = np.random.default_rng(1)
    perm = torch.as_tensor(rng.permutation(11))
    lam = rng.random(11) if per_sample else np.full(11, rng.random())
    out = blend(x, perm, lam)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, reference_blend(x, perm, lam))


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1 << 19, 700])
def test_blend_copies_lam_one_samples_and_blends_the_rest(dtype, chunk, monkeypatch):
    monkeypatch.setattr(ops, "CHUNK_ELEMS", chunk)
    x = batch(dtype, (13, 3, 7, 9))
    rng = np.random.default_rng(2)
    perm = torch.as_tensor(rng.permutation(13))
    for lam in (np.where(rng.random(13) < 0.5, 1.0, rng.random(13)),  # scattered rows
                np.where(np.arange(13) % 3 == 0, 1.0, 0.25)):         # one shared lam for the rest
        out = blend(x, perm, lam)
        assert torch.equal(out, reference_blend(x, perm, lam))
        assert torch.equal(out[lam == 1.0], x[lam == 1.0])


def test_blend_uint8_rounds_half_to_even_and_keeps_the_range():
    # samples: 1, 2, 0, 255 (constant images); partners: next sample
    x = torch.tensor([1, 2, 0, 255], dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 2, 2, 3).contiguous()
    perm = torch.tensor([1, 2, 3, 0])
    out = blend(x, perm, np.array([0.5, 0.5, 0.0, 1.0]))
    # 0.5*1 + 0.5*2 = 1.5 -> 2; 0.5*2 + 0.5*0 = 1; lam 0 takes the partner (255); lam 1 keeps 255
    assert out[:, 0, 0, 0].tolist() == [2, 1, 255, 255]
    x = torch.tensor([2, 3], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 1, 3).contiguous()
    assert blend(x, torch.tensor([1, 0]), np.array([0.5, 0.5]))[:, 0, 0, 0].tolist() == [2, 2]  # 2.5 -> 2


def test_blend_lam_one_everywhere_returns_the_input_itself():
    x = batch(torch.uint8, (4, 5, 5, 3))
    assert blend(x, torch.tensor([1, 2, 3, 0]), np.ones(4)) is x


def test_blend_keeps_its_input_and_writes_a_fresh_batch():
    x = batch(torch.float32, (6, 3, 8, 8))
    x0 = x.clone()
    out = blend(x, torch.tensor([5, 4, 3, 2, 1, 0]), np.full(6, 0.3))
    assert torch.equal(x, x0) and out.data_ptr() != x.data_ptr()


def test_blend_non_contiguous_input():
    x = batch(torch.float32, (6, 8, 8, 3)).permute(0, 3, 1, 2)  # NCHW view of NHWC memory
    perm = torch.tensor([2, 0, 1, 5, 3, 4])
    lam = np.linspace(0.1, 0.9, 6)
    assert torch.equal(blend(x, perm, lam), reference_blend(x, perm, lam))


# --------------------------------------------------------------------------- paste_boxes


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("kind", ["shared", "per_sample", "some_empty"])
@pytest.mark.parametrize("with_base", [False, True])
def test_paste_boxes_equals_reference(channels_last, kind, with_base):
    n, h, w = 7, 12, 10
    x = batch(torch.uint8 if channels_last else torch.float32, (n, h, w, 3) if channels_last else (n, 3, h, w))
    base = batch(x.dtype, tuple(x.shape), seed=5) if with_base else None
    rng = np.random.default_rng(3)
    perm = torch.as_tensor(rng.permutation(n))
    if kind == "shared":
        boxes = np.array([[2, 9, 1, 10]])
    else:
        y1, x1 = rng.integers(0, h, n), rng.integers(0, w, n)
        y2, x2 = np.minimum(h, y1 + rng.integers(0, h, n)), np.minimum(w, x1 + rng.integers(0, w, n))
        boxes = np.stack([y1, y2, x1, x2], 1)
        if kind == "some_empty":
            boxes[::2] = 0
    x0 = x.clone()
    out = paste_boxes(x, perm, boxes, "NHWC" if channels_last else "NCHW", base=base)
    assert torch.equal(out, reference_paste(x, perm, boxes, channels_last, base))
    assert torch.equal(x, x0) and out.data_ptr() not in (x.data_ptr(), None if base is None else base.data_ptr())
    hd, wd = (1, 2) if channels_last else (2, 3)
    masked = paste_boxes_masked(x, perm, np.broadcast_to(boxes, (n, 4)).copy(), hd, wd, x if base is None else base)
    assert torch.equal(masked, out), "the one-kernel path for other devices gives the same batch"


def test_paste_boxes_dtype_without_numpy_view():
    x = batch(torch.float32, (5, 3, 6, 8)).to(torch.bfloat16)  # numpy has no bfloat16: torch slicing instead
    perm = torch.tensor([4, 3, 2, 1, 0])
    boxes = np.array([[0, 3, 1, 5], [2, 6, 0, 8], [0, 0, 0, 0], [1, 2, 3, 4], [5, 6, 7, 8]])
    assert torch.equal(paste_boxes(x, perm, boxes), reference_paste(x, perm, boxes, channels_last=False))


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("chunk", [1 << 19, 500])
def test_blend_or_paste_equals_blend_then_paste(channels_last, chunk, monkeypatch):
    monkeypatch.setattr(ops, "CHUNK_ELEMS", chunk)
    n, h, w = 12, 10, 14
    x = batch(torch.uint8 if channels_last else torch.float32, (n, h, w, 3) if channels_last else (n, 3, h, w))
    rng = np.random.default_rng(4)
    for _ in range(4):
        perm = torch.as_tensor(rng.permutation(n))
        cut = rng.random(n) < 0.5
        lam = np.where(rng.random(n) < 0.2, 1.0, rng.random(n))
        y1, x1 = rng.integers(0, h, n), rng.integers(0, w, n)
        boxes = np.stack([y1, np.minimum(h, y1 + 4), x1, np.minimum(w, x1 + 6)], 1)
        cut_boxes = np.where(cut[:, None], boxes, 0)
        want = reference_paste(x, perm, cut_boxes, channels_last, base=reference_blend(x, perm, np.where(cut, 1.0, lam)))
        got = blend_or_paste(x, perm, lam, boxes, cut, "NHWC" if channels_last else "NCHW")
        assert torch.equal(got, want)
    nothing = blend_or_paste(x, perm, np.ones(n), np.zeros((n, 4)), np.zeros(n, bool))
    assert nothing is x


def test_paste_boxes_empty_shared_box_copies_the_base():
    x = batch(torch.uint8, (4, 6, 6, 3))
    out = paste_boxes(x, torch.tensor([1, 2, 3, 0]), np.zeros((4, 4), np.int64))
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


# --------------------------------------------------------------------------- binary masks (mask_ops)


@pytest.mark.parametrize("shape,layout", [((6, 10, 12, 3), "NHWC"), ((6, 3, 10, 12), "NCHW"), ((6, 40, 2), "NLC"),
                                          ((6, 1, 40), "NCL"), ((6, 4, 5, 6, 3), "NDHWC")])
@pytest.mark.parametrize("shared", [True, False])
def test_apply_mask_binary_per_sample_equals_batched_where(shape, layout, shared):
    x = batch(torch.uint8 if layout.endswith("C") else torch.float32, shape)
    last = layout.endswith("C")
    spatial = shape[1:-1] if last else shape[2:]
    g = torch.Generator().manual_seed(3)
    keep = torch.rand((1 if shared else shape[0], *spatial), generator=g) < 0.5
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    k = keep.unsqueeze(-1) if last else keep.unsqueeze(1)
    want = torch.where(k, x, x[perm])
    x0 = x.clone()
    got = apply_mask(x, perm, keep, layout)
    assert torch.equal(got, want) and torch.equal(x, x0)


def test_fmix_top_values_equal_the_stable_descending_sort_with_ties():
    def by_sorting(flat, num):
        k, n = flat.shape
        order = torch.argsort(flat, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n).expand(k, n))
        return rank < torch.as_tensor(num).view(k, 1)

    g = np.random.default_rng(0)
    for _ in range(30):
        flat = torch.from_numpy(g.integers(0, 5, (6, 40)).astype(np.float64))  # ties everywhere
        num = g.integers(0, 41, 6)
        num[:2] = 0, 40
        assert torch.equal(top_values(flat, num), by_sorting(flat, num))
    # hand-made: values 3 1 3 2 3, top 2 = the first two 3s in index order
    assert top_values(torch.tensor([[3.0, 1, 3, 2, 3]]), np.array([2])).tolist() == [[True, False, True, False, False]]
    masks, means = binarise(torch.tensor([[[0.5, 0.1], [0.9, 0.5]]]), np.array([0.5]))
    assert masks.tolist() == [[[1.0, 0.0], [1.0, 0.0]]] and means.tolist() == [0.5]


# --------------------------------------------------------------------------- huge pages


@pytest.mark.parametrize("shape,dtype", [((3, 5), torch.float32), ((64, 3, 128, 128), torch.float32),
                                         ((40, 224, 224, 3), torch.uint8)])
def test_empty_like_matches_torch_empty_like(shape, dtype):
    x = torch.zeros(shape, dtype=dtype)
    out = empty_like(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device and out.is_contiguous()
    out.fill_(7)
    assert int(out.min()) == int(out.max()) == 7


def _vm_flags_of(ptr: int) -> str | None:
    """The VmFlags line of the mapping of this process that holds address ``ptr``."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= ptr < hi
        elif inside and line.startswith("VmFlags:"):
            return line
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux") or huge_pages._madvise() is None,
                    reason="transparent huge pages are not available here")
def test_empty_like_advises_huge_pages_for_big_cpu_buffers():
    big = empty_like(torch.zeros((8, 2**20), dtype=torch.float32))  # 32 MiB
    middle = big.data_ptr() + big.numel() * big.element_size() // 2
    assert " hg" in _vm_flags_of(middle)


def test_empty_like_without_madvise_is_plain_empty(monkeypatch):
    monkeypatch.setattr(huge_pages, "_madvise", lambda: None)
    out = empty_like(torch.zeros((8, 2**20)))
    assert out.shape == (8, 2**20) and out.is_contiguous()


# --------------------------------------------------------------------------- compiled CPU kernels


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64, torch.int16, torch.float16,
                                   torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False])
def test_memcpy_paste_equals_reference_for_every_dtype_and_edge_boxes(dtype, channels_last):
    n, h, w = 6, 9, 11
    x = batch(dtype, (n, h, w, 3) if channels_last else (n, 3, h, w))
    base = batch(dtype, tuple(x.shape), seed=4)
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    boxes = np.array([[0, h, 0, w],      # the whole image
                      [0, 1, 0, 1],      # one corner pixel
                      [h - 1, h, w - 1, w],
                      [2, 7, 0, 4],      # touching the left edge
                      [3, 3, 2, 9],      # empty (no rows)
                      [1, 8, 5, 5]])     # empty (no cols)
    layout = "NHWC" if channels_last else "NCHW"
    assert cpu_kernels.fits(x, base, dtypes=None)
    out = paste_boxes(x, perm, boxes, layout, base=base)
    assert torch.equal(out, reference_paste(x, perm, boxes, channels_last, base))
    assert torch.equal(out[4], base[4]) and torch.equal(out[5], base[5])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_fused_blend_rows_on_a_subset_in_any_order(dtype):
    x = batch(dtype, (9, 4, 5, 3))
    perm = torch.tensor([2, 2, 0, 8, 3, 3, 7, 6, 1])  # not a permutation (C-Mixup draws partners)
    lam = np.linspace(0.05, 0.95, 9)
    rows = np.array([0, 3, 4, 6, 8])
    out = torch.zeros_like(x)
    cpu_kernels.blend_rows(x, perm, lam, rows, out)
    ref = reference_blend(x, perm, lam)
    assert torch.equal(out[rows], ref[rows])
    assert not out[[1, 2, 5, 7]].any(), "rows outside the subset are not written"


def test_cycle_order_follows_the_pairing_and_keeps_each_row_once():
    partner = np.array([3, 0, 4, 1, 2, 5], dtype=np.int64)  # cycles (0 3 1), (2 4), (5)
    order = cpu_kernels._cycle_order(partner, np.arange(6, dtype=np.int64))
    assert order.tolist() == [0, 3, 1, 2, 4, 5]
    sub = cpu_kernels._cycle_order(partner, np.array([1, 2, 3], dtype=np.int64))
    assert sub.tolist() == [1, 3, 2]
    repeats = cpu_kernels._cycle_order(np.array([1, 1, 1], dtype=np.int64), np.arange(3, dtype=np.int64))
    assert sorted(repeats.tolist()) == [0, 1, 2]


def test_non_contiguous_batches_take_the_torch_path_with_the_same_result():
    x = batch(torch.uint8, (6, 8, 8, 3))[:, :, ::2]  # strided
    assert not cpu_kernels.fits(x)
    perm = torch.tensor([1, 2, 0, 4, 5, 3])
    lam = np.linspace(0.1, 0.9, 6)
    assert torch.equal(blend(x, perm, lam), reference_blend(x, perm, lam))
    boxes = np.array([[1, 5, 0, 3]])
    assert torch.equal(paste_boxes(x, perm, boxes), reference_paste(x, perm, boxes, channels_last=True))


def test_warm_up_loads_every_kernel_for_both_fused_dtypes():
    cpu_kernels.warm_up()
    for kernel in (cpu_kernels._blend_uint8, cpu_kernels._blend_float32, cpu_kernels._copy_and_paste,
                   cpu_kernels._cycle_order, cpu_kernels._select):
        assert kernel.signatures, f"{kernel.__name__} was not compiled or loaded"
    pasted = {str(sig[0]) for sig in cpu_kernels._copy_and_paste.signatures}
    assert pasted == {"array(uint8, 1d, C)"}, "every dtype pastes through one byte-level signature"


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.int16, torch.bfloat16])
@pytest.mark.parametrize("spatial", [(13,), (7, 9), (3, 4, 5)])
@pytest.mark.parametrize("last", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_memcpy_select_equals_torch_where(dtype, spatial, last, shared):
    n, c = 5, 3
    x = batch(dtype, (n, *spatial, c) if last else (n, c, *spatial))
    perm = torch.tensor([4, 0, 1, 2, 3])
    g = torch.Generator().manual_seed(7)
    keep = torch.rand((1 if shared else n, *spatial), generator=g) < 0.5
    keep.view(len(keep), -1)[:, :2] = True  # a run at the start, and all-True / all-False samples
    if not shared:
        keep[1], keep[2] = True, False
    want = torch.where(keep.unsqueeze(-1) if last else keep.unsqueeze(1), x, x[perm])
    layout = {1: ("NLC", "NCL"), 2: ("NHWC", "NCHW"), 3: ("NDHWC", "NCDHW")}[len(spatial)][0 if last else 1]
    out = apply_mask(x, perm, keep, layout)
    assert torch.equal(out, want)
    assert out.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("contiguous", [True, False])
def test_boxes_outside_the_image_are_refused_on_every_path(contiguous):
    x = batch(torch.uint8, (4, 10, 12, 3)) if contiguous else batch(torch.uint8, (4, 10, 24, 3))[:, :, ::2]
    assert x.shape == (4, 10, 12, 3) and x.is_contiguous() == contiguous
    perm = torch.tensor([1, 2, 3, 0])
    for bad in ([0, 11, 0, 5], [-1, 4, 0, 5], [0, 4, 3, 13]):
        with pytest.raises(ValueError, match=r"box 0 .* is outside the 10x12 image"):
            paste_boxes(x, perm, np.array([bad]))
    with pytest.raises(ValueError, match="outside the 10x12 image"):
        blend_or_paste(x, perm, np.full(4, 0.5), np.array([[0, 2, 0, 2], [0, 2, 0, 2], [0, 2, 0, 2], [0, 2, 0, 20]]),
                       np.array([False, False, False, True]))
    empty_anywhere = np.array([[50, 40, 0, 5]])  # y2 <= y1: pastes nothing, wherever it is
    assert torch.equal(paste_boxes(x, perm, empty_anywhere), x)


def test_bad_partner_indices_or_lam_never_reach_the_kernels():
    x = batch(torch.uint8, (4, 6, 6, 3))
    out = torch.empty_like(x)
    rows = np.arange(4)
    for perm in (torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 3, -1]), torch.tensor([1, 0])):
        with pytest.raises(ValueError, match="perm must hold 4 partner indices"):
            cpu_kernels.blend_rows(x, perm, np.full(4, 0.5), rows, out)
        with pytest.raises(ValueError, match="perm must hold 4 partner indices"):
            cpu_kernels.copy_and_paste(x, perm, rows, out, x, None, 1, 2)
    with pytest.raises(ValueError, match="rows must be sample indices"):
        cpu_kernels.blend_rows(x, torch.tensor([1, 2, 3, 0]), np.full(4, 0.5), np.array([0, 4]), out)
    with pytest.raises(ValueError, match=r"lam must hold one weight per sample \(4\)"):
        cpu_kernels.blend_rows(x, torch.tensor([1, 2, 3, 0]), np.full(3, 0.5), rows, out)


def test_repeated_rows_and_mismatched_bases_and_autograd_inputs_are_handled():
    partner = np.array([1, 2, 0], dtype=np.int64)
    assert cpu_kernels._cycle_order(partner, np.array([0, 0, 1], dtype=np.int64)).tolist() == [0, 1]
    x = batch(torch.uint8, (4, 8, 8, 3))
    perm = torch.tensor([1, 2, 3, 0])
    for base in (batch(torch.uint8, (2, 8, 8, 3)), batch(torch.uint8, (4, 4, 4, 3))):
        with pytest.raises(ValueError, match=r"base must have the batch's shape \(4, 8, 8, 3\)"):
            paste_boxes(x, perm, np.array([[0, 2, 0, 2]]), base=base)
    tracked = batch(torch.float32, (4, 3, 8, 8)).requires_grad_()
    assert not cpu_kernels.fits(tracked)
    with pytest.raises(RuntimeError, match="automatic differentiation"):  # never silently detached
        blend(tracked, perm, np.full(4, 0.5))

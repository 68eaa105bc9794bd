#!/usr/bin/env python
"""Mixing kernels benchmark: mixflow vs timm-style vs torchvision.transforms.v2-style, one run.

For each image method in ``mixflow.mix.METHODS`` (looked up at run time), each mode and
each batch shape (default ``128x3x224x224`` float32 NCHW, what models eat, and
``128x224x224x3`` uint8 NHWC, what decoders emit) it times mixflow's method call
against re-implementations of its peers, written here (timm and torchvision are not
dependencies):

* **timm-style** (``timm/data/mixup.py``): flip pairing (``j = B-1-i``). Float batches:
  ``Mixup`` in place, MixUp ``x.mul_(lam).add_(x.flip(0).mul_(1-lam))``, CutMix
  ``x[:, :, y1:y2, x1:x2] = x.flip(0)[:, :, y1:y2, x1:x2]``; elem mode is ``Mixup._mix_elem``:
  ``x_orig = x.clone()`` and a Python loop over the samples. uint8 batches:
  ``FastCollateMixup``, step for step (``benchmarks/timm_style.py``): ``torch.zeros``
  output, then per sample a copy with the box pasted, or a float32 blend and ``np.rint``,
  then ``astype(np.uint8)`` (another copy) and ``output[i].copy_``.
* **loop** (uint8 rows of the MixUp/CutMix family): the leanest per-sample loop, straight
  into the output: one copy and a box paste, or a float32 blend rounded and cast in place.
  It is what timm's loop would cost without its extra copies and zero fill, the bound
  for any per-sample loop; faster than timm's own. Shown for reference: the targets are
  set against timm and torchvision.
* **tv-style** (``torchvision.transforms.v2.MixUp/CutMix``): roll pairing. MixUp
  ``x.roll(1, 0).mul_(1-lam).add_(x.mul(lam))``; CutMix ``out = x.clone()`` then
  ``out[..., y1:y2, x1:x2] = x.roll(1, 0)[..., y1:y2, x1:x2]``. torchvision only mixes float
  batches, so for uint8 the batch is converted to float32 first and rounded back.
  torchvision has no per-element mode: its elem rows use the same formulas with a
  ``[B, 1, 1, 1]`` lam (MixUp) or one ``torch.where`` over per-sample box masks (CutMix).
* **ref**, for methods neither library has, the nearest public reference, re-implemented:
  ResizeMix as OpenMixup's ``resizemix`` (one ``F.interpolate`` of the permuted batch,
  pasted in place; elem: one interpolate per sample), FMix as the official code
  (ecs-vlc/FMix: numpy mask, ``x*mask + x[perm]*(1-mask)``; elem: a loop with one mask per
  sample), MaskMix and Patch Mixing as a loop over the samples (random cell grid,
  ``torch.where`` per sample). CutMix/MixUp switching methods (``mixup_cutmix``,
  ``transmix``) are compared with timm's ``_mix_elem`` loop in elem mode only: in batch
  mode they are exactly one of the MixUp / CutMix batch rows.

mixflow's methods never modify their input and return a fresh batch; the timm-style
float kernels work in place (as timm does), so each implementation gets its own copy
of the batch. In each round every implementation runs once (the order rotates); a
round shares its random draws where the kernels allow it: the timm- and tv-style MixUp
and CutMix kernels take lam, boxes and per-sample choices from mixflow's own samplers
with the round's seed, so all of them do the same work as mixflow in that round (the
draws are timed with them). ``ms`` is the best round after one warm-up round.

Bytes moved per call, ``k x`` the batch's bytes: MixUp 3 (read the sample and its
partner, write the output); CutMix, ResizeMix, FMix (hard mask), MaskMix, Patch Mixing 2
(every output element is read from one source and written once); per-sample MixUp/CutMix
switching 2.5 (half blended, half pasted). ``GB/s`` is those bytes over the time;
``of copy`` divides it by this machine's copy bandwidth measured in the same run:
``dst.copy_(src)`` of a 256 MiB buffer into an existing one, best of ``--repeats``,
counting bytes read + written. The fresh-output copy (``x.clone()`` of the float batch,
page faults of a new buffer included) is printed beside it: every out-of-place method
pays that. ``x timm`` / ``x tv`` / ``x ref`` / ``x loop`` are that implementation's time
divided into the baseline's: above 1 means faster than the baseline. The elem target
(>= 5x the per-element loop) is checked against timm's loop on every elem row that has
one.

Every implementation runs with ``--threads`` torch threads (default 1: mixflow's mixer
actors call ``torch.set_num_threads(1)``; numpy is single-threaded anyway). With more
threads on a machine whose cores other processes also use, each multi-threaded torch
call can wait for a descheduled worker, so kernels made of many calls (chunked ones)
suffer most. Timings on a shared 2-core machine are noisy: compare ratios within one
run; targets are reported as PASS/MISS, never asserted.

Usage::

    python benchmarks/mixing_kernels.py [--batch 128] [--size 224] [--repeats 10] [--threads 1]
        [--methods mixup,cutmix:elem,...] [--dtypes float32,uint8] [--out results.json]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# Run from a checkout (``python benchmarks/mixing_kernels.py``): import this tree's mixflow.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from mixflow.mix import METHODS  # noqa: E402
from mixflow.mix.cutmix import box_lam, cutmix_boxes  # noqa: E402
from mixflow.mix.lam import beta_lam, per_mode  # noqa: E402
from mixflow.mix.pairing import partner_index  # noqa: E402
from benchmarks.timm_style import fast_collate_output, fast_collate_sample  # noqa: E402

NUM_CLASSES = 1000
MIXUP_ALPHA = 0.8
CUTMIX_ALPHA = 1.0
SWITCH_PROB = 0.5
MODES = ("batch", "elem")
SWITCHING = ("mixup_cutmix", "transmix")
BYTES_FACTOR = {"mixup": 3.0, "cutmix": 2.0, "resizemix": 2.0, "fmix": 2.0, "maskmix": 2.0, "patch_mixing": 2.0,
                "mixup_cutmix": 2.5, "transmix": 2.5}
# Method params for the benchmark: the DeiT recipe's alphas for the MixUp/CutMix family.
PARAMS = {"mixup": {"alpha": MIXUP_ALPHA}, "cutmix": {"alpha": CUTMIX_ALPHA},
          "mixup_cutmix": {"mixup_alpha": MIXUP_ALPHA, "cutmix_alpha": CUTMIX_ALPHA, "switch_prob": SWITCH_PROB},
          "transmix": {"mixup_alpha": MIXUP_ALPHA, "cutmix_alpha": CUTMIX_ALPHA, "switch_prob": SWITCH_PROB}}
NOT_KERNELS = {"none": "leaves the batch as it is", "choice": "a per-batch choice among the other methods"}
COPY_BYTES = 256 * 2**20
# Targets (brief of issue 3): fraction of copy bandwidth, elem speed-up over the per-sample loop.
COPY_FRACTION_TARGET = 0.5
ELEM_SPEEDUP_TARGET = 5.0

Kernel = Callable[[torch.Tensor, np.random.Generator], torch.Tensor]
BASELINES = ("timm-style", "tv-style", "ref", "loop")


# --------------------------------------------------------------------------------------
# Shared draws: the MixUp/CutMix parameters mixflow draws from a seeded generator
# --------------------------------------------------------------------------------------

@dataclass
class Draw:
    lam: np.ndarray        # [B] weight of the sample's own content (after box correction)
    boxes: np.ndarray      # [B, 4] (y1, y2, x1, x2); empty where the sample is blended
    cut: np.ndarray        # [B] bool: pasted (CutMix) rather than blended (MixUp)


def mixflow_draw(method: str, mode: str, n: int, h: int, w: int, rng: np.random.Generator) -> Draw:
    """Replay the draws of ``mixflow.mix.<method>(..., mode=mode)`` with default pairing."""
    perm = partner_index(n, "derangement", rng, mode)
    if method == "mixup":
        lam = beta_lam(MIXUP_ALPHA, mode, perm, rng)
        return Draw(lam, np.zeros((n, 4), np.int64), np.zeros(n, bool))
    if method == "cutmix":
        lam = beta_lam(CUTMIX_ALPHA, mode, perm, rng)
        boxes = cutmix_boxes(lam, h, w, rng, mode, perm)
        return Draw(box_lam(boxes, h, w), boxes, np.ones(n, bool))
    # mixup_cutmix / transmix, per element: switch, both lams, boxes for the pasted ones
    cut = per_mode(lambda k: rng.random(k) < SWITCH_PROB, mode, perm).astype(bool)
    lam_mix = beta_lam(MIXUP_ALPHA, mode, perm, rng)
    lam = np.where(cut, beta_lam(CUTMIX_ALPHA, mode, perm, rng), lam_mix)
    boxes = cutmix_boxes(np.where(cut, lam, 1.0), h, w, rng, mode, perm)
    lam = np.where(cut & (lam < 1.0), box_lam(boxes, h, w), lam)
    return Draw(lam, boxes, cut)


def hw_of(x: torch.Tensor) -> tuple[int, int]:
    return (x.shape[1], x.shape[2]) if x.dtype == torch.uint8 else (x.shape[2], x.shape[3])


def box_view(t: torch.Tensor, box, channels_last: bool):
    """``t[..., y1:y2, x1:x2]`` of one sample or a batch, channels last or first."""
    y1, y2, x1, x2 = (int(v) for v in box)
    return t[..., y1:y2, x1:x2, :] if channels_last else t[..., y1:y2, x1:x2]


# --------------------------------------------------------------------------------------
# timm-style (timm/data/mixup.py): Mixup on float NCHW in place, FastCollateMixup on uint8
# --------------------------------------------------------------------------------------

def timm_kernel(method: str, mode: str) -> Kernel:
    def run(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        h, w = hw_of(x)
        d = mixflow_draw(method, mode, len(x), h, w, rng)
        if x.dtype == torch.uint8:
            return _fast_collate(x, d, mode)
        if mode == "batch":
            lam = float(d.lam[0])
            if d.cut[0]:
                y1, y2, x1, x2 = (int(v) for v in d.boxes[0])
                x[:, :, y1:y2, x1:x2] = x.flip(0)[:, :, y1:y2, x1:x2]
            else:
                x.mul_(lam).add_(x.flip(0).mul_(1.0 - lam))
            return x
        x_orig = x.clone()  # Mixup._mix_elem
        n = len(x)
        for i in range(n):
            j = n - i - 1
            lam = float(d.lam[i])
            if lam != 1.0:
                if d.cut[i]:
                    y1, y2, x1, x2 = (int(v) for v in d.boxes[i])
                    x[i][:, y1:y2, x1:x2] = x_orig[j][:, y1:y2, x1:x2]
                else:
                    x[i] = x[i] * lam + x_orig[j] * (1 - lam)
        return x
    return run


def _fast_collate(x: torch.Tensor, d: Draw, mode: str) -> torch.Tensor:
    """timm ``FastCollateMixup`` (``_mix_batch_collate`` / ``_mix_elem_collate``) on uint8 NHWC samples."""
    src = x.numpy()
    out = fast_collate_output(src)
    n = len(x)
    for i in range(n):
        k = 0 if mode == "batch" else i
        fast_collate_sample(out, src, i, n - i - 1, float(d.lam[k]), _box_of(d, k))
    return out


def _box_of(d: Draw, k: int) -> tuple[int, int, int, int] | None:
    return tuple(int(v) for v in d.boxes[k]) if d.cut[k] else None


# --------------------------------------------------------------------------------------
# loop: the leanest per-sample loop on uint8 (timm's steps without its extra copies)
# --------------------------------------------------------------------------------------

def loop_kernel(method: str, mode: str) -> Kernel:
    """Per sample, straight into the output: a copy with the partner's box pasted over it, or a
    float32 blend rounded with ``np.rint`` and cast in place. What a per-sample Python loop
    costs at best: one copy per pasted sample, no zero fill."""
    def run(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        n, h, w = x.shape[:3]
        d = mixflow_draw(method, mode, n, h, w, rng)
        src = x.numpy()
        out = torch.empty_like(x)
        dst = out.numpy()
        for i in range(n):
            k = 0 if mode == "batch" else i
            j, lam, box = n - i - 1, float(d.lam[k]), _box_of(d, k)
            if lam == 1.0 or box is not None:
                dst[i] = src[i]
                if box is not None:
                    y1, y2, x1, x2 = box
                    dst[i, y1:y2, x1:x2] = src[j, y1:y2, x1:x2]
            else:
                mixed = src[i].astype(np.float32) * lam + src[j].astype(np.float32) * (1.0 - lam)
                np.copyto(dst[i], np.rint(mixed, out=mixed), casting="unsafe")
        return out
    return run


# --------------------------------------------------------------------------------------
# tv-style (torchvision.transforms.v2 MixUp / CutMix): roll pairing, out of place
# --------------------------------------------------------------------------------------

def tv_kernel(method: str, mode: str) -> Kernel:
    def run(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        h, w = hw_of(x)
        d = mixflow_draw(method, mode, len(x), h, w, rng)
        last = x.dtype == torch.uint8
        if method == "mixup":
            xf = x.float() if last else x  # torchvision mixes float batches only
            if mode == "batch":
                lam = float(d.lam[0])
                out = xf.roll(1, 0).mul_(1.0 - lam).add_(xf.mul(lam))
            else:
                lam = torch.as_tensor(d.lam, dtype=torch.float32).view(-1, 1, 1, 1)
                out = xf.roll(1, 0).mul_(1.0 - lam).add_(xf.mul(lam))
            return out.round_().to(torch.uint8) if last else out
        if mode == "batch":
            out = x.clone()
            box_view(out, d.boxes[0], last)[...] = box_view(x.roll(1, 0), d.boxes[0], last)
            return out
        b = torch.as_tensor(d.boxes)
        rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
        inside = ((rows >= b[:, 0, None, None]) & (rows < b[:, 1, None, None])
                  & (cols >= b[:, 2, None, None]) & (cols < b[:, 3, None, None]))
        inside = inside.unsqueeze(3) if last else inside.unsqueeze(1)
        return torch.where(inside, x.roll(1, 0), x)
    return run


# --------------------------------------------------------------------------------------
# ref: nearest public reference for methods timm / torchvision do not have
# --------------------------------------------------------------------------------------

def _to_nchw_float(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2).float() if x.dtype == torch.uint8 else x


def resizemix_ref(mode: str) -> Kernel:
    """OpenMixup ``resizemix``: ``F.interpolate`` of the permuted batch (elem: of each partner), pasted in place."""
    def run(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        h, w = hw_of(x)
        n = len(x)
        last = x.dtype == torch.uint8
        index = torch.as_tensor(rng.permutation(n))
        out = x.clone() if last else x
        k = 1 if mode == "batch" else n
        tau = rng.uniform(0.1, 0.8, size=k)
        for s in range(k):
            bh, bw = int(h * tau[s]), int(w * tau[s])
            y1, x1 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
            src = x.index_select(0, index) if mode == "batch" else x[int(index[s])].unsqueeze(0)
            if last:
                src = src.permute(0, 3, 1, 2)  # nearest resize works on uint8 as it is
            resized = F.interpolate(src, size=(bh, bw), mode="nearest")
            if last:
                resized = resized.permute(0, 2, 3, 1)
            target = out if mode == "batch" else out[s:s + 1]
            box_view(target, (y1, y1 + bh, x1, x1 + bw), last)[...] = resized
        return out
    return run


def _fmix_mask(h: int, w: int, lam: float, rng: np.random.Generator, decay: float = 3.0) -> np.ndarray:
    """The official FMix ``sample_mask`` (2-D, hard mask) in numpy."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[: w // 2 + (2 if w % 2 else 1)]
    freqs = np.sqrt(fx * fx + fy * fy)
    scale = 1.0 / np.maximum(freqs, 1.0 / max(w, h)) ** decay
    param = rng.standard_normal((2, *freqs.shape))
    spectrum = (param[0] + 1j * param[1]) * scale
    grey = np.real(np.fft.irfftn(spectrum, s=(h, w), axes=(0, 1)))
    grey = (grey - grey.min()) / (grey.max() - grey.min())
    idx = grey.reshape(-1).argsort()[::-1]
    mask = np.zeros(h * w, np.float32)
    mask[idx[: int(round(lam * h * w))]] = 1.0
    return mask.reshape(h, w)


def fmix_ref(mode: str) -> Kernel:
    """Official FMix: ``x*mask + x[perm]*(1-mask)`` in float (elem: one mask per sample, in a loop)."""
    def run(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        h, w = hw_of(x)
        n = len(x)
        last = x.dtype == torch.uint8
        index = torch.as_tensor(rng.permutation(n))
        if mode == "batch":
            mask = torch.from_numpy(_fmix_mask(h, w, rng.beta(1.0, 1.0), rng))
            mask = mask.unsqueeze(-1) if last else mask
            out = x * mask + x[index] * (1 - mask)
            return out.round_().to(torch.uint8) if last else out
        out = torch.empty_like(x)
        for i in range(n):
            mask = torch.from_numpy(_fmix_mask(h, w, rng.beta(1.0, 1.0), rng))
            mask = mask.unsqueeze(-1) if last else mask
            mixed = x[i] * mask + x[int(index[i])] * (1 - mask)
            out[i] = mixed.round_() if last else mixed
        return out
    return run


def grid_ref(cell: int) -> Callable[[str], Kernel]:
    """MaskMix / Patch Mixing as a loop over the samples: a random cell grid, ``torch.where`` per sample."""
    def make(mode: str) -> Kernel:
        def run(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
            h, w = hw_of(x)
            n = len(x)
            last = x.dtype == torch.uint8
            gh, gw = -(-h // cell), -(-w // cell)
            index = rng.permutation(n)
            lam = np.broadcast_to(rng.beta(1.0, 1.0, size=1 if mode == "batch" else n), (n,))
            out = torch.empty_like(x)
            for i in range(n):
                keep = np.zeros(gh * gw, bool)
                keep[rng.permutation(gh * gw)[: int(np.ceil(lam[i] * gh * gw))]] = True
                pixels = torch.from_numpy(np.kron(keep.reshape(gh, gw), np.ones((cell, cell), bool))[:h, :w])
                pixels = pixels.unsqueeze(-1) if last else pixels
                out[i] = torch.where(pixels, x[i], x[int(index[i])])
            return out
        return run
    return make


def reference_kernels(method: str, mode: str, dtype: torch.dtype) -> dict[str, Kernel]:
    """The baselines of one (method, mode, dtype) row, by implementation name."""
    loop = {"loop": loop_kernel(method, mode)} if dtype == torch.uint8 else {}
    if method in ("mixup", "cutmix"):
        return {"timm-style": timm_kernel(method, mode), "tv-style": tv_kernel(method, mode), **loop}
    if method in SWITCHING:
        return {"timm-style": timm_kernel(method, mode), **loop} if mode == "elem" else {}
    refs = {"resizemix": resizemix_ref, "fmix": fmix_ref, "maskmix": grid_ref(56), "patch_mixing": grid_ref(16)}
    return {"ref": refs[method](mode)} if method in refs else {}


# --------------------------------------------------------------------------------------
# mixflow: the method call itself
# --------------------------------------------------------------------------------------

def mixflow_kernel(method: str, mode: str) -> Kernel:
    fn = METHODS[method]
    params = dict(PARAMS.get(method, {}), num_classes=NUM_CLASSES, mode=mode)

    def run(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        return fn(x, labels_for(x), rng, **params).x
    return run


def labels_for(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(len(x)) % NUM_CLASSES


def image_methods(x: torch.Tensor) -> tuple[list[str], dict[str, str]]:
    """Registered methods that mix the pixels of an image batch; the others with the reason."""
    found, skipped = [], {}
    probe = x[:4].clone()
    for name, fn in METHODS.items():
        if name in NOT_KERNELS:
            skipped[name] = NOT_KERNELS[name]
            continue
        outs = []
        try:
            for seed in range(4):  # some methods only draw a plan in some batches
                result = fn(probe, labels_for(probe), np.random.default_rng(seed), num_classes=NUM_CLASSES,
                            **PARAMS.get(name, {}))
                outs.append(getattr(result, "x", None))
        except (TypeError, ValueError, AttributeError) as exc:
            skipped[name] = f"not an image method here ({type(exc).__name__}: {str(exc).splitlines()[0][:60]})"
            continue
        if not all(isinstance(o, torch.Tensor) and o.shape == probe.shape for o in outs):
            skipped[name] = "not an image method (returns no image batch)"
        elif any(o is probe for o in outs):
            skipped[name] = "leaves the pixels to the trainer (plan only) in some or all batches"
        else:
            found.append(name)
    return found, skipped


def method_modes(name: str) -> tuple[str, ...]:
    if "mode" not in inspect.signature(METHODS[name]).parameters:
        return ("batch",)
    return ("elem",) if name in SWITCHING else MODES


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------

def best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth(repeats: int) -> float:
    """Bytes read + written per second by ``dst.copy_(src)`` into an existing buffer."""
    src = torch.ones(COPY_BYTES, dtype=torch.uint8)
    dst = torch.zeros_like(src)
    return 2 * COPY_BYTES / best_time(lambda: dst.copy_(src), repeats)


def fresh_copy_bandwidth(x: torch.Tensor, repeats: int) -> float:
    """The same for ``x.clone()``: a new output buffer, its page faults included."""
    nbytes = x.numel() * x.element_size()
    return 2 * nbytes / best_time(lambda: x.clone(), repeats)


@dataclass
class Row:
    method: str
    mode: str
    shape: str
    impl: str
    ms: float
    median_ms: float
    gb_s: float
    of_copy: float
    vs: dict[str, float] = field(default_factory=dict)


def time_row(method: str, mode: str, x: torch.Tensor, repeats: int, seed: int, copy_bw: float) -> list[Row]:
    kernels = {"mixflow": mixflow_kernel(method, mode), **reference_kernels(method, mode, x.dtype)}
    if method in ("mixup", "cutmix", *SWITCHING):  # the baselines replay mixflow's draws: check they do
        params = dict(PARAMS[method], num_classes=NUM_CLASSES, mode=mode)
        got = METHODS[method](x, labels_for(x), np.random.default_rng([seed, 0]), **params).lam.numpy()
        want = mixflow_draw(method, mode, len(x), *hw_of(x), np.random.default_rng([seed, 0])).lam
        if not np.array_equal(got, want.astype(np.float32)):
            raise RuntimeError(f"{method} {mode}: the baselines' replayed draws differ from mixflow's")
    inputs = {name: (x if name == "mixflow" else x.clone()) for name in kernels}  # baselines may work in place
    times: dict[str, list[float]] = {name: [] for name in kernels}
    names = list(kernels)
    for r in range(repeats + 1):  # round 0 warms up
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            rng = np.random.default_rng([seed, r])
            start = time.perf_counter()
            out = kernels[name](inputs[name], rng)
            elapsed = time.perf_counter() - start
            del out
            if r:
                times[name].append(elapsed)
    nbytes = BYTES_FACTOR.get(method, 2.0) * x.numel() * x.element_size()
    shape = f"{'x'.join(map(str, x.shape))} {str(x.dtype).replace('torch.', '')}"
    rows = []
    for name in names:
        best = min(times[name])
        rows.append(Row(method, mode, shape, name, best * 1e3, float(np.median(times[name])) * 1e3,
                        nbytes / best / 1e9, nbytes / best / copy_bw))
    by = {row.impl: row.ms for row in rows}
    for row in rows:
        row.vs = {base: by[base] / row.ms for base in BASELINES if base in by}
    return rows


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

HEADER = ["method", "mode", "shape", "impl", "ms", "median", "GB/s", "of copy", "x timm", "x tv", "x ref", "x loop"]


def table_rows(rows: list[Row]) -> list[list[str]]:
    out = []
    for r in rows:
        vs = [f"{r.vs[b]:.2f}" if b in r.vs else "-" for b in BASELINES]
        out.append([r.method, r.mode, r.shape, r.impl, f"{r.ms:.2f}", f"{r.median_ms:.2f}", f"{r.gb_s:.2f}",
                    f"{r.of_copy:.2f}", *vs])
    return out


def print_table(rows: list[Row], title: str) -> None:
    body = table_rows(rows)
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for i, h in enumerate(HEADER):
            table.add_column(h, justify="right" if i >= 4 else "left")
        keys = [(r.method, r.mode, r.shape) for r in rows]
        for i, (r, cells) in enumerate(zip(rows, body)):
            table.add_row(*cells, style="bold" if r.impl == "mixflow" else None,
                          end_section=i + 1 < len(rows) and keys[i + 1] != keys[i])
        Console(width=None if sys.stdout.isatty() else 160).print(table)
    except ImportError:
        print(title)
        widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(HEADER)]
        for cells in [HEADER, *body]:
            print("  ".join(c.ljust(w) for c, w in zip(cells, widths)))


def check_targets(rows: list[Row]) -> list[dict]:
    """PASS/MISS lines for the targets; also returned for the JSON report."""
    results = []
    mine = [r for r in rows if r.impl == "mixflow"]
    for r in mine:
        if r.method in ("mixup", "cutmix") and r.mode == "batch":
            results.append({"target": f"{r.method} batch {r.shape}: >= {COPY_FRACTION_TARGET} of copy bandwidth",
                            "value": round(r.of_copy, 3), "pass": r.of_copy >= COPY_FRACTION_TARGET})
        if r.mode == "elem" and "timm-style" in r.vs:
            results.append({"target": f"{r.method} elem {r.shape}: >= {ELEM_SPEEDUP_TARGET:g}x timm's per-element loop",
                            "value": round(r.vs["timm-style"], 2), "pass": r.vs["timm-style"] >= ELEM_SPEEDUP_TARGET})
        for base, ratio in r.vs.items():
            if base == "loop":  # a bound for per-sample loops, shown beside the targets, not one of them
                continue
            results.append({"target": f"{r.method} {r.mode} {r.shape}: not slower than {base}",
                            "value": round(ratio, 2), "pass": ratio >= 1.0})
    print("targets:")
    for t in results:
        print(f"  {'PASS' if t['pass'] else 'MISS'}  {t['target']} ({t['value']})")
    return results


def make_batch(dtype: str, batch: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == "uint8":
        return torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g)
    if dtype == "float32":
        return torch.rand((batch, 3, size, size), generator=g)
    raise ValueError(f"unknown dtype {dtype!r}; choose float32 or uint8")


def parse_methods(spec: str | None, available: list[str]) -> list[tuple[str, str]]:
    """``mixup,cutmix:elem`` -> [(method, mode), ...]; all image methods and their modes when empty."""
    wanted = [s.strip() for s in spec.split(",") if s.strip()] if spec else available
    pairs = []
    for item in wanted:
        name, _, mode = item.partition(":")
        if name not in available:
            raise SystemExit(f"--methods: {name!r} is not a benchmarked image method; choose from "
                             f"{', '.join(available)}")
        modes = method_modes(name)
        if mode and mode not in modes:
            raise SystemExit(f"--methods: {name} runs in mode(s) {', '.join(modes)} here, not {mode!r}")
        pairs += [(name, m) for m in ([mode] if mode else modes)]
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128, help="samples per batch (default 128)")
    parser.add_argument("--size", type=int, default=224, help="image side (default 224)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds per row, after one warm-up")
    parser.add_argument("--methods", help="comma-separated method[:mode] list (default: every image method)")
    parser.add_argument("--dtypes", default="float32,uint8",
                        help="float32 (NCHW) and/or uint8 (NHWC), comma-separated")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for every implementation (default 1, as mixflow's "
                             f"mixer actors run; torch's own default here is {torch.get_num_threads()})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the rows and targets to this JSON file")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    batches = {d: make_batch(d, args.batch, args.size, args.seed) for d in dtypes}
    available, skipped = image_methods(next(iter(batches.values())))
    pairs = parse_methods(args.methods, available)

    copy_bw = copy_bandwidth(args.repeats)
    fresh = {d: fresh_copy_bandwidth(x, args.repeats) for d, x in batches.items()}
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}")
    print(f"copy bandwidth (dst.copy_(src), {COPY_BYTES >> 20} MiB, read+write): {copy_bw / 1e9:.2f} GB/s")
    for d, bw in fresh.items():
        print(f"fresh-output copy (x.clone(), {d} batch): {bw / 1e9:.2f} GB/s = {bw / copy_bw:.2f} of copy")
    for name, why in skipped.items():
        print(f"not benchmarked: {name}: {why}")

    rows: list[Row] = []
    t_all = time.perf_counter()
    for d, x in batches.items():
        for method, mode in pairs:
            rows += time_row(method, mode, x, args.repeats, args.seed, copy_bw)
    print_table(rows, f"mixing kernels: best of {args.repeats} rounds, ms per batch")
    targets = check_targets(rows)
    print(f"total benchmark time {time.perf_counter() - t_all:.1f}s")
    if args.out:
        report = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                              "platform": platform.platform(),
                              "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE")},
                  "copy_bandwidth_gb_s": copy_bw / 1e9,
                  "fresh_copy_bandwidth_gb_s": {d: bw / 1e9 for d, bw in fresh.items()},
                  "args": vars(args), "skipped": skipped,
                  "rows": [asdict(r) for r in rows], "targets": targets}
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

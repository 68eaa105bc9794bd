"""FMix mask sampling: Harris et al., "FMix: Enhancing Mixed Sample Data Augmentation",
arXiv:2002.12047, 2020.

A low-frequency image is drawn in Fourier space: a complex Gaussian spectrum on the
``fftfreq`` grid of the mask shape (real FFT layout: the last axis holds
``n//2 + 1`` non-negative frequencies), each frequency scaled by
``1 / max(f, 1/max(shape))**decay_power``, then an inverse real FFT. The mask is 1 on the
top ``round(lam*N)`` pixels of that image and 0 elsewhere, so its mean is lam up to
``1/(2N)``; ``max_soft`` replaces the hard edge by a linear ramp over ``2*soft`` ranks
around the threshold (``soft = int(N*min(max_soft, lam, 1-lam))``), which keeps the mean.
Works for 1-D (audio, sequences), 2-D and 3-D shapes; one batched FFT for all masks.

``reference_spectrum=True`` reproduces the official code (github.com/ecs-vlc/FMix): its
frequency grid (``w//2 + 2`` columns for odd widths; the 3-D grid orders axes ``(h, z, w)``)
and its spectrum ``spectrum[:, 0] + 1j * spectrum[:, 1]``, which indexes the first spatial
axis instead of the real/imaginary axis, so only two rows of the Gaussian draw are used
and the resulting images keep just the two lowest frequencies of the last axis.
"""

from __future__ import annotations

import numpy as np
import torch


def _check_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if not 1 <= len(shape) <= 3 or min(shape) < 1:
        raise ValueError(f"FMix mask shape must have 1, 2 or 3 positive sizes, got {shape}")
    return shape


def frequency_grid(shape: tuple[int, ...]) -> np.ndarray:
    """``|f|`` on the real-FFT grid of ``shape``: ``fftfreq`` on every axis but the last, ``rfftfreq`` there."""
    shape = _check_shape(shape)
    axes = [np.fft.fftfreq(n) for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
    grids = np.meshgrid(*axes, indexing="ij")
    return np.sqrt(sum(g * g for g in grids))


def reference_frequency_grid(shape: tuple[int, ...]) -> np.ndarray:
    """The official code's ``fftfreqnd(h, w, z)``, quirks included."""
    shape = _check_shape(shape)
    fy = np.fft.fftfreq(shape[0])
    if len(shape) == 1:
        return np.abs(fy)
    w = shape[1]
    fx = np.fft.fftfreq(w)[: w // 2 + (2 if w % 2 else 1)]
    if len(shape) == 2:
        return np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    fz = np.fft.fftfreq(shape[2])
    return np.sqrt(fy[:, None, None] ** 2 + fz[None, :, None] ** 2 + fx[None, None, :] ** 2)


def low_frequency_images(shape: tuple[int, ...], k: int, rng: np.random.Generator, *, decay_power: float = 3.0,
                         reference_spectrum: bool = False, device: torch.device | str | None = None) -> torch.Tensor:
    """``[k, *shape]`` float64 low-frequency images (inverse real FFT of a decayed Gaussian spectrum)."""
    if decay_power < 0:
        raise ValueError(f"decay_power must be >= 0, got {decay_power}")
    shape = _check_shape(shape)
    freqs = reference_frequency_grid(shape) if reference_spectrum else frequency_grid(shape)
    scale = 1.0 / np.maximum(freqs, 1.0 / max(shape)) ** decay_power
    draws = rng.standard_normal((k, *freqs.shape, 2)) * scale[None, ..., None]
    if reference_spectrum:
        spectrum = draws[:, 0] + 1j * draws[:, 1]
    else:
        spectrum = draws[..., 0] + 1j * draws[..., 1]
    dims = tuple(range(1, len(shape) + 1))
    return torch.fft.irfftn(torch.from_numpy(spectrum).to(device), s=shape, dim=dims)


def top_values(flat: torch.Tensor, num: np.ndarray) -> torch.Tensor:
    """``[k, N]`` bool: the first ``num[i]`` entries of row ``i`` in a stable descending sort
    (every value above the ``num[i]``-th largest, then the ties at it in index order), found
    with one ``kthvalue`` per row instead of sorting: the hard-mask case on CPU."""
    k, n = flat.shape
    out = torch.zeros((k, n), dtype=torch.bool, device=flat.device)
    for i, m in enumerate(np.asarray(num).tolist()):
        if m >= n:
            out[i] = True
        elif m > 0:
            v = torch.kthvalue(flat[i], n - m + 1).values
            above, ties = flat[i] > v, flat[i] == v
            out[i] = above | (ties & (torch.cumsum(ties, 0) <= m - int(above.sum())))
    return out


def binarise(images: torch.Tensor, lam: np.ndarray, max_soft: float = 0.0) -> tuple[torch.Tensor, np.ndarray]:
    """Masks from images ``[k, *S]``: 1 on the top ``round(lam*N)`` values of each, optional soft ramp.

    Returns the float32 masks and their exact means (``round(lam*N)/N``).
    """
    if not 0.0 <= max_soft <= 0.5:
        raise ValueError(f"max_soft must be in [0, 0.5], got {max_soft}")
    lam = np.asarray(lam, dtype=np.float64).reshape(-1)
    k = images.shape[0]
    flat = images.reshape(k, -1)
    n = flat.shape[1]
    num = np.rint(lam * n).astype(np.int64)
    soft = np.floor(n * np.minimum(max_soft, np.minimum(lam, 1.0 - lam))).astype(np.int64)
    if flat.device.type == "cpu" and not soft.any():
        return top_values(flat, num).view(images.shape).to(torch.float32), num / n
    lo = torch.as_tensor(num - soft, device=flat.device).view(k, 1)
    width = torch.as_tensor(2 * soft, device=flat.device).view(k, 1)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    positions = torch.arange(n, device=flat.device).expand(k, n)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    # rank < lo: 1; lo <= rank < lo + width: linspace(1, 0, width); beyond: 0.
    ramp = 1.0 - (rank - lo).to(torch.float32) / (width - 1).clamp(min=1).to(torch.float32)
    mask = torch.where(rank < lo, 1.0, torch.where(rank < lo + width, ramp, 0.0))
    return mask.view(images.shape).to(torch.float32), num / n


def sample_fmix_masks(shape: tuple[int, ...], lam: np.ndarray, rng: np.random.Generator, *,
                      decay_power: float = 3.0, max_soft: float = 0.0, reference_spectrum: bool = False,
                      device: torch.device | str | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """One FMix mask per entry of ``lam``: ``([len(lam), *shape]`` float32 masks, their means)."""
    lam = np.asarray(lam, dtype=np.float64).reshape(-1)
    images = low_frequency_images(shape, len(lam), rng, decay_power=decay_power,
                                  reference_spectrum=reference_spectrum, device=device)
    return binarise(images, lam, max_soft)

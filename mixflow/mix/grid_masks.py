"""Random subsets of grid cells (MaskMix cells, Patch Mixing patches) and their pixel masks.

Each sample independently keeps a uniformly random subset of ``count[i]`` cells out of
``gh * gw``; a kept cell shows the sample's own pixels, the others the partner's.
"""

from __future__ import annotations

import numpy as np
import torch


def check_patch_grid(h: int, w: int, patch_size: int, mask_patch: int | None = None) -> None:
    """``H``, ``W`` multiples of ``patch_size``; ``mask_patch`` (when given) a multiple of it too."""
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of patch_size {patch_size}")
    if mask_patch is not None and (mask_patch < patch_size or mask_patch % patch_size):
        raise ValueError(f"mask_patch must be a positive multiple of patch_size {patch_size}, got {mask_patch}")


def grid_shape(h: int, w: int, cell: int) -> tuple[int, int]:
    """Cells per column and per row: ``ceil(H/cell) x ceil(W/cell)`` (edge cells may be partial)."""
    return -(-h // cell), -(-w // cell)


def random_cells(count: np.ndarray, gh: int, gw: int, rng: np.random.Generator) -> np.ndarray:
    """``[B, gh, gw]`` bool: sample ``i`` keeps a uniformly random subset of ``count[i]`` cells."""
    count = np.asarray(count, dtype=np.int64)
    scores = rng.random((len(count), gh * gw))
    ranks = np.argsort(np.argsort(scores, axis=1), axis=1)
    return (ranks < count[:, None]).reshape(len(count), gh, gw)


def cells_to_pixels(cells: torch.Tensor, cell: int, h: int, w: int) -> torch.Tensor:
    """Blow ``[B, gh, gw]`` cells up to ``[B, H, W]`` pixels (``cell x cell`` each, cropped at the edge)."""
    return cells.repeat_interleave(cell, dim=1).repeat_interleave(cell, dim=2)[:, :h, :w]

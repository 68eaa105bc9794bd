"""Mix3D: Nekrasov et al., "Mix3D: Out-of-Context Data Augmentation for 3D Scenes", 3DV 2021.

Two scenes, each augmented independently and centred at the origin, are merged into
one by concatenating their points (coordinates, features and per-point labels), so
objects are seen out of their usual context. There is no mixing weight: every point
keeps its own label. The batch of ``B`` scenes becomes ``ceil(B/2)`` mixed scenes.

Here the pairing is a seeded random matching of the batch (collate-time ports such as
Pointcept's merge consecutive scenes of an already shuffled batch, which is the same
distribution); an odd batch leaves one scene unpaired. ``centre`` subtracts each scene's mean coordinate
before concatenation, as the paper does so the two scenes overlap. The per-scene
augmentations (rotation, scaling, flips, elastic distortion, colour jitter) belong to
the loader and happen before this function.
"""

from __future__ import annotations

import numpy as np
import torch

from mixflow.mix.point_scenes import MixedScenes, PointScenes


def centre_scenes(x: PointScenes) -> torch.Tensor:
    """``coords`` with each scene's mean coordinate subtracted (empty scenes are fine)."""
    ids = x.scene_ids()
    sums = torch.zeros(x.num_scenes, 3, dtype=x.coords.dtype, device=x.coords.device).index_add_(0, ids, x.coords)
    means = sums / x.counts.clamp(min=1).to(x.coords.dtype).unsqueeze(1)
    return x.coords - means.index_select(0, ids)


def mix3d(x: PointScenes, y: torch.Tensor, rng: np.random.Generator, *, centre: bool = True) -> MixedScenes:
    """Concatenate random pairs of scenes; ``y [N]`` are per-point labels, kept with their points."""
    if len(y) != len(x.coords):
        raise ValueError(f"y has {len(y)} labels but x has {len(x.coords)} points")
    b = x.num_scenes
    dev = x.offsets.device
    order = torch.as_tensor(rng.permutation(b), dtype=torch.int64, device=dev)
    # Scenes in `order` sit next to each other: output scene k is order[2k] followed by order[2k+1].
    counts = x.counts.index_select(0, order)
    starts = x.offsets[:-1].index_select(0, order)
    out_starts = torch.cumsum(counts, 0) - counts
    total = int(x.offsets[-1])
    index = (torch.arange(total, device=dev) + torch.repeat_interleave(starts - out_starts, counts))
    coords = centre_scenes(x) if centre else x.coords
    pair_counts = counts[0::2].clone()
    pair_counts[: b // 2] += counts[1::2]
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), torch.cumsum(pair_counts, 0)])
    second = torch.full((len(pair_counts),), -1, dtype=torch.int64, device=dev)
    second[: b // 2] = order[1::2]
    mixed = PointScenes(coords.index_select(0, index), x.feats.index_select(0, index), offsets)
    return MixedScenes(mixed, y.index_select(0, index.to(y.device)), torch.stack([order[0::2], second], dim=1))

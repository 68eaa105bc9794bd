"""Point-cloud scenes packed into flat tensors (the form sparse 3-D networks consume).

``B`` scenes with ``N`` points in total: ``coords [N, 3]``, ``feats [N, F]`` and
per-point ``labels [N]``; scene ``b`` owns rows ``offsets[b]:offsets[b+1]``
(``offsets [B+1]``, int64, ``offsets[0] = 0``, non-decreasing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PointScenes:
    """The inputs of a batch of scenes (labels travel separately, as ``y [N]``)."""

    coords: torch.Tensor
    feats: torch.Tensor
    offsets: torch.Tensor

    def __post_init__(self) -> None:
        n = len(self.coords)
        if self.coords.dim() != 2 or self.coords.shape[1] != 3:
            raise ValueError(f"coords must be [N, 3], got shape {tuple(self.coords.shape)}")
        if len(self.feats) != n:
            raise ValueError(f"feats has {len(self.feats)} rows but coords has {n}")
        off = self.offsets
        if off.dim() != 1 or len(off) < 1 or int(off[0]) != 0 or int(off[-1]) != n or bool((off[1:] < off[:-1]).any()):
            raise ValueError(f"offsets must be non-decreasing from 0 to N={n}, got {off.tolist()}")

    @property
    def num_scenes(self) -> int:
        return len(self.offsets) - 1

    @property
    def counts(self) -> torch.Tensor:
        """Points per scene, ``[B]``."""
        return self.offsets[1:] - self.offsets[:-1]

    def scene_ids(self) -> torch.Tensor:
        """The scene each point belongs to, ``[N]``."""
        return torch.repeat_interleave(torch.arange(self.num_scenes, device=self.offsets.device), self.counts)


def pack_scenes(scenes: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[PointScenes, torch.Tensor]:
    """``[(coords, feats, labels), ...]`` -> ``(PointScenes, labels [N])``."""
    if not scenes:
        raise ValueError("pack_scenes needs at least one scene")
    counts = torch.tensor([len(c) for c, _, _ in scenes], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
    coords = torch.cat([c for c, _, _ in scenes])
    feats = torch.cat([f for _, f, _ in scenes])
    labels = torch.cat([lab for _, _, lab in scenes])
    return PointScenes(coords, feats, offsets.to(coords.device)), labels


@dataclass
class MixedScenes:
    """Scenes after Mix3D: ``x`` packs ``ceil(B/2)`` scenes, ``y`` their per-point labels.

    ``sources[k] = (a, b)`` are the input scenes concatenated into output scene ``k``
    (points of ``a`` first); ``b = -1`` for the scene left alone in an odd batch.
    """

    x: PointScenes
    y: torch.Tensor
    sources: torch.Tensor
    method: str = "mix3d"

"""The mixing stage's work on one decoded batch (pure: numpy in, numpy out)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from mixflow.mix import cpu_kernels
from mixflow.mix.registry import build_mixer
from mixflow.seeding import numpy_rng


def _tensor(a: np.ndarray) -> torch.Tensor:
    # Arrays read from Ray's object store are read-only views; mixing never writes into them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


class MixStage:
    """Applies the configured method with a generator derived from ``(seed, epoch, "mix", rank, step)``."""

    def __init__(self, method: str, params: dict, num_classes: int, seed: int, rank: int,
                 device: str = "cpu"):
        self.mix = build_mixer(method, num_classes, **params)
        self.seed = seed
        self.rank = rank
        self.device = torch.device(device)
        if self.device.type == "cpu":
            cpu_kernels.warm_up()  # JIT start-up belongs to actor start-up, not to the first batch

    def __call__(self, decoded: dict, epoch: int, step: int) -> dict:
        x = _tensor(decoded["images"]).to(self.device)
        y = torch.from_numpy(np.asarray(decoded["labels"])).to(self.device)
        mixed = self.mix(x, y, numpy_rng(self.seed, epoch, "mix", self.rank, step))
        out = {
            "keys": decoded["keys"],
            "x": mixed.x.cpu().numpy(),
            "y_a": mixed.y_a.cpu().numpy(),
            "y_b": mixed.y_b.cpu().numpy(),
            "lam": mixed.lam.cpu().numpy(),
            "targets": mixed.targets.cpu().numpy(),
            "method": mixed.method,
            "perm": mixed.perm.cpu().numpy(),
            "plan": mixed.plan,
            "epoch": epoch,
            "step": step,
            "rank": self.rank,
        }
        return out


def batch_nbytes(batch: dict) -> int:
    return sum(v.nbytes for v in batch.values() if isinstance(v, np.ndarray))

"""Derived random generators: no global RNG anywhere in mixflow.

Every random draw comes from a generator derived from
``(seed, epoch, stage, actor/rank, step)`` so the same seed gives the same stream
regardless of timing, restarts or prefetch depth.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

_STAGES: dict[str, int] = {}


def stage_id(stage: str) -> int:
    """A stable integer for a stage name (crc32; stable across processes and runs)."""
    if stage not in _STAGES:
        _STAGES[stage] = zlib.crc32(stage.encode("utf-8"))
    return _STAGES[stage]


def seed_sequence(seed: int, epoch: int, stage: str, actor: int = 0, step: int = 0) -> np.random.SeedSequence:
    for name, value in (("seed", seed), ("epoch", epoch), ("actor", actor), ("step", step)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 to derive a generator, got {value}")
    return np.random.SeedSequence([seed, epoch, stage_id(stage), actor, step])


def numpy_rng(seed: int, epoch: int, stage: str, actor: int = 0, step: int = 0) -> np.random.Generator:
    """A numpy Generator for one ``(seed, epoch, stage, actor, step)`` cell."""
    return np.random.Generator(np.random.PCG64(seed_sequence(seed, epoch, stage, actor, step)))


def torch_rng(seed: int, epoch: int, stage: str, actor: int = 0, step: int = 0,
              device: str | torch.device = "cpu") -> torch.Generator:
    """A torch Generator for one ``(seed, epoch, stage, actor, step)`` cell."""
    state = seed_sequence(seed, epoch, stage, actor, step).generate_state(2, dtype=np.uint64)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(state[0] >> np.uint64(1)))
    return gen

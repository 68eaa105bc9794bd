"""Partner selection for batch mixing, and the groups that share one lam.

* ``derangement`` (default): a uniformly random permutation without fixed points,
  so no sample is mixed with itself (rejection sampling, e ~ 2.7 draws on average).
* ``flip``: ``perm[i] = B-1-i`` like timm (the middle sample of an odd batch is unmixed).
* ``roll``: ``perm[i] = i-1`` like torchvision's ``batch.roll(1, 0)``.

In ``pair`` mode samples in one cycle of ``perm`` share lam; with ``derangement``
the pairing drawn is then a random perfect matching (one 3-cycle for odd batches),
so each pair mixes with each other exactly as timm's pair mode does.
"""

from __future__ import annotations

import numpy as np

PAIRINGS = ("derangement", "flip", "roll")


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    if n < 2:
        return np.arange(n)
    idx = np.arange(n)
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == idx):
            return perm


def matching(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random involution without fixed points (odd n: the last three form a 3-cycle)."""
    if n < 2:
        return np.arange(n)
    order = rng.permutation(n)
    perm = np.empty(n, dtype=np.int64)
    even = n - (n % 2)
    a, b = order[0:even:2], order[1:even:2]
    perm[a], perm[b] = b, a
    if n % 2:
        x, y, z = order[-3], order[-2], order[-1]  # fold the odd one into a 3-cycle
        perm[x], perm[y], perm[z] = y, z, x
    return perm


def partner_index(n: int, pairing: str, rng: np.random.Generator, mode: str = "batch") -> np.ndarray:
    if pairing == "derangement":
        return matching(n, rng) if mode == "pair" else derangement(n, rng)
    if pairing == "flip":
        return np.arange(n)[::-1].copy()
    if pairing == "roll":
        return np.roll(np.arange(n), 1)
    raise ValueError(f"unknown pairing {pairing!r}; choose one of {', '.join(PAIRINGS)}")


def cycle_ids(perm: np.ndarray) -> np.ndarray:
    """For each index, the smallest index of its cycle in ``perm`` (pointer doubling)."""
    label = np.arange(len(perm))
    step = np.asarray(perm)
    for _ in range(max(1, int(np.ceil(np.log2(max(len(perm), 2))))) + 1):
        label = np.minimum(label, label[step])
        step = step[step]
    return label

"""Mixing weights: one lam per batch, per pair (cycle of the pairing), or per element."""

from __future__ import annotations

import numpy as np

from mixflow.mix.checks import check_alpha
from mixflow.mix.pairing import cycle_ids

MODES = ("batch", "pair", "elem")


def per_mode(draw, mode: str, perm: np.ndarray) -> np.ndarray:
    """Expand draws to ``[B]``: ``draw(k)`` returns ``k`` values."""
    n = len(perm)
    if mode == "batch":
        return np.full(n, draw(1)[0])
    if mode == "elem":
        return np.asarray(draw(n))
    if mode == "pair":
        ids = cycle_ids(perm)
        return np.asarray(draw(n))[ids]
    raise ValueError(f"unknown lam mode {mode!r}; choose one of {', '.join(MODES)}")


def beta_lam(alpha: float, mode: str, perm: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``lam ~ Beta(alpha, alpha)`` shared according to ``mode``."""
    check_alpha(alpha)  # NaN / inf would give NaN lam
    return per_mode(lambda k: rng.beta(alpha, alpha, size=k), mode, perm)


def apply_prob(lam: np.ndarray, prob: float, mode: str, perm: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Leave a batch / pair / element unmixed (lam = 1) with probability ``1 - prob``."""
    if prob >= 1.0:
        return lam
    keep = per_mode(lambda k: rng.random(k) < prob, mode, perm)
    return np.where(keep, lam, 1.0)

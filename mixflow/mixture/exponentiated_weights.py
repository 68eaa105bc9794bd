"""Exponentiated-gradient domain weights with their running mean (DoReMi and DoGE share this).

``alpha ∝ alpha * exp(gain)`` (computed as ``exp(gain - max(gain))`` for stability),
optionally smoothed toward uniform, ``alpha = (1 - c) * alpha + c / m``. Both DoReMi
(Xie et al., NeurIPS 2023) and DoGE (Fan et al., 2024) output the *average* of the
alphas over the updates, kept here as a running sum.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ExponentiatedWeights:
    def __init__(self, alpha0: np.ndarray):
        self.alpha = np.asarray(alpha0, dtype=np.float64).copy()
        self.alpha_sum = np.zeros_like(self.alpha)
        self.updates = 0

    def step(self, gain: np.ndarray, smoothing: float = 0.0) -> np.ndarray:
        alpha = self.alpha * np.exp(gain - gain.max())
        alpha = alpha / alpha.sum()
        if smoothing:
            alpha = (1.0 - smoothing) * alpha + smoothing / len(alpha)
        self.alpha = alpha
        self.alpha_sum += alpha
        self.updates += 1
        return alpha

    def average(self) -> np.ndarray:
        """The mean of the alphas after each update (the starting alpha before any)."""
        return self.alpha.copy() if self.updates == 0 else self.alpha_sum / self.updates

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha.tolist(), "alpha_sum": self.alpha_sum.tolist(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alpha = np.asarray(state["alpha"], dtype=np.float64)
        self.alpha_sum = np.asarray(state["alpha_sum"], dtype=np.float64)
        self.updates = int(state["updates"])

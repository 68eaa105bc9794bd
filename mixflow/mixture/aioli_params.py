"""Aioli's LearnParams: estimate the mixing-law matrix ``A`` from short sweeps.

Chen, Hu, Lourie, Cho, Ré, "Aioli: A Unified Optimization Framework for Language Model
Data Mixing", ICLR 2025 (arXiv 2411.05735), Algorithm 2.

Mixing law: training on mixture ``w`` for a short while lowers the per-domain loss by
``A w`` (``L_after = L_before - A w``). LearnParams trains ``lp_steps`` steps on each
sweep mixture ``w^(j)`` (weight ``ohf`` on domain j, ``(1 - ohf)/(m - 1)`` on the others),
in ``lp_rounds`` random orders over the m domains, evaluates every domain after each
sweep and accumulates ``B[:, j] += L_before - L_after``, where ``L_before`` is the
evaluation just before that sweep (the previous sweep's, or the round's baseline for the
first one) — as the reference code chains them. With ``B`` and ``W`` averaged over the
sweeps of each j,

    B = A W^T   =>   A_i = W^{-1} B_i  (row i of A from row i of B),

where row j of ``W`` is the mixture *actually realised* in the sweeps on j (summed
sample counts), not the nominal ``w^(j)``: a 32-sample sweep, the floor or a rounding
sampler can make them differ, and the solve inherits any difference. ``A`` is in units
of "loss drop per sweep of ``lp_steps`` steps", as in the reference code (the step size
``eta`` absorbs the scale; normalisation removes it).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def sweep_mixture(j: int, m: int, one_hot_factor: float) -> np.ndarray:
    """``w^(j)``: ``one_hot_factor`` on domain j, the rest spread evenly."""
    w = np.full(m, (1.0 - one_hot_factor) / (m - 1))
    w[j] = one_hot_factor
    return w


def solve_mixing_law(B: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``A`` with ``B = A W^T`` (least squares, so a singular realised ``W`` still gives
    the minimum-norm answer)."""
    return np.linalg.lstsq(W, B.T, rcond=None)[0].T


def normalize_interactions(A: np.ndarray) -> np.ndarray:
    """Aioli's optional normalisation: shift by the minimum entry if it is negative, then
    divide by the total (an all-zero matrix stays zero)."""
    A = np.array(A, dtype=np.float64)
    low = A.min()
    if low < 0:
        A -= low
    total = A.sum()
    return A / total if total > 0 else A


class LearnParams:
    """One LearnParams pass: the sweep order, the loss drops and the realised mixtures."""

    def __init__(self, num_domains: int, order: np.ndarray, loss_before: np.ndarray):
        self.m = num_domains
        self.order = np.asarray(order, dtype=np.int64)
        self.k = 0
        self.loss_prev = np.asarray(loss_before, dtype=np.float64).copy()
        self.drop_sum = np.zeros((num_domains, num_domains))   # B, summed over sweeps
        self.mix_sum = np.zeros((num_domains, num_domains))    # W rows, summed over sweeps
        self.sweeps = np.zeros(num_domains)

    @property
    def done(self) -> bool:
        return self.k >= len(self.order)

    @property
    def domain(self) -> int:
        """The one-hot domain of the sweep now running."""
        return int(self.order[self.k])

    def record(self, loss_after: np.ndarray, realised: np.ndarray) -> None:
        """The eval after the current sweep and the composition it realised."""
        j = self.domain
        loss_after = np.asarray(loss_after, dtype=np.float64)
        self.drop_sum[:, j] += self.loss_prev - loss_after
        self.mix_sum[j] += realised
        self.sweeps[j] += 1
        self.loss_prev = loss_after.copy()
        self.k += 1

    def estimate(self) -> np.ndarray:
        """``A`` from the averaged ``B`` and realised ``W`` (every domain swept at least once)."""
        B = self.drop_sum / self.sweeps[None, :]
        W = self.mix_sum / self.sweeps[:, None]
        return solve_mixing_law(B, W)

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order.tolist(), "k": self.k, "loss_prev": self.loss_prev.tolist(),
                "drop_sum": self.drop_sum.tolist(), "mix_sum": self.mix_sum.tolist(),
                "sweeps": self.sweeps.tolist()}

    @classmethod
    def from_state(cls, num_domains: int, state: dict[str, Any]) -> "LearnParams":
        lp = cls(num_domains, np.asarray(state["order"]), np.asarray(state["loss_prev"]))
        lp.k = int(state["k"])
        lp.drop_sum = np.asarray(state["drop_sum"], dtype=np.float64)
        lp.mix_sum = np.asarray(state["mix_sum"], dtype=np.float64)
        lp.sweeps = np.asarray(state["sweeps"], dtype=np.float64)
        return lp

"""A ridge regression from mixture proportions to a score, and its ascent on the simplex.

Used by TiKMiX-M (Wang et al., "TiKMiX: Take Data Influence into Dynamic Mixture for
Language Model Pre-training", arXiv 2508.17677, 2025), which fits a regression from
mixtures to their measured effect and moves to the mixture it predicts best.

Model: ``f(q) = c^T q`` (``degree=1``) or ``f(q) = c^T q + q^T Q q`` (``degree=2``,
features ``q_i q_j`` for ``i <= j``). No intercept column: on the simplex ``sum q = 1``
already plays that part. Fitted by ridge least squares (``ridge=0``: minimum-norm least
squares).

Ascent: maximise ``f(q) - (1/tau) KL(q || p_ref)`` over the simplex by damped mirror
ascent, ``log q <- (1 - d) log q + d (log p_ref + tau * grad f(q))`` renormalised (a
mirror-ascent step of size ``d * tau`` on the regularised objective). Its
fixed point is the stationary point of the KL-regularised objective (for a linear ``f``
the closed form ``p_ref * exp(tau c)``); the KL term keeps the answer within a trust
region around ``p_ref`` whose size ``tau`` sets.
"""

from __future__ import annotations

import numpy as np


class MixtureRegression:
    """Ridge regression of a score on mixture features (linear or quadratic in ``q``)."""

    def __init__(self, num_domains: int, degree: int = 2, ridge: float = 1e-3):
        if degree not in (1, 2):
            raise ValueError(f"degree must be 1 (linear) or 2 (quadratic), got {degree}")
        if not (np.isfinite(ridge) and ridge >= 0):
            raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
        self.m = num_domains
        self.degree = degree
        self.ridge = float(ridge)
        self._pairs = np.triu_indices(num_domains)
        self.linear = np.zeros(num_domains)
        self.quadratic = np.zeros((num_domains, num_domains))

    @property
    def num_features(self) -> int:
        return self.m if self.degree == 1 else self.m + len(self._pairs[0])

    def features(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        if self.degree == 1:
            return X
        i, j = self._pairs
        return np.concatenate([X, X[:, i] * X[:, j]], axis=1)

    def fit(self, X: np.ndarray, y: np.ndarray) -> None:
        phi = self.features(X)
        y = np.asarray(y, dtype=np.float64)
        if self.ridge > 0:
            phi = np.vstack([phi, np.sqrt(self.ridge) * np.eye(phi.shape[1])])
            y = np.concatenate([y, np.zeros(phi.shape[1])])
        coef = np.linalg.lstsq(phi, y, rcond=None)[0]
        self.linear = coef[:self.m]
        self.quadratic = np.zeros((self.m, self.m))
        if self.degree == 2:
            i, j = self._pairs
            c = coef[self.m:]
            # c_ij q_i q_j with i < j splits evenly into the symmetric Q_ij and Q_ji.
            self.quadratic[i, j] += np.where(i == j, c, c / 2)
            self.quadratic[j, i] += np.where(i == j, 0.0, c / 2)

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        return X @ self.linear + np.einsum("ki,ij,kj->k", X, self.quadratic, X)

    def gradient(self, q: np.ndarray) -> np.ndarray:
        return self.linear + 2.0 * self.quadratic @ q


def kl_trust_region_ascent(model: MixtureRegression, p_ref: np.ndarray, tau: float,
                           steps: int = 200) -> np.ndarray:
    """Maximise ``model(q) - (1/tau) KL(q || p_ref)`` over the simplex from ``q = p_ref``.

    The damping ``d = min(1/2, 1 / (1 + 2 tau ||Q||_2))`` keeps the iteration a
    contraction where the quadratic part is steep (an undamped fixed-point step would
    oscillate between vertices)."""
    p_ref = np.asarray(p_ref, dtype=np.float64)
    damping = min(0.5, 1.0 / (1.0 + 2.0 * tau * np.linalg.norm(model.quadratic, 2)))
    with np.errstate(divide="ignore"):
        log_ref = np.log(p_ref)
    log_q = log_ref.copy()
    for _ in range(steps):
        target = log_ref + tau * model.gradient(np.exp(log_q))
        log_q = (1.0 - damping) * log_q + damping * target
        log_q -= log_q.max()
        log_q -= np.log(np.exp(log_q).sum())
    return np.exp(log_q)

"""C-Mixup: Yao et al., "C-Mixup: Improving Generalization in Regression", NeurIPS 2022.

Mixup for regression that mixes samples with *similar labels*. The partner ``j`` of
sample ``i`` is drawn with probability

    P(j | i) ∝ exp(-||y_i - y_j||^2 / (2 * sigma^2)),   j != i,

then inputs and targets are mixed linearly, ``x = lam*x_i + (1-lam)*x_j`` and
``y = lam*y_i + (1-lam)*y_j`` with ``lam ~ Beta(alpha, alpha)``. ``sigma`` is the
kernel bandwidth (the reference code's ``kde_bandwidth``, default 1.0; ``mix_alpha``
is 2.0 for most of its datasets).

Two scopes, as in the paper:

* within the batch: :func:`c_mixup` (the registry entry ``"c_mixup"``);
* over the whole training set: :func:`c_mixup_probs` builds the ``[N, N]`` sampling
  table from every label once, :func:`draw_partners` draws dataset indices from its
  rows; the loader fetches those samples and mixes them with the same formula.

The reference code (``sklearn`` ``KernelDensity`` per row) keeps ``j = i`` in the
table; here the sample itself is excluded by default (``exclude_self``), since mixing
a sample with itself is a no-op that only wastes probability mass.
"""

from __future__ import annotations

import numpy as np
import torch

from mixflow.mix.checks import check_alpha, check_finite_labels, check_regression_targets
from mixflow.mix.lam import beta_lam
from mixflow.mix.ops import blend
from mixflow.mix.regression_batch import RegressionMixedBatch

C_MIXUP_MODES = ("batch", "elem")


def c_mixup_probs(labels: torch.Tensor, sigma: float = 1.0, exclude_self: bool = True) -> torch.Tensor:
    """Row-stochastic ``[N, N]`` float64 table: row ``i`` is ``P(j | i)`` for labels ``[N]`` or ``[N, D]``.

    Computed as a softmax of ``-d^2 / (2 sigma^2)`` (row maximum subtracted first) so
    far-apart labels underflow to probability 0 instead of making a row all zeros.
    """
    if not sigma > 0 or not np.isfinite(sigma):
        raise ValueError(f"sigma must be > 0 and finite, got {sigma}")
    check_finite_labels(labels, "labels")
    n = len(labels)
    if exclude_self and n < 2:
        raise ValueError(f"C-Mixup needs at least 2 samples to pick a partner other than itself, got {n}")
    y = labels.reshape(n, -1).to(torch.float64)
    d2 = torch.cdist(y, y, compute_mode="donot_use_mm_for_euclid_dist").square()
    logits = -d2 / (2.0 * sigma * sigma)
    if exclude_self:
        logits.fill_diagonal_(float("-inf"))
    # Written out rather than torch.softmax, whose threaded CPU kernel costs milliseconds on tiny tables.
    weights = (logits - logits.amax(dim=1, keepdim=True)).exp_()
    return weights / weights.sum(dim=1, keepdim=True)


def draw_partners(probs: torch.Tensor, rng: np.random.Generator, rows: torch.Tensor | None = None) -> torch.Tensor:
    """One partner per row of ``probs[rows]`` (all rows by default), by inverse CDF.

    ``u`` is drawn in ``(0, 1]`` and scaled by the row total, so an index with
    probability 0 (the sample itself, an underflowed kernel) is never returned.
    """
    table = probs if rows is None else probs.index_select(0, rows.to(probs.device))
    cdf = torch.cumsum(table, dim=1)
    u = 1.0 - torch.as_tensor(rng.random(len(table)), dtype=cdf.dtype, device=cdf.device)
    target = (u * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target).squeeze(1).clamp_(max=probs.shape[1] - 1)


def c_mixup(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, *, alpha: float = 2.0,
            sigma: float = 1.0, mode: str = "batch") -> RegressionMixedBatch:
    """C-Mixup within a batch: ``x [B, ...]``, float targets ``y [B]`` or ``[B, D]``.

    ``mode``: one lam per batch (the reference code) or one per element.
    """
    if mode not in C_MIXUP_MODES:
        raise ValueError(f"unknown C-Mixup lam mode {mode!r}; choose one of {', '.join(C_MIXUP_MODES)}")
    check_regression_targets(x, y)
    check_alpha(alpha)
    perm = draw_partners(c_mixup_probs(y, sigma), rng).to(x.device)
    lam = beta_lam(alpha, mode, np.arange(len(x)), rng)
    y_float = y if y.is_floating_point() else y.to(torch.float32)
    return RegressionMixedBatch(blend(x, perm, lam), blend(y_float, perm.to(y.device), lam),
                                torch.as_tensor(lam, dtype=torch.float32), perm, "c_mixup")

"""Fixed mixtures: a given ``p`` (static) or uniform over the domains (stratified).

Stratified sampling is the baseline of the data-mixing literature that online methods
are measured against (e.g. Chen et al., "Aioli: A Unified Optimization Framework for
Language Model Data Mixing", ICLR 2025, where most methods fail to beat it).

Neither policy moves, but both still check every report: a NaN / inf / negative loss
raises the same :class:`~mixflow.mixture.policy.FeedbackWarning` as under an adaptive
policy, so a broken trainer is noticed whichever policy runs.
"""

from __future__ import annotations

import numpy as np

from .policy import Feedback, MixturePolicy, clean_losses


class StaticPolicy(MixturePolicy):
    """Always ``p`` (validated, normalised, floored once)."""

    name = "static"

    def __init__(self, num_domains: int, *, p: np.ndarray | list[float], floor: float = 0.0):
        super().__init__(num_domains, np.asarray(p, dtype=np.float64), floor)

    def _update(self, feedback: Feedback) -> None:
        for name in ("train_loss", "eval_loss", "ref_loss"):
            clean_losses(getattr(feedback, name), name)
        return None


class StratifiedPolicy(StaticPolicy):
    """Uniform ``1/m`` over the domains."""

    name = "stratified"

    def __init__(self, num_domains: int, floor: float = 0.0):
        super().__init__(num_domains, p=np.full(num_domains, 1.0 / num_domains), floor=floor)

"""What the reports of one mixture version said, summed: realised counts, eval loss, grad·val.

Policies that learn from *which mixture produced which effect* (Aioli's LearnParams,
TiKMiX-M's regression) accumulate the reports of the version they wait for here:

- ``counts``: samples realised per domain, summed over the version's reports (the
  trainers' merged per-step reports), turned into the realised composition by
  :meth:`VersionReports.composition`;
- ``eval_loss``: the version's eval report (the last one received);
- ``grad_dot_val``: per-domain mean over the reports that had a value (NaN = no data);
  ``grad_reports`` counts the reports that carried it.

Every report is validated first; one with an inf / negative count or loss, a NaN eval
loss where the owner needs every domain, or an inf ``grad_dot_val`` is rejected as a
whole with a :class:`~mixflow.mixture.policy.FeedbackWarning` and changes nothing.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from .policy import Feedback, FeedbackWarning, clean_losses


def _shaped(values: np.ndarray | None, name: str, m: int) -> np.ndarray | None:
    if values is None:
        return None
    v = np.asarray(values, dtype=np.float64)
    if v.shape != (m,):
        raise ValueError(f"feedback.{name} must have shape ({m},), got {v.shape}")
    return v


class VersionReports:
    """Accumulator for the reports of one mixture version (``reset`` starts the next)."""

    def __init__(self, num_domains: int, eval_needs_all_domains: bool):
        self.m = num_domains
        self.eval_needs_all_domains = eval_needs_all_domains
        self.reset()

    def reset(self) -> None:
        self.reports = 0
        self.grad_reports = 0
        self.counts = np.zeros(self.m)
        self.eval_loss: np.ndarray | None = None
        self.grad_sum = np.zeros(self.m)
        self.grad_n = np.zeros(self.m)

    def add(self, feedback: Feedback) -> bool:
        """Take one report of this version; False (with a FeedbackWarning) if rejected."""
        counts = _shaped(feedback.counts, "counts", self.m)
        eval_loss = _shaped(feedback.eval_loss, "eval_loss", self.m)
        grad = _shaped(feedback.grad_dot_val, "grad_dot_val", self.m)
        if counts is not None and clean_losses(counts, "counts", allow_nan=False) is None:
            return False
        if eval_loss is not None and clean_losses(eval_loss, "eval_loss",
                                                  allow_nan=not self.eval_needs_all_domains) is None:
            return False
        if grad is not None and np.isinf(grad).any():
            warnings.warn(f"rejected feedback grad_dot_val={grad.tolist()}: values must be finite "
                          "(NaN for no data)", FeedbackWarning, stacklevel=3)
            return False
        self.reports += 1
        if counts is not None:
            self.counts += counts
        if eval_loss is not None:
            self.eval_loss = eval_loss
        if grad is not None:
            self.grad_reports += 1
            seen = ~np.isnan(grad)
            self.grad_sum[seen] += grad[seen]
            self.grad_n[seen] += 1
        return True

    def composition(self, nominal: np.ndarray) -> tuple[np.ndarray, bool]:
        """The realised composition (counts / total) and True, or ``nominal`` and False
        when no report of this version carried counts."""
        total = self.counts.sum()
        if total <= 0:
            return np.asarray(nominal, dtype=np.float64).copy(), False
        return self.counts / total, True

    def mean_grad_dot_val(self) -> np.ndarray:
        """Per-domain mean ``grad_dot_val`` over the reports that had one (NaN where none)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.grad_n > 0, self.grad_sum / np.maximum(self.grad_n, 1), np.nan)

    def state_dict(self) -> dict[str, Any]:
        return {"reports": self.reports, "grad_reports": self.grad_reports, "counts": self.counts.tolist(),
                "eval_loss": None if self.eval_loss is None else self.eval_loss.tolist(),
                "grad_sum": self.grad_sum.tolist(), "grad_n": self.grad_n.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reports = int(state["reports"])
        self.grad_reports = int(state["grad_reports"])
        self.counts = np.asarray(state["counts"], dtype=np.float64)
        self.eval_loss = None if state["eval_loss"] is None else np.asarray(state["eval_loss"], dtype=np.float64)
        self.grad_sum = np.asarray(state["grad_sum"], dtype=np.float64)
        self.grad_n = np.asarray(state["grad_n"], dtype=np.float64)

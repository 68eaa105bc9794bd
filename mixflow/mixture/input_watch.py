"""Which feedback a policy moves on, and a watch that says so when it never arrives.

Every policy names the :class:`~mixflow.mixture.policy.Feedback` fields it learns from
(``MixturePolicy.inputs``): DoReMi ``ref_loss``, TiKMiX and DoGE ``grad_dot_val``, Aioli and
Skill-It ``eval_loss``, ODM and ADO ``train_loss``. A trainer loop that never sends one
of them leaves the policy on its first mixture *silently*; :class:`InputWatch` turns that
into one :class:`MissingInputWarning` naming the policy and the field, after ``after``
merged reports without it (and again, once, at the end of a run that never got it).

A field counts as present in a report when it is given and not all NaN.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from mixflow.mixture.policy import Feedback

WHAT_SENDS = {
    "train_loss": "feed.report(step, per_domain_loss=...)",
    "eval_loss": "feed.report_eval(step, ...) after every batch marked eval_after",
    "grad_dot_val": "feed.report(..., grad_dot_val=...) every feed.grad_stats_every steps",
    "ref_loss": "feed.report(..., ref_loss=...) (a reference model's per-domain loss), or the policy's "
                "ref_loss table",
}


class MissingInputWarning(UserWarning):
    """A mixture policy's input never arrived: the policy cannot move."""


def _present(value: Any) -> bool:
    if value is None:
        return False
    v = np.asarray(value, dtype=np.float64)
    return v.size > 0 and not np.isnan(v).all()


class InputWatch:
    """Counts merged reports and the policy's inputs seen among them; warns once per field."""

    def __init__(self, policy: str, inputs: tuple[str, ...], after: int = 20):
        self.policy = policy
        self.inputs = tuple(inputs)
        self.after = int(after)
        self.reports = 0
        self.seen: set[str] = set()
        self.warned: set[str] = set()

    def missing(self) -> list[str]:
        """The inputs no report has carried so far."""
        return [f for f in self.inputs if f not in self.seen]

    def message(self, fields: list[str]) -> str:
        how = "; ".join(f"{f}: {WHAT_SENDS.get(f, f)}" for f in fields)
        return (f"mixture policy {self.policy!r} never received {', '.join(fields)} in {self.reports} reports, "
                f"so it cannot move from its mixture (send {how})")

    def see(self, feedback: Feedback) -> str | None:
        """Count one merged report; the warning's text when it is first due (else None)."""
        self.reports += 1
        for name in self.inputs:
            if name not in self.seen and _present(getattr(feedback, name, None)):
                self.seen.add(name)
        if self.reports < self.after:
            return None
        return self._warn()

    def finish(self) -> str | None:
        """At the end of a run: warn for inputs still missing (once per field overall)."""
        return self._warn() if self.reports else None

    def _warn(self) -> str | None:
        due = [f for f in self.missing() if f not in self.warned]
        if not due:
            return None
        self.warned.update(due)
        text = self.message(due)
        warnings.warn(text, MissingInputWarning, stacklevel=3)
        return text

    def state_dict(self) -> dict[str, Any]:
        return {"reports": self.reports, "seen": sorted(self.seen), "warned": sorted(self.warned)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reports = int(state["reports"])
        self.seen = set(state["seen"])
        self.warned = set(state["warned"])

"""The contract every data-mixture policy keeps (see ALGORITHMS.md, "Data-mixture policies").

A policy answers one question: *which mixture next?* It is pure (no Ray, no I/O, no
global RNG) so a unit test or a user without Ray can drive it step by step:

    policy.mixture()        -> Mixture(p, version, steps, eval_after)
    policy.observe(feedback) -> True when it published a new mixture (new version)
    policy.state_dict() / load_state_dict()

``Mixture.steps`` lets a policy ask for a fixed number of training steps on a mixture
(Aioli's LearnParams sweeps); ``eval_after`` asks the trainers to evaluate every domain
after those steps and report eval losses tagged with that version. A ``steps`` of
``None`` means "until I publish another".
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class FeedbackWarning(UserWarning):
    """Feedback with NaN / inf / negative values was rejected (the policy did not move)."""


@dataclass(frozen=True)
class Mixture:
    """Proportions ``p`` (on the simplex, length m) published under ``version``."""

    p: np.ndarray
    version: int
    steps: int | None = None
    eval_after: bool = False


@dataclass
class Feedback:
    """What trainers report, tagged with the mixture version that produced it.

    Every per-domain array has length m; domains with no data in this report are NaN
    (``train_loss``) or 0 (``tokens`` / ``counts``).

    - ``train_loss``: mean training loss per domain for this step (or aggregated steps).
    - ``tokens``: tokens trained on per domain.
    - ``counts``: samples (sequences) realised per domain under ``version``.
    - ``eval_loss``: per-domain held-out loss, present only for eval reports.
    - ``grad_dot_val``: ``<grad L_d, grad L_val>`` per domain (TiKMiX, DoGE).
    - ``ref_loss``: reference model loss per domain (DoReMi).
    """

    version: int
    step: int
    train_loss: np.ndarray | None = None
    tokens: np.ndarray | None = None
    counts: np.ndarray | None = None
    eval_loss: np.ndarray | None = None
    grad_dot_val: np.ndarray | None = None
    ref_loss: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def check_distribution(p: np.ndarray, m: int, floor: float = 0.0, where: str = "p") -> np.ndarray:
    """Validate and return ``p`` as float64: length m, finite, >= 0, sums to 1."""
    p = np.asarray(p, dtype=np.float64)
    if p.shape != (m,):
        raise ValueError(f"{where} must have shape ({m},), got {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError(f"{where} must be finite and >= 0, got {p.tolist()}")
    total = p.sum()
    if total <= 0:
        raise ValueError(f"{where} must have a positive sum, got {p.tolist()}")
    return p / total


def apply_floor(p: np.ndarray, floor: float) -> np.ndarray:
    """Smallest change that puts every entry at >= ``floor`` and keeps the sum at 1.

    Entries under the floor are raised to it; the mass is taken proportionally from the
    entries above it (repeated until stable, at most m rounds).
    """
    p = np.asarray(p, dtype=np.float64)
    m = len(p)
    if floor <= 0:
        return p / p.sum()
    if floor * m > 1 + 1e-12:
        raise ValueError(f"floor {floor} is infeasible for {m} domains (needs floor * m <= 1)")
    p = p / p.sum()
    fixed = np.zeros(m, dtype=bool)
    for _ in range(m):
        low = (p < floor) & ~fixed
        if not low.any():
            break
        fixed |= low
        free_mass = 1.0 - floor * fixed.sum()
        rest = p[~fixed]
        p = np.where(fixed, floor, 0.0)
        if rest.sum() > 0:
            p[~fixed] = rest / rest.sum() * free_mass
        else:
            p[~fixed] = free_mass / max((~fixed).sum(), 1)
    return p


def clean_losses(values: np.ndarray | None, name: str, allow_nan: bool = True) -> np.ndarray | None:
    """Return ``values`` as float64, or None (with a FeedbackWarning) if any entry is inf,
    negative, or NaN where NaN is not allowed. NaN means "no data for this domain"."""
    if values is None:
        return None
    v = np.asarray(values, dtype=np.float64)
    bad = np.isinf(v) | (v < 0)
    if not allow_nan:
        bad |= np.isnan(v)
    if bad.any():
        warnings.warn(f"rejected feedback {name}={v.tolist()}: values must be finite and >= 0",
                      FeedbackWarning, stacklevel=3)
        return None
    return v


class MixturePolicy(ABC):
    """Base class: holds the current mixture, its version and the floor.

    Subclasses implement ``_update(feedback) -> np.ndarray | None`` (new p, or None to
    keep the current mixture) and, when they have state of their own,
    ``_extra_state`` / ``_load_extra_state``. The base applies the floor, bumps the
    version and validates every published p.
    """

    name: str = "policy"
    # the Feedback fields this policy moves on (mixflow.mixture.input_watch warns when one never arrives)
    inputs: tuple[str, ...] = ()

    def __init__(self, num_domains: int, initial: np.ndarray | None = None, floor: float = 0.0):
        if num_domains < 1:
            raise ValueError(f"num_domains must be >= 1, got {num_domains}")
        self.m = num_domains
        self.floor = float(floor)
        p0 = np.full(num_domains, 1.0 / num_domains) if initial is None else initial
        self.p0 = apply_floor(check_distribution(p0, num_domains, where="initial"), self.floor)
        self._current = Mixture(self.p0.copy(), 0)

    def mixture(self) -> Mixture:
        return self._current

    def proportions(self) -> np.ndarray:
        return self._current.p

    def observe(self, feedback: Feedback) -> bool:
        """Take one report; return True when a new mixture was published."""
        new = self._update(feedback)
        if new is None:
            return False
        if isinstance(new, Mixture):
            p, steps, eval_after = new.p, new.steps, new.eval_after
        else:
            p, steps, eval_after = new, None, False
        p = apply_floor(check_distribution(p, self.m, where=f"{self.name} update"), self.floor)
        self._current = Mixture(p, self._current.version + 1, steps, eval_after)
        return True

    @abstractmethod
    def _update(self, feedback: Feedback) -> np.ndarray | Mixture | None:
        """Return a new p (or a Mixture with steps / eval_after), or None to keep the current one."""

    def _publish_first(self, mixture: Mixture) -> None:
        """Replace version 0 (before any feedback), e.g. a first LearnParams sweep mixture."""
        p = apply_floor(check_distribution(mixture.p, self.m, where=f"{self.name} start"), self.floor)
        self._current = Mixture(p, 0, mixture.steps, mixture.eval_after)

    def run_stats(self) -> dict[str, Any]:
        """Numbers about the run so far that a summary shows (JSON-ready); none by default."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        cur = self._current
        return {"name": self.name, "m": self.m, "floor": self.floor, "p0": self.p0.tolist(),
                "p": cur.p.tolist(), "version": cur.version, "steps": cur.steps,
                "eval_after": cur.eval_after, "extra": self._extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name or state.get("m") != self.m:
            raise ValueError(f"state is for policy {state.get('name')!r} with m={state.get('m')}, "
                             f"not {self.name!r} with m={self.m}")
        self.floor = float(state["floor"])
        self.p0 = np.asarray(state["p0"], dtype=np.float64)
        self._current = Mixture(np.asarray(state["p"], dtype=np.float64), int(state["version"]),
                                state["steps"], bool(state["eval_after"]))
        self._load_extra_state(state["extra"])

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        del state

"""TiKMiX: dynamic data mixtures driven by each domain's influence on a target loss.

Wang et al., "TiKMiX: Take Data Influence into Dynamic Mixture for Language Model
Pre-training", arXiv 2508.17677, 2025. No public code exists; this follows the paper's
two solvers with the choices below stated.

**Group Influence.** The influence of domain d on the target (validation) loss is
``-grad L_val^T H^{-1} grad L_d``. Here the Hessian is taken as the identity, so the
first-order form ``I_d = <grad L_val, grad L_d>`` (``Feedback.grad_dot_val``) is used:
a gradient step on domain d changes the target loss by ``-lr * I_d``, so a larger
``I_d`` means a more useful domain. ``I_d`` may be negative; an inf value is rejected
with a FeedbackWarning and NaN means "no data for d in this report".

**TiKMiX-D** (direct optimisation, :class:`TiKMiXDPolicy`). Every
``reports_per_update`` reports, with ``I`` the per-domain mean over them, maximise

    sum_d p_d I_d - (1/tau) KL(p || p_current)     over the simplex,

whose closed form is ``p ∝ p_current * exp(tau * I)`` (an entropic trust region around
the current mixture). With ``normalize=True`` (default) ``I`` is divided by
``max_d |I_d|`` first, so ``tau`` bounds the log change of any ratio ``p_a / p_b`` by
``2 tau`` per update whatever the gradients' scale. A domain without any value in the
window takes the mean of the others (neutral). Influence is a property of the model at
the report's step, not of the mixture, so reports of older versions are used.

**TiKMiX-M** (regression, :class:`TiKMiXMPolicy`). Records ``(x, y)`` pairs — ``x`` the
mixture realised under one version (its summed ``Feedback.counts``; the published ``p``
if no counts came), ``y`` its measured effect — fits a ridge regression ``y ≈ f(x)``
(:mod:`mixflow.mixture.mixture_regression`, linear or quadratic in ``x``) on the last
``history`` records (default ``max(64, 2 * min_records)``) with ``y`` standardised, and publishes the maximiser of
``f(q) - (1/tau) KL(q || c)``, where the trust region's centre ``c`` is the previous
model step's answer (``p0`` before the first). Until ``min_records`` records exist it
explores instead: mixtures drawn from ``Dirichlet(explore * m * c)`` (seeded), so the
regression sees varied mixtures around ``c``. Targets:

- ``"influence"``: ``y = sum_d x_d I_d`` (the first-order group influence of the mixture
  as one data group), ``I`` the mean over ``reports_per_update`` reports of the version
  (a domain without a value contributes 0);
- ``"eval_loss"``: every mixture trains ``steps_per_update`` steps and then evaluates
  (``eval_after``); ``y`` is the drop of the domain-mean eval loss over those steps
  (before the first one the policy publishes ``p0`` with ``steps=0`` to get a baseline).

Reports of any other version than the current one are ignored and counted in
``ignored_reports``: a record must pair a mixture with its own effect.
"""

from __future__ import annotations

import warnings
import zlib
from typing import Any

import numpy as np

from .mixture_regression import MixtureRegression, kl_trust_region_ascent
from .policy import Feedback, FeedbackWarning, Mixture, MixturePolicy
from .version_reports import VersionReports

TIKMIX_TARGETS = ("influence", "eval_loss")


def _check_tau(tau: float) -> float:
    if not (np.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite number > 0, got {tau}")
    return float(tau)


def _fill_missing(values: np.ndarray) -> np.ndarray:
    """NaN entries (no data) take the mean of the others; all NaN stays all NaN."""
    seen = ~np.isnan(values)
    if not seen.any():
        return values
    return np.where(seen, values, values[seen].mean())


class TiKMiXDPolicy(MixturePolicy):
    """TiKMiX-D: ``p ∝ p * exp(tau * I)`` from first-order group influence."""

    name = "tikmix_d"
    inputs = ("grad_dot_val",)

    def __init__(self, num_domains: int, tau: float = 0.5, reports_per_update: int = 10,
                 normalize: bool = True, initial: np.ndarray | None = None, floor: float = 0.0):
        super().__init__(num_domains, initial, floor)
        self.tau = _check_tau(tau)
        if reports_per_update < 1:
            raise ValueError(f"reports_per_update must be >= 1, got {reports_per_update}")
        self.reports_per_update = int(reports_per_update)
        self.normalize = bool(normalize)
        self.window = VersionReports(num_domains, eval_needs_all_domains=False)
        self.updates = 0

    def influence_step(self, influence: np.ndarray) -> np.ndarray:
        """The TiKMiX-D mixture from the current one and a per-domain influence ``I``."""
        I = np.asarray(influence, dtype=np.float64)
        if self.normalize:
            scale = np.abs(I).max()
            I = I / scale if scale > 0 else I
        z = self.tau * I
        return self._current.p * np.exp(z - z.max())

    def _update(self, feedback: Feedback) -> np.ndarray | None:
        if feedback.grad_dot_val is None:
            return None
        grad = np.asarray(feedback.grad_dot_val, dtype=np.float64)
        if grad.shape == (self.m,) and np.isnan(grad).all():
            return None
        if not self.window.add(feedback):
            return None
        if self.window.grad_reports < self.reports_per_update:
            return None
        influence = _fill_missing(self.window.mean_grad_dot_val())
        self.window.reset()
        self.updates += 1
        return self.influence_step(influence)

    def _extra_state(self) -> dict[str, Any]:
        return {"window": self.window.state_dict(), "updates": self.updates}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.window.load_state_dict(state["window"])
        self.updates = int(state["updates"])


class TiKMiXMPolicy(MixturePolicy):
    """TiKMiX-M: regress measured effect on realised mixtures, move to the predicted best."""

    name = "tikmix_m"

    def __init__(self, num_domains: int, target: str = "influence", tau: float = 0.5,
                 reports_per_update: int = 10, steps_per_update: int = 50, degree: int = 2,
                 ridge: float = 1e-3, min_records: int | None = None, history: int | None = None,
                 explore: float = 20.0, inner_steps: int = 200, initial: np.ndarray | None = None,
                 floor: float = 0.0, seed: int = 0):
        super().__init__(num_domains, initial, floor)
        if target not in TIKMIX_TARGETS:
            raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TIKMIX_TARGETS)}")
        self.target = target
        self.inputs = ("eval_loss",) if target == "eval_loss" else ("grad_dot_val",)
        self.tau = _check_tau(tau)
        self.model = MixtureRegression(num_domains, degree, ridge)
        self.min_records = 2 * num_domains if min_records is None else int(min_records)
        history = max(64, 2 * self.min_records) if history is None else int(history)
        for name, value in (("reports_per_update", reports_per_update), ("steps_per_update", steps_per_update),
                            ("min_records", self.min_records), ("history", history),
                            ("inner_steps", inner_steps)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.min_records > history:
            raise ValueError(f"min_records ({self.min_records}) must be <= history ({history})")
        if not (np.isfinite(explore) and explore > 0):
            raise ValueError(f"explore must be a finite number > 0, got {explore}")
        self.reports_per_update = int(reports_per_update)
        self.steps_per_update = int(steps_per_update)
        self.history = int(history)
        self.explore = float(explore)
        self.inner_steps = int(inner_steps)
        self.seed = int(seed)
        self.rng = np.random.default_rng([self.seed, zlib.crc32(self.name.encode())])
        self.window = VersionReports(num_domains, eval_needs_all_domains=False)
        self.records_x: list[list[float]] = []
        self.records_y: list[float] = []
        self.baseline_loss: float | None = None
        self.centre = self.p0.copy()  # the trust region's centre: p0, then each model step's answer
        self.ignored_reports = 0
        if target == "eval_loss":
            self._publish_first(Mixture(self.p0, 0, 0, True))

    def _update(self, feedback: Feedback) -> Mixture | np.ndarray | None:
        if feedback.version != self._current.version:
            self.ignored_reports += 1
            return None
        if not self.window.add(feedback):
            return None
        if self.target == "eval_loss":
            if feedback.eval_loss is None:
                return None
            if np.isnan(self.window.eval_loss).all():
                warnings.warn("rejected feedback eval_loss: no domain has a value", FeedbackWarning, stacklevel=3)
                return None
            loss = float(np.nanmean(self.window.eval_loss))
            if self.baseline_loss is not None:
                self._record(self.baseline_loss - loss, self.window.composition(self._current.p)[0])
            self.baseline_loss = loss
        else:
            if feedback.grad_dot_val is None or self.window.grad_reports < self.reports_per_update:
                return None
            grad = self.window.mean_grad_dot_val()
            if np.isnan(grad).all():
                return None
            x = self.window.composition(self._current.p)[0]
            self._record(float(np.nansum(x * grad)), x)
        self.window.reset()
        q = self._propose()
        if self.target == "eval_loss":
            return Mixture(q, -1, self.steps_per_update, True)  # observe() assigns the next version
        return q

    def _record(self, y: float, x: np.ndarray) -> None:
        self.records_x.append([float(v) for v in x])
        self.records_y.append(float(y))
        del self.records_x[:-self.history], self.records_y[:-self.history]

    def _propose(self) -> np.ndarray:
        if len(self.records_y) < self.min_records:
            alpha = np.maximum(self.explore * self.m * self.centre, 1e-3)
            return self.rng.dirichlet(alpha)
        y = np.asarray(self.records_y)
        spread = y.std()
        y = (y - y.mean()) / spread if spread > 0 else np.zeros_like(y)
        self.model.fit(np.asarray(self.records_x), y)
        self.centre = kl_trust_region_ascent(self.model, self.centre, self.tau, self.inner_steps)
        return self.centre

    def _extra_state(self) -> dict[str, Any]:
        return {"window": self.window.state_dict(), "records_x": [list(r) for r in self.records_x],
                "records_y": list(self.records_y), "baseline_loss": self.baseline_loss,
                "centre": self.centre.tolist(),
                "ignored_reports": self.ignored_reports, "rng": self.rng.bit_generator.state}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.window.load_state_dict(state["window"])
        self.records_x = [list(map(float, r)) for r in state["records_x"]]
        self.records_y = [float(v) for v in state["records_y"]]
        self.baseline_loss = None if state["baseline_loss"] is None else float(state["baseline_loss"])
        self.centre = np.asarray(state["centre"], dtype=np.float64)
        self.ignored_reports = int(state["ignored_reports"])
        self.rng.bit_generator.state = state["rng"]

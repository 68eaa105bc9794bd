"""DoGE's online domain reweighting by generalization estimation.

Fan, Pagliardini, Jaggi, "DoGE: Domain Reweighting with Generalization Estimation",
ICML 2024.

Each report carries ``W_d = <grad l_d, grad l_target>`` per training domain d
(``feedback.grad_dot_val``): how much a step on domain d's data would lower the target
loss (the sum of the training domains' losses for universal generalisation, or an
out-of-domain target). The domain weights take one mirror-descent step with a KL
(Bregman) regulariser:

    alpha <- alpha * exp(eta * W / mu), normalised,

where ``eta`` is the model's learning rate at that step and ``mu`` the Bregman
coefficient. Defaults: ``mu = 1e-3`` (the DoGE code base's default for the training
weights) and ``eta = 1e-3``; set ``eta`` to the model's learning rate, or send it per
report as ``feedback.extra["lr"]`` (DoGE scales every step by the current rate). The
policy publishes the current ``alpha``; DoGE's *output* weights are the average of all
alphas, :meth:`DoGEPolicy.average_weights`.

``grad_dot_val`` may be negative (a conflicting gradient lowers a domain's weight), so
it is checked for inf only; NaN marks a domain with no data in the report, which gets
``W_d = 0``. An inf value (or a bad ``lr``) is rejected with a :class:`FeedbackWarning`.
Feedback tagged with an older mixture version is *used*: the gradient alignment is a
property of the model at the report's step, not of the mixture.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from mixflow.mixture.exponentiated_weights import ExponentiatedWeights
from mixflow.mixture.policy import Feedback, FeedbackWarning, MixturePolicy


class DoGEPolicy(MixturePolicy):
    """DoGE domain weights updated from per-domain gradient alignment with the target."""

    name = "doge"
    inputs = ("grad_dot_val",)

    def __init__(self, num_domains: int, eta: float = 1e-3, mu: float = 1e-3,
                 initial: np.ndarray | None = None, floor: float = 0.0):
        super().__init__(num_domains, initial, floor)
        if not (np.isfinite(eta) and eta > 0):
            raise ValueError(f"eta must be a finite number > 0, got {eta}")
        if not (np.isfinite(mu) and mu > 0):
            raise ValueError(f"mu must be a finite number > 0, got {mu}")
        self.eta = float(eta)
        self.mu = float(mu)
        self.weights = ExponentiatedWeights(self.p0)

    def average_weights(self) -> np.ndarray:
        """DoGE's output: the mean of the alphas after each update (alpha_0 before any)."""
        return self.weights.average()

    def _update(self, feedback: Feedback) -> np.ndarray | None:
        if feedback.grad_dot_val is None:
            return None
        w = np.asarray(feedback.grad_dot_val, dtype=np.float64)
        if w.shape != (self.m,):
            raise ValueError(f"feedback.grad_dot_val must have shape ({self.m},), got {w.shape}")
        lr = feedback.extra.get("lr", self.eta)
        if np.isinf(w).any() or not (np.isfinite(lr) and lr >= 0):
            warnings.warn(f"rejected feedback grad_dot_val={w.tolist()}, lr={lr}: grad_dot_val must "
                          "be finite (NaN for no data) and lr finite and >= 0", FeedbackWarning, stacklevel=3)
            return None
        if np.isnan(w).all():
            return None
        step = float(lr) * np.nan_to_num(w, nan=0.0) / self.mu
        return self.weights.step(step)

    def _extra_state(self) -> dict[str, Any]:
        return {"weights": self.weights.state_dict(), "eta": self.eta, "mu": self.mu}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.weights.load_state_dict(state["weights"])
        self.eta = float(state["eta"])
        self.mu = float(state["mu"])

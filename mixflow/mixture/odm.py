"""ODM: online data mixing as an EXP3 multi-armed bandit over domains.

Albalak, Pan, Raffel, Wang, "Efficient Online Data Mixing For Language Model
Pre-Training", arXiv 2312.02406, 2023.

Domains are arms; the reward of a domain is its training loss (a high loss means the
model still has much to learn there). After report t the policy for iteration t + 1 is

    eps_t   = min(1/m, sqrt(ln m / (m * t)))          (eps_0 = 1/m)
    pi_d    = (1 - m * eps_{t+1}) * softmax(eps_t * Rhat)_d + eps_{t+1}
    Rhat_d <- a * Rhat_d + (1 - a) * exp(R_d)         for each domain just sampled

with ``a = 0.5`` (``smoothing``). Every domain keeps at least ``eps`` of the mixture
(the exploration floor). With ``Rhat = 0`` the first mixture is uniform, so ODM takes no
``initial`` mixture.

Differences from the paper, following this project's ALGORITHMS.md:

- the paper's estimator divides the reward by the sampling probability (``R / pi_d``,
  the EXP3 importance weight for a bandit that observes one arm per round). Here a
  report comes from a mixed batch in which every domain with data is observed, so the
  reward enters unweighted;
- the reward is ``exp(loss)`` (per-token perplexity) as ALGORITHMS.md specifies; the
  paper's estimator takes the loss itself (``a * Rhat + (1 - a) * loss / pi_d``), and its
  released code adds ``loss / (10 * pi_d)`` to a running sum.

"The domain just sampled" = every domain with data in the report (non-NaN
``train_loss``); the others keep their ``Rhat``. ``t`` counts reports that had data.
Reports tagged with an older mixture version are *used*: the reward is the model's
current loss on that domain. A loss with ``exp(loss)`` overflowing, inf or negative is
rejected with a :class:`FeedbackWarning`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from mixflow.mixture.policy import Feedback, FeedbackWarning, MixturePolicy, clean_losses


class ODMPolicy(MixturePolicy):
    """EXP3 over domains with a smoothed exp(loss) reward estimate."""

    name = "odm"
    inputs = ("train_loss",)

    def __init__(self, num_domains: int, smoothing: float = 0.5, floor: float = 0.0):
        super().__init__(num_domains, None, floor)
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = float(smoothing)
        self.reward = np.zeros(num_domains)
        self.t = 0

    def exploration(self, t: int) -> float:
        """``eps_t = min(1/m, sqrt(ln m / (m t)))``, with ``eps_0 = 1/m``."""
        if t <= 0:
            return 1.0 / self.m
        return min(1.0 / self.m, math.sqrt(math.log(self.m) / (self.m * t)))

    def policy(self) -> np.ndarray:
        """The EXP3 mixture for iteration ``t + 1`` from the current reward estimates."""
        eps_next, eps_now = self.exploration(self.t + 1), self.exploration(self.t)
        z = eps_now * self.reward
        soft = np.exp(z - z.max())
        soft /= soft.sum()
        return (1.0 - self.m * eps_next) * soft + eps_next

    def _update(self, feedback: Feedback) -> np.ndarray | None:
        if feedback.train_loss is None:
            return None
        loss = clean_losses(feedback.train_loss, "train_loss")
        if loss is None:
            return None
        if loss.shape != (self.m,):
            raise ValueError(f"feedback.train_loss must have shape ({self.m},), got {loss.shape}")
        sampled = ~np.isnan(loss)
        if not sampled.any():
            return None
        with np.errstate(over="ignore"):
            reward = np.exp(loss[sampled])
        if not np.all(np.isfinite(reward)):
            warnings.warn(f"rejected feedback train_loss={loss.tolist()}: exp(loss) overflows",
                          FeedbackWarning, stacklevel=3)
            return None
        a = self.smoothing
        self.reward[sampled] = a * self.reward[sampled] + (1.0 - a) * reward
        self.t += 1
        return self.policy()

    def _extra_state(self) -> dict[str, Any]:
        return {"reward": self.reward.tolist(), "t": self.t, "smoothing": self.smoothing}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.reward = np.asarray(state["reward"], dtype=np.float64)
        self.t = int(state["t"])
        self.smoothing = float(state["smoothing"])

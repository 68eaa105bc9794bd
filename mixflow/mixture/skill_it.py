"""Skill-It: online data selection over an ordered set of skills.

Chen, Roberts, Bhatia, Wang, Zhang, Sala, Ré, "Skill-it! A Data-Driven Skills Framework
for Understanding and Training Language Models", NeurIPS 2023.

Domains are skills. A skills graph ``A`` (m x m, ``A[i, j] >= 0``) says how much
training on skill i lowers the loss of skill j. After every evaluation the mixture is

    p_i  ∝  exp(eta * sum_{tau in last w evals} sum_j A[i, j] * L_j^tau)

so data goes to skills that help the skills still lossy over the recent window
(defaults ``w = 3``, ``eta = 0.2``, the paper's). Before any evaluation the mixture is
``softmax(eta * A 1)``, as in the authors' code, unless ``initial`` is given.

``A`` is given, or estimated from short one-domain runs with
:func:`estimate_skills_graph`. The policy reads only ``feedback.eval_loss`` (a complete
vector: NaN, inf or negative entries are rejected with a :class:`FeedbackWarning`);
training reports do not move it. With ``round_steps`` set, every mixture asks for that
many training steps followed by an evaluation (``Mixture.steps`` / ``eval_after``),
the paper's rounds of H steps.

Each eval report counts as one evaluation. An eval report tagged with an *older*
mixture version is counted in ``stale_evals`` and ignored: its round was already closed
by an evaluation of that version (e.g. the same round reported twice).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mixflow.mixture.policy import Feedback, Mixture, MixturePolicy, clean_losses


def estimate_skills_graph(loss_before: np.ndarray, loss_after: np.ndarray) -> np.ndarray:
    """Skills graph from short one-domain runs.

    ``loss_after[i, j]``: eval loss on domain j after training only on domain i for a few
    steps; ``loss_before``: eval losses on all domains at the start of those runs, shape
    (m,) (one shared start) or (m, m) (row i = start of run i). Returns
    ``A[i, j] = max(loss_before[j] - loss_after[i, j], 0)``: the loss drop on j that
    training on i causes; a rise (negative transfer) is no edge.
    """
    after = np.asarray(loss_after, dtype=np.float64)
    if after.ndim != 2 or after.shape[0] != after.shape[1]:
        raise ValueError(f"loss_after must be a square (m, m) array, got shape {after.shape}")
    m = after.shape[0]
    before = np.asarray(loss_before, dtype=np.float64)
    if before.shape == (m,):
        before = np.broadcast_to(before, (m, m))
    elif before.shape != (m, m):
        raise ValueError(f"loss_before must have shape ({m},) or ({m}, {m}), got {before.shape}")
    for name, values in (("loss_before", before), ("loss_after", after)):
        if not np.all(np.isfinite(values)) or np.any(values < 0):
            raise ValueError(f"{name} must be finite and >= 0, got {values.tolist()}")
    return np.maximum(before - after, 0.0)


class SkillItPolicy(MixturePolicy):
    """Skill-It's online mixture from recent eval losses through the skills graph."""

    name = "skill_it"

    def __init__(self, num_domains: int, skills_graph: np.ndarray, eta: float = 0.2, window: int = 3,
                 round_steps: int | None = None, initial: np.ndarray | None = None, floor: float = 0.0):
        graph = np.asarray(skills_graph, dtype=np.float64)
        if graph.shape != (num_domains, num_domains):
            raise ValueError(f"skills_graph must have shape ({num_domains}, {num_domains}), got {graph.shape}")
        if not np.all(np.isfinite(graph)) or np.any(graph < 0):
            raise ValueError(f"skills_graph must be finite and >= 0, got {graph.tolist()}")
        if not (np.isfinite(eta) and eta > 0):
            raise ValueError(f"eta must be a finite number > 0, got {eta}")
        if int(window) != window or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window}")
        if round_steps is not None and (int(round_steps) != round_steps or round_steps < 1):
            raise ValueError(f"round_steps must be None or an integer >= 1, got {round_steps}")
        self.graph = graph
        self.eta = float(eta)
        self.window = int(window)
        self.round_steps = None if round_steps is None else int(round_steps)
        if initial is None:
            initial = self._softmax(graph @ np.ones(num_domains))
        super().__init__(num_domains, initial, floor)
        self.evals: list[np.ndarray] = []
        self.stale_evals = 0
        if self.round_steps is not None:
            self._publish_first(Mixture(self.p0, 0, self.round_steps, True))

    def _softmax(self, score: np.ndarray) -> np.ndarray:
        z = self.eta * score
        p = np.exp(z - z.max())
        return p / p.sum()

    def _update(self, feedback: Feedback) -> np.ndarray | Mixture | None:
        if feedback.eval_loss is None:
            return None
        if feedback.version < self._current.version:
            self.stale_evals += 1
            return None
        loss = clean_losses(feedback.eval_loss, "eval_loss", allow_nan=False)
        if loss is None:
            return None
        if loss.shape != (self.m,):
            raise ValueError(f"feedback.eval_loss must have shape ({self.m},), got {loss.shape}")
        self.evals = (self.evals + [loss])[-self.window:]
        p = self._softmax(self.graph @ np.sum(self.evals, axis=0))
        if self.round_steps is None:
            return p
        return Mixture(p, 0, self.round_steps, True)

    def _extra_state(self) -> dict[str, Any]:
        return {"evals": [e.tolist() for e in self.evals], "stale_evals": self.stale_evals}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.evals = [np.asarray(e, dtype=np.float64) for e in state["evals"]]
        self.stale_evals = int(state["stale_evals"])

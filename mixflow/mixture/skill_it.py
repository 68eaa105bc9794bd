"""Skill-It: online data selection over an ordered set of skills.

Chen, Roberts, Bhatia, Wang, Zhang, Sala, Ré, "Skill-it! A Data-Driven Skills Framework
for Understanding and Training Language Models", NeurIPS 2023.

Domains are skills. A skills graph ``A`` (m x m, ``A[i, j] >= 0``) says how much
training on skill i lowers the loss of skill j. After every evaluation the mixture is

    p_i  ∝  exp(eta * sum_{tau in last w evals} sum_j A[i, j] * L_j^tau)

so data goes to skills that help the skills still lossy over the recent window
(defaults ``w = 3``, ``eta = 0.2``, the paper's). Before any evaluation the mixture is
``softmax(eta * A 1)``, as in the authors' code, unless ``initial`` is given.

**The skills graph** is given (``graph``, or ``skills_graph``: an m x m array; a pipeline
spec sets ``mixture.params.graph``), or — when neither is given — estimated the way the
paper does, inside the run: the policy first asks for an evaluation of every skill
(``Mixture(p0, steps=0, eval_after=True)``), then, for each skill i in turn, for
``graph_steps`` training steps on skill i alone followed by an evaluation; ``A[i, j]`` is
the drop of skill j's loss over skill i's run (:func:`estimate_skills_graph`, a rise is no
edge). The paper trains each one-skill run from the same start; here the runs follow
one another in one model (each starts from the previous one's end), which costs
``m * graph_steps`` steps of the run and no separate jobs. The estimate is in
``estimated_graph`` (and :meth:`SkillItPolicy.run_stats`). A graph with no edges at all
(every run raised every loss) falls back to the identity (each skill helps itself).

The policy reads only ``feedback.eval_loss`` (a complete vector: NaN, inf or negative
entries are rejected with a :class:`FeedbackWarning`); training reports do not move it.
Every mixture asks for ``round_steps`` training steps followed by an evaluation
(``Mixture.steps`` / ``eval_after``), the paper's rounds of H steps; the default 50 is
mixflow's (the paper tunes H per task). ``round_steps=None`` publishes mixtures without
asking for evaluations: the policy then moves only on evals the trainer sends unasked.

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
    inputs = ("eval_loss",)

    def __init__(self, num_domains: int, skills_graph: np.ndarray | None = None, eta: float = 0.2,
                 window: int = 3, round_steps: int | None = 50, graph: np.ndarray | None = None,
                 graph_steps: int = 10, initial: np.ndarray | None = None, floor: float = 0.0):
        if skills_graph is not None and graph is not None:
            raise ValueError("give the skills graph once: graph or skills_graph, not both")
        given = graph if graph is not None else skills_graph
        if not (np.isfinite(eta) and eta > 0):
            raise ValueError(f"eta must be a finite number > 0, got {eta}")
        if int(window) != window or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window}")
        if round_steps is not None and (int(round_steps) != round_steps or round_steps < 1):
            raise ValueError(f"round_steps must be None or an integer >= 1, got {round_steps}")
        if int(graph_steps) != graph_steps or graph_steps < 1:
            raise ValueError(f"graph_steps must be an integer >= 1, got {graph_steps}")
        self.eta = float(eta)
        self.window = int(window)
        self.round_steps = None if round_steps is None else int(round_steps)
        self.graph_steps = int(graph_steps)
        self.graph: np.ndarray | None = None
        self.estimated_graph: np.ndarray | None = None
        if given is not None:
            self.graph = self._checked(given, num_domains)
            if initial is None:
                initial = self._softmax(self.graph @ np.ones(num_domains))
        super().__init__(num_domains, initial, floor)
        self.evals: list[np.ndarray] = []
        self.stale_evals = 0
        # estimating the graph: the eval before skill k's run, and each run's eval after
        self.graph_k: int | None = None if self.graph is not None else -1
        self.graph_before: list[list[float]] = []
        self.graph_after: list[list[float]] = []
        if self.graph is None:
            self._publish_first(Mixture(self.p0, 0, 0, True))
        elif self.round_steps is not None:
            self._publish_first(Mixture(self.p0, 0, self.round_steps, True))

    @staticmethod
    def _checked(graph: np.ndarray, m: int) -> np.ndarray:
        graph = np.asarray(graph, dtype=np.float64)
        if graph.shape != (m, m):
            raise ValueError(f"skills_graph must have shape ({m}, {m}), got {graph.shape}")
        if not np.all(np.isfinite(graph)) or np.any(graph < 0):
            raise ValueError(f"skills_graph must be finite and >= 0, got {graph.tolist()}")
        return graph

    def run_stats(self) -> dict[str, Any]:
        return {"estimated_graph": None if self.estimated_graph is None else self.estimated_graph.tolist(),
                "estimating": self.graph is None}

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
        if self.graph is None:
            return self._estimate_step(loss)
        self.evals = (self.evals + [loss])[-self.window:]
        p = self._softmax(self.graph @ np.sum(self.evals, axis=0))
        if self.round_steps is None:
            return p
        return Mixture(p, 0, self.round_steps, True)

    def _estimate_step(self, loss: np.ndarray) -> Mixture:
        """One eval of the graph estimate: the baseline, or the end of skill k's one-skill run."""
        if self.graph_k >= 0:
            self.graph_after.append(loss.tolist())
        self.graph_k += 1
        if self.graph_k < self.m:
            self.graph_before.append(loss.tolist())
            one_hot = np.zeros(self.m)
            one_hot[self.graph_k] = 1.0
            return Mixture(one_hot, 0, self.graph_steps, True)
        graph = estimate_skills_graph(np.asarray(self.graph_before), np.asarray(self.graph_after))
        self.estimated_graph = graph
        self.graph = graph if graph.any() else np.eye(self.m)
        self.graph_k = None
        self.evals = [loss]
        p = self._softmax(self.graph @ loss)
        return Mixture(p, 0, self.round_steps, self.round_steps is not None)

    def _extra_state(self) -> dict[str, Any]:
        return {"evals": [e.tolist() for e in self.evals], "stale_evals": self.stale_evals,
                "graph": None if self.graph is None else self.graph.tolist(),
                "estimated_graph": None if self.estimated_graph is None else self.estimated_graph.tolist(),
                "graph_k": self.graph_k, "graph_before": self.graph_before, "graph_after": self.graph_after}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.evals = [np.asarray(e, dtype=np.float64) for e in state["evals"]]
        self.stale_evals = int(state["stale_evals"])
        if "graph" in state:
            self.graph = None if state["graph"] is None else np.asarray(state["graph"], dtype=np.float64)
            est = state["estimated_graph"]
            self.estimated_graph = None if est is None else np.asarray(est, dtype=np.float64)
            self.graph_k = state["graph_k"]
            self.graph_before = [list(r) for r in state["graph_before"]]
            self.graph_after = [list(r) for r in state["graph_after"]]

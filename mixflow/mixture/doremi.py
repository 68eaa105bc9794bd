"""DoReMi's online domain reweighting (the proxy-training loop, Algorithm 1).

Xie, Pham, Dong, Du, Liu, Lu, Liang, Le, Ma, Yu, "DoReMi: Optimizing Data Mixtures
Speeds Up Language Model Pretraining", NeurIPS 2023.

Each report is one step of Group DRO over domains:

1. excess loss per domain ``lambda_d = mean over d's tokens of max(l_theta - l_ref, 0)``;
2. exponentiated-gradient ascent ``alpha' = alpha * exp(eta * lambda)``, normalised;
3. smoothing towards uniform ``alpha = (1 - c) * alpha' + c / m``.

Defaults ``eta = 1``, ``c = 1e-3`` (the paper's). The policy publishes the current
``alpha``; DoReMi's *output* weights (what a final run would train on) are the average
of all alphas so far, :meth:`DoReMiPolicy.average_weights`.

Where the reference losses come from (DoReMi needs one of them; a pipeline spec with
neither is refused, see ``mixflow.config.TokenPipelineSpec``):

- a **reference model** trained first on the stratified mixture (the paper's step 1): the
  built-in LM loop loads it (``trainer.reference_model``), measures its per-domain loss on
  every batch the proxy trains on and reports it as ``feedback.ref_loss``;
- a **reference table** ``ref_loss`` (one value per domain, e.g. the per-domain losses a
  reference model reached), used for every report that carries no ``ref_loss`` of its own.

Where the excess loss comes from (checked in this order):

- ``feedback.extra["token_loss"]`` and ``feedback.extra["ref_token_loss"]``: sequences of
  m per-token loss arrays (proxy and reference model, same tokens, an empty array or
  None where domain d had no tokens). This is the paper's exact definition: the clip
  ``max(., 0)`` applies per token. Per-token arrays travel in ``extra``, which the
  per-rank feedback merger does not combine, so use them with one reporting rank or
  when driving the policy directly.
- otherwise ``feedback.train_loss`` vs ``feedback.ref_loss`` (per-domain means; the
  ``ref_loss`` table where the report has none):
  ``lambda_d = max(train_loss_d - ref_loss_d, 0)``. The clip then applies to the means,
  which is a lower bound on the per-token form (``max`` of a mean <= mean of ``max``).

A domain with no data in the report (NaN loss or no tokens) gets ``lambda_d = 0``: its
weight only moves through normalisation, as in the reference implementation where
absent domains contribute zero excess loss. Reports without losses or reference losses
(e.g. eval-only reports) do not move the policy. Bad values (NaN where a value is
required, inf, negative) are rejected with a :class:`FeedbackWarning`.

Feedback tagged with an older mixture version is *used*: the excess loss measures the
model on each domain at the report's step, whichever mixture produced the batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mixflow.mixture.exponentiated_weights import ExponentiatedWeights
from mixflow.mixture.policy import Feedback, MixturePolicy, clean_losses


class DoReMiPolicy(MixturePolicy):
    """DoReMi domain weights updated from proxy-vs-reference excess losses."""

    name = "doremi"

    inputs = ("train_loss", "ref_loss")

    def __init__(self, num_domains: int, eta: float = 1.0, smoothing: float = 1e-3,
                 ref_loss: list[float] | np.ndarray | None = None,
                 initial: np.ndarray | None = None, floor: float = 0.0):
        super().__init__(num_domains, initial, floor)
        self.ref_table = None
        if ref_loss is not None:
            table = np.asarray(ref_loss, dtype=np.float64)
            if table.shape != (num_domains,):
                raise ValueError(f"ref_loss must hold one reference loss per domain ({num_domains}), "
                                 f"got shape {table.shape}")
            if not np.all(np.isfinite(table)) or np.any(table < 0):
                raise ValueError(f"ref_loss must be finite and >= 0, got {table.tolist()}")
            self.ref_table = table
            self.inputs = ("train_loss",)
        if not (np.isfinite(eta) and eta > 0):
            raise ValueError(f"eta must be a finite number > 0, got {eta}")
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
        self.eta = float(eta)
        self.smoothing = float(smoothing)
        self.weights = ExponentiatedWeights(self.p0)

    def average_weights(self) -> np.ndarray:
        """DoReMi's output: the mean of the alphas after each update (alpha_0 before any)."""
        return self.weights.average()

    def excess_loss(self, feedback: Feedback) -> np.ndarray | None:
        """``lambda`` for this report, or None when it carries no usable losses."""
        if "token_loss" in feedback.extra or "ref_token_loss" in feedback.extra:
            return self._token_excess(feedback)
        ref_loss = feedback.ref_loss if feedback.ref_loss is not None else self.ref_table
        if feedback.train_loss is None or ref_loss is None:
            return None
        loss = clean_losses(feedback.train_loss, "train_loss")
        ref = clean_losses(ref_loss, "ref_loss")
        if loss is None or ref is None:
            return None
        for name, values in (("train_loss", loss), ("ref_loss", ref)):
            if values.shape != (self.m,):
                raise ValueError(f"feedback.{name} must have shape ({self.m},), got {values.shape}")
        diff = loss - ref
        present = ~np.isnan(diff)
        if not present.any():
            return None
        return np.where(present, np.maximum(diff, 0.0), 0.0)

    def _token_excess(self, feedback: Feedback) -> np.ndarray | None:
        tokens, refs = feedback.extra.get("token_loss"), feedback.extra.get("ref_token_loss")
        if tokens is None or refs is None:
            raise ValueError("feedback.extra needs both 'token_loss' and 'ref_token_loss' (or neither)")
        if len(tokens) != self.m or len(refs) != self.m:
            raise ValueError(f"feedback.extra['token_loss'] / ['ref_token_loss'] must hold {self.m} "
                             f"per-domain arrays, got {len(tokens)} and {len(refs)}")
        lam = np.zeros(self.m)
        seen = False
        for d in range(self.m):
            own = clean_losses(np.ravel([] if tokens[d] is None else tokens[d]), f"token_loss[{d}]",
                               allow_nan=False)
            ref = clean_losses(np.ravel([] if refs[d] is None else refs[d]), f"ref_token_loss[{d}]",
                               allow_nan=False)
            if own is None or ref is None:
                return None
            if own.shape != ref.shape:
                raise ValueError(f"feedback.extra['token_loss'][{d}] has {own.size} tokens but "
                                 f"['ref_token_loss'][{d}] has {ref.size}")
            if own.size:
                lam[d] = float(np.maximum(own - ref, 0.0).mean())
                seen = True
        return lam if seen else None

    def _update(self, feedback: Feedback) -> np.ndarray | None:
        lam = self.excess_loss(feedback)
        if lam is None:
            return None
        step = self.eta * lam
        return self.weights.step(step, self.smoothing)

    def _extra_state(self) -> dict[str, Any]:
        return {"weights": self.weights.state_dict(), "eta": self.eta, "smoothing": self.smoothing}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.weights.load_state_dict(state["weights"])
        self.eta = float(state["eta"])
        self.smoothing = float(state["smoothing"])

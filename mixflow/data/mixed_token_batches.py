"""Batches of packed sequences whose domain composition follows an exact schedule.

Given the mixture a step must use, the batcher asks the
:class:`~mixflow.mixture.schedule.ExactSchedule` for the step's domain ids (exact prefix
counts per version), takes the next packed sequence from each chosen domain's
:class:`~mixflow.data.token_source.TokenSource`, and tags the batch with the version
and the counts realised, so feedback can be attributed exactly. Every batch also carries
the batcher's state after it, so whoever consumed it knows where the stream resumes
(batches produced but not consumed are built again, never lost). An ``empty`` mixture
step (an evaluation-only step) gives a batch of zero sequences.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mixflow.data.token_source import TokenSource
from mixflow.mixture.schedule import ExactSchedule


class MixedTokenBatcher:
    def __init__(self, sources: list[TokenSource], schedule: ExactSchedule, batch_size: int):
        if not sources:
            raise ValueError("a mixed token batcher needs at least one domain source")
        if schedule.m != len(sources):
            raise ValueError(f"schedule has {schedule.m} domains but {len(sources)} sources were given")
        seq_lens = {s.seq_len for s in sources}
        if len(seq_lens) != 1:
            raise ValueError(f"every domain source must use one seq_len, got {sorted(seq_lens)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sources = sources
        self.schedule = schedule
        self.batch_size = batch_size
        self.seq_len = seq_lens.pop()
        self.domains = [s.domain for s in sources]

    def build(self, step: int, mixture: dict[str, Any]) -> dict[str, Any]:
        """The batch of global step ``step`` under ``mixture`` (``version``, ``p``, ``empty``, ``eval_after``)."""
        self.schedule.set_mixture(np.asarray(mixture["p"], dtype=np.float64), int(mixture["version"]))
        n = 0 if mixture.get("empty") else self.batch_size
        domains = self.schedule.take(n)
        seqs = [next(self.sources[d]) for d in domains]
        tokens = (np.stack([s.tokens for s in seqs]).astype(np.int32) if seqs
                  else np.zeros((0, self.seq_len + 1), np.int32))
        return {"tokens": tokens, "domains": domains, "keys": [f"{s.domain}/{s.key}" for s in seqs],
                "num_tokens": np.asarray([s.num_tokens for s in seqs], np.int64),
                "counts": np.bincount(domains, minlength=len(self.sources)).astype(np.int64),
                "step": int(step), "version": int(mixture["version"]), "p": list(mixture["p"]),
                "eval_after": bool(mixture.get("eval_after", False)),
                "state": self.state_dict()}  # the state after this batch: a consumer's resume point

    def state_dict(self) -> dict[str, Any]:
        return {"sources": [s.state_dict() for s in self.sources], "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for source, s in zip(self.sources, state["sources"], strict=True):
            source.load_state_dict(s)
        self.schedule.load_state_dict(state["schedule"])

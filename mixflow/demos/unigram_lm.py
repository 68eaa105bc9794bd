"""A unigram language model trained by counting: the cheapest real model that learns.

Used where the data plane is what is measured (``benchmarks/mixture_overhead.py``) and
a transformer's compute would hide it: its per-domain losses are real next-token
cross entropies that fall as it sees data, so mixture policies get genuine feedback.
Add-one (Laplace) smoothed byte frequencies; each rank counts its own batches. Trained by
:mod:`mixflow.demos.lm_loop` (``trainer.model: unigram``).
"""

from __future__ import annotations

import torch


class UnigramLM:
    def __init__(self, vocab_size: int, pad_id: int | None = None):
        self.counts = torch.ones(vocab_size, dtype=torch.float64)
        self.pad_id = pad_id

    def per_sequence_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean ``-log p(target)`` per sequence of ``tokens [B, T+1]`` (padding left out)."""
        targets = tokens[:, 1:]
        logp = torch.log(self.counts / self.counts.sum())[targets]
        keep = torch.ones_like(logp) if self.pad_id is None else (targets != self.pad_id).to(logp.dtype)
        return -(logp * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)

    def update(self, tokens: torch.Tensor) -> None:
        targets = tokens[:, 1:].reshape(-1)
        if self.pad_id is not None:
            targets = targets[targets != self.pad_id]
        self.counts += torch.bincount(targets, minlength=len(self.counts)).to(self.counts.dtype)

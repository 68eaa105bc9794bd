"""A unigram language model trained by counting: the cheapest real model that learns.

Used where the data plane is what is measured (``benchmarks/mixture_overhead.py``) and
a transformer's compute would hide it: its per-domain losses are real next-token
cross entropies that fall as it sees data, so mixture policies get genuine feedback.
Add-one (Laplace) smoothed byte frequencies; each rank counts its own batches. Trained by
:mod:`mixflow.demos.lm_loop` (``trainer.model: unigram``).

**Gradients** (for TiKMiX and DoGE, which consume ``<grad L_val, grad L_d>``). Counting has
no gradient step, but the model is a softmax over logits ``theta = log(counts)``, and the
gradient of the mean next-token loss of a set of sequences with respect to ``theta`` is
exact and cheap: ``q - f``, ``q`` the model's distribution, ``f`` the mean of the sequences'
target-frequency vectors (:meth:`UnigramLM.loss_gradient`). So
``<grad L_val, grad L_d> = (q - f_val) . (q - f_d)``: large when domain d's byte
distribution pulls the model the way the validation data does. This is the real gradient
of the same model's loss, not of the counting update (which is not a gradient step).
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

    def loss_gradient(self, tokens: torch.Tensor) -> torch.Tensor:
        """``d mean_s loss_s / d theta`` over the sequences of ``tokens [B, T+1]`` (theta = log
        counts, the softmax logits): ``q - mean_s f_s``, ``f_s`` sequence s's target frequencies."""
        targets = tokens[:, 1:]
        keep = torch.ones_like(targets, dtype=torch.float64) if self.pad_id is None else \
            (targets != self.pad_id).to(torch.float64)
        weight = keep / keep.sum(dim=1, keepdim=True).clamp(min=1) / len(targets)
        freq = torch.zeros(len(self.counts), dtype=torch.float64)
        freq.index_add_(0, targets.reshape(-1), weight.reshape(-1))
        q = self.counts / self.counts.sum()
        return q * weight.sum() - freq

    def grad_dot_val(self, val: torch.Tensor, tokens: torch.Tensor, domains: torch.Tensor,
                     num_domains: int) -> list[float]:
        """``<grad L_val, grad L_d>`` per domain of the batch (NaN for domains not in it)."""
        g_val = self.loss_gradient(val)
        out = [float("nan")] * num_domains
        for d in torch.unique(domains).tolist():
            out[d] = float(g_val @ self.loss_gradient(tokens[domains == d]))
        return out

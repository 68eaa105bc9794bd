"""Losses a language-model loop reports to a token pipeline: next-token loss per sequence, and its
mean per domain (what ``feed.report(step, per_domain_loss=...)`` takes; every mixture policy
learns from it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def per_sequence_loss(model: nn.Module, tokens: torch.Tensor, pad_id: int | None = None) -> torch.Tensor:
    """Mean next-token cross entropy of each sequence: ``tokens [B, T+1]`` -> ``[B]``.

    Targets equal to ``pad_id`` (the padded tail of an epoch's last sequence) are left out.
    """
    logits = model(tokens[:, :-1])
    targets = tokens[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    loss = loss.view(tokens.shape[0], -1)
    if pad_id is None:
        return loss.mean(dim=1)
    keep = (targets != pad_id).to(loss.dtype)
    return (loss * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)


def per_domain_mean(values: torch.Tensor, domains: torch.Tensor, num_domains: int) -> torch.Tensor:
    """Mean of ``values [B]`` per domain id ``domains [B]``; NaN for domains absent from the batch."""
    sums = torch.zeros(num_domains, dtype=values.dtype, device=values.device).index_add_(0, domains, values)
    counts = torch.bincount(domains, minlength=num_domains).to(values.dtype)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))

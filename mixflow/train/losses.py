"""Losses for mixed batches: the dense soft-target form and the pair form ``(y_a, y_b, lam[B])``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross entropy against dense soft targets ``[B, C]`` (timm ``SoftTargetCrossEntropy``)."""
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


def _pair_ce(logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor,
             label_smoothing: float) -> torch.Tensor:
    lam = lam.to(logits.device, logits.dtype).reshape(-1)
    ce_a = F.cross_entropy(logits, y_a.to(logits.device), reduction="none", label_smoothing=label_smoothing)
    ce_b = F.cross_entropy(logits, y_b.to(logits.device), reduction="none", label_smoothing=label_smoothing)
    return lam * ce_a + (1 - lam) * ce_b


def pair_cross_entropy(logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor,
                       label_smoothing: float = 0.0) -> torch.Tensor:
    """``mean(lam*CE(y_a) + (1-lam)*CE(y_b))`` with smoothing ``s`` applied to each one-hot.

    Equal to :func:`soft_target_cross_entropy` on ``MixedBatch.targets`` (cross entropy is
    linear in the target), without building the ``[B, C]`` targets.
    """
    return _pair_ce(logits, y_a, y_b, lam, label_smoothing).mean()


def decoupled_log_prob(logits: torch.Tensor, cls: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """``log(exp(z_cls) / sum_{c != excluded} exp(z_c))`` per row: the softmax of ``cls`` with
    the other mixed class removed from the normaliser."""
    masked = logits.scatter(1, excluded.view(-1, 1), float("-inf"))
    return logits.gather(1, cls.view(-1, 1)).squeeze(1) - torch.logsumexp(masked, dim=1)


def decoupled_mixup_loss(logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor, *,
                         eta: float = 0.1, label_smoothing: float = 0.0) -> torch.Tensor:
    """Decoupled Mixup (DM): Z. Liu, S. Li, Wang, Tan, Wu and S. Z. Li, "Harnessing Hard Mixed
    Samples with Decoupled Regularizer", NeurIPS 2023 (arXiv 2203.10761, 2022, first titled
    "Decoupled Mixup for Data-efficient Learning"). Not to be confused with H. Liu et al.,
    "Decoupled Mixup for Generalized Visual Recognition" (2022), which mixes image regions.

    Mixup cross entropy plus a decoupled regulariser that asks the mixed sample to predict
    *each* of its two classes confidently once the other one is taken out of the softmax::

        L = mean_i [ lam*CE(z, a) + (1-lam)*CE(z, b)
                     - eta * ( log softmax_{C \\ {b}}(z)_a + log softmax_{C \\ {a}}(z)_b ) ]

    ``eta`` = 0.1 is what the authors' OpenMixup configs use on ImageNet (``eta_weight``
    mode "both"). The regulariser applies only to truly mixed samples (``y_a != y_b`` and
    ``0 < lam < 1``); others get the plain cross entropy, as in the reference code.
    """
    logits_dev = logits.device
    y_a, y_b = y_a.to(logits_dev), y_b.to(logits_dev)
    lam_d = lam.to(logits_dev, logits.dtype).reshape(-1)
    ce = _pair_ce(logits, y_a, y_b, lam_d, label_smoothing)
    reg = -(decoupled_log_prob(logits, y_a, y_b) + decoupled_log_prob(logits, y_b, y_a))
    mixed = (y_a != y_b) & (lam_d > 0) & (lam_d < 1)
    return (ce + eta * torch.where(mixed, reg, torch.zeros_like(reg))).mean()


def rankmixup_loss(mixed_logits: torch.Tensor, clean_logits: torch.Tensor, y_a: torch.Tensor | None = None,
                   y_b: torch.Tensor | None = None, lam: torch.Tensor | None = None, *, margin: float = 0.1,
                   weight: float = 0.1, mask_same_class: bool = True) -> torch.Tensor:
    """RankMixup's mixup ranking term (MRL): Noh, Park, Lee, Kim and Ham, "RankMixup: Ranking-Based
    Mixup Training for Network Calibration", ICCV 2023.

    ``weight * mean_i(keep_i * relu(max(mixed_logits[i]) - max(clean_logits[i]) + margin))``: a
    mixed sample should be less confident than the clean sample it was made from (row ``i`` of
    both). Add it to the classification loss of the clean batch.

    As in the authors' code (``RankMixup_MRL``: rows whose mixed target has an entry of 1 are
    masked), ``keep_i`` is 0 for rows that are not really mixed: a sample mixed with its own
    class (``y_a == y_b``) or, when ``lam`` is given, one with lam 0 or 1; the mean still runs
    over every row. This needs the pair labels ``y_a``, ``y_b`` (``MixedBatch.y_a`` / ``.y_b``);
    ``mask_same_class=False`` ranks every row (mixflow before this masking), labels not needed.
    """
    if mixed_logits.shape[0] != clean_logits.shape[0]:
        raise ValueError(f"mixed_logits has {mixed_logits.shape[0]} rows but clean_logits has {clean_logits.shape[0]}")
    gap = F.relu(mixed_logits.max(dim=-1).values - clean_logits.max(dim=-1).values + margin)
    if mask_same_class:
        if y_a is None or y_b is None:
            raise ValueError("rankmixup_loss masks samples mixed with their own class: pass y_a and y_b "
                             "(or mask_same_class=False to rank every row)")
        n = gap.shape[0]
        if len(y_a) != n or len(y_b) != n or (lam is not None and lam.numel() != n):
            raise ValueError(f"y_a, y_b (and lam) must have one entry per row ({n})")
        same = y_a.to(gap.device) == y_b.to(gap.device)
        if lam is not None:
            lam_d = lam.to(gap.device).reshape(-1)
            same = same | (lam_d == 0) | (lam_d == 1)
        gap = torch.where(same, torch.zeros_like(gap), gap)
    return weight * gap.mean()

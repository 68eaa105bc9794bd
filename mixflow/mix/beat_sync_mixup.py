"""Beat-synchronous audio mixup: Chen, Wu, Liu, Nezhurina, Berg-Kirkpatrick and Dubnov,
"MusicLDM: Enhancing Novelty in Text-to-Music Generation Using Beat-Synchronous Mixup
Strategies", arXiv 2308.01546, 2023 (ICASSP 2024).

MusicLDM pairs clips of similar tempo, aligns the partner's beat grid with the
sample's, then mixes ``x = lam*x + (1-lam)*x_partner`` with ``lam ~ Beta(5, 5)``. The
same function mixes waveforms ``[B, T]`` / ``[B, C, T]`` (beat-synchronous audio mixup)
or latent sequences ``[B, C, T]`` (beat-synchronous latent mixup) — ``sample_rate`` is
then the number of latent frames per second.

Beat metadata, per batch (passed at call time; a beat tracker computes it offline):

* ``beats [B, K]`` beat times in seconds, padded, with ``beat_counts [B]`` valid
  entries per row; the first beat is ``beats[:, 0]`` and the beat period is the mean
  inter-beat interval ``(last - first) / (count - 1)``; or
* ``tempo [B]`` in beats per minute (period ``60 / tempo``) with optional
  ``first_beat [B]`` in seconds (default 0).

Alignment (first beat modulo the partner's period): partner ``j`` of sample ``i`` is
delayed by ``d = t_i - t_j`` reduced modulo ``P_j`` to ``[-P_j/2, P_j/2]`` (the nearest
alignment), rounded to whole samples, so the partner's beat grid ``t_j + d + k*P_j`` passes through the
sample's first beat (and, at equal tempo, through all its beats). Samples shifted past
the clip's edge are dropped and the vacated part is silent (zeros), like cropping a
longer recording. A partner with one known beat and no period is shifted by the
plain difference ``t_i - t_j``; one with no beat at all is not shifted.

``pairing="tempo"`` (the default) pairs each clip with its neighbour in tempo order (a
matching of sorted periods, ties broken at random), the in-batch counterpart of the
paper's tempo groups; the other pairings are those of :mod:`mixflow.mix.pairing`.
"""

from __future__ import annotations

import numpy as np
import torch

from mixflow.mix.checks import check_mix_call
from mixflow.mix.cpu_kernels import blend_weights
from mixflow.mix.lam import apply_prob, beta_lam
from mixflow.mix.mixed_batch import MixedBatch
from mixflow.mix.pairing import PAIRINGS, partner_index

BEAT_PAIRINGS = (*PAIRINGS, "tempo")


def beat_grid(n: int, beats=None, beat_counts=None, tempo=None, first_beat=None,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(first, period, known)`` float64/bool ``[B]``: first beat (s), beat period (s, inf if unknown),
    whether any beat is known."""
    if beats is not None:
        beats = torch.as_tensor(beats, dtype=torch.float64, device=device).reshape(n, -1)
        counts = torch.as_tensor(beat_counts if beat_counts is not None else [beats.shape[1]] * n,
                                 dtype=torch.int64, device=device).reshape(n)
        if bool(((counts < 0) | (counts > beats.shape[1])).any()):
            raise ValueError(f"beat_counts must lie in 0..{beats.shape[1]} (the padded width of beats), "
                             f"got {counts.tolist()}")
        known = counts > 0
        first = torch.where(known, beats[:, 0], torch.zeros_like(beats[:, 0]))
        last = beats.gather(1, (counts - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        period = torch.where(counts >= 2, (last - first) / (counts - 1).clamp(min=1), torch.full_like(first, np.inf))
        return first, period, known
    if tempo is not None:
        tempo = torch.as_tensor(tempo, dtype=torch.float64, device=device).reshape(n)
        if bool((tempo <= 0).any()):
            raise ValueError(f"tempo must be > 0 beats per minute, got {tempo.tolist()}")
        first = (torch.zeros(n, dtype=torch.float64, device=device) if first_beat is None
                 else torch.as_tensor(first_beat, dtype=torch.float64, device=device).reshape(n))
        return first, 60.0 / tempo, torch.ones(n, dtype=torch.bool, device=device)
    raise ValueError("beat_sync_mixup needs beat metadata: pass beats (with beat_counts) or tempo")


def alignment_shift(first: torch.Tensor, period: torch.Tensor, known: torch.Tensor,
                    perm: torch.Tensor) -> torch.Tensor:
    """Seconds to delay partner ``perm[i]`` so its beat grid meets sample ``i``'s first beat."""
    p_first, p_period, p_known = first[perm], period[perm], known[perm]
    d = first - p_first
    finite = torch.isfinite(p_period)
    period = p_period.where(finite, torch.ones_like(d))
    d = torch.where(finite, d - period * torch.round(d / period), d)
    return torch.where(known & p_known, d, torch.zeros_like(d))


def shift_time(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``out[i, ..., t] = x[i, ..., t - shift[i]]`` (integer samples), zeros outside the clip."""
    t = x.shape[-1]
    src = torch.arange(t, device=x.device).unsqueeze(0) - shift.to(x.device).unsqueeze(1)  # [B, T]
    valid = (src >= 0) & (src < t)
    view = (len(x),) + (1,) * (x.dim() - 2) + (t,)
    index = src.clamp(0, t - 1).view(view).expand_as(x)
    out = torch.gather(x, -1, index)
    return out.masked_fill_(~valid.view(view).expand_as(x), 0)


def tempo_matching(period: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pair neighbours in tempo order: an involution (odd batch: the three slowest form a 3-cycle)."""
    n = len(period)
    if n < 2:
        return np.arange(n)
    order = np.lexsort((rng.random(n), period))
    perm = np.empty(n, dtype=np.int64)
    even = n - (n % 2)
    a, b = order[0:even:2], order[1:even:2]
    perm[a], perm[b] = b, a
    if n % 2:
        x, y, z = order[-3], order[-2], order[-1]
        perm[x], perm[y], perm[z] = y, z, x
    return perm


def beat_sync_mixup(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, *, num_classes: int,
                    beats=None, beat_counts=None, tempo=None, first_beat=None, sample_rate: float = 16000.0,
                    alpha: float = 5.0, mode: str = "batch", pairing: str = "tempo", prob: float = 1.0,
                    label_smoothing: float = 0.0) -> MixedBatch:
    """Align each partner's beats with the sample's, then MixUp (float ``[B, T]`` or ``[B, C, T]``)."""
    if x.dim() not in (2, 3) or not x.is_floating_point():
        raise ValueError(f"expected float audio [B, T] or [B, C, T], got {x.dtype} of shape {tuple(x.shape)}")
    check_mix_call(x, y, num_classes, prob=prob, label_smoothing=label_smoothing, alpha=alpha)
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be > 0, got {sample_rate}")
    if pairing not in BEAT_PAIRINGS:
        raise ValueError(f"unknown pairing {pairing!r}; choose one of {', '.join(BEAT_PAIRINGS)}")
    n = len(x)
    first, period, known = beat_grid(n, beats, beat_counts, tempo, first_beat, x.device)
    if pairing == "tempo":
        perm = tempo_matching(period.cpu().numpy(), rng)
    else:
        perm = partner_index(n, pairing, rng, mode)
    lam = apply_prob(beta_lam(alpha, mode, perm, rng), prob, mode, perm, rng)
    perm_t = torch.as_tensor(perm, device=x.device)
    shift = torch.round(alignment_shift(first, period, known, perm_t) * sample_rate).to(torch.int64)
    partner = shift_time(x.index_select(0, perm_t), shift)
    shape = (-1, *([1] * (x.dim() - 1)))
    w, v = (torch.as_tensor(a, device=x.device).view(shape).to(x.dtype) for a in blend_weights(lam))
    out = torch.mul(x, w).add_(partner.mul_(v))
    return MixedBatch(out, y, y[perm_t.to(y.device)], torch.as_tensor(lam, dtype=torch.float32),
                      perm_t, num_classes, label_smoothing, "beat_sync_mixup")

"""Merging the trainer ranks' reports of one step into the one report a policy observes.

Each rank reports its own shard of the global batch. A report is complete once every
rank has sent the report with the same ``(kind, version, step)``; then

- ``train_loss``: token-weighted mean over ranks per domain (NaN where no rank had the
  domain; unweighted mean when no token counts were given);
- ``tokens`` / ``counts``: summed (the realised composition of the global batch);
- ``eval_loss`` / ``grad_dot_val`` / ``ref_loss``: mean over the ranks that sent them
  (per domain, over the ranks that had a value: NaN means "no data here").

Pure and serialisable (``state_dict``), so the controller's half-merged reports survive
its restart.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mixflow.mixture.policy import Feedback

_ARRAYS = ("train_loss", "tokens", "counts", "eval_loss", "grad_dot_val", "ref_loss")


def _weighted_loss(reports: list[Feedback]) -> np.ndarray | None:
    losses = [r.train_loss for r in reports if r.train_loss is not None]
    if not losses:
        return None
    loss = np.stack([np.asarray(v, dtype=np.float64) for v in losses])
    if all(r.tokens is not None for r in reports if r.train_loss is not None):
        w = np.stack([np.asarray(r.tokens, dtype=np.float64) for r in reports if r.train_loss is not None])
    else:
        w = np.ones_like(loss)
    w = np.where(np.isnan(loss), 0.0, w)
    total = w.sum(axis=0)
    with np.errstate(invalid="ignore"):
        out = np.nansum(np.where(w > 0, loss * w, 0.0), axis=0) / total
    return np.where(total > 0, out, np.nan)


def _mean(reports: list[Feedback], name: str) -> np.ndarray | None:
    values = [getattr(r, name) for r in reports if getattr(r, name) is not None]
    if not values:
        return None
    stacked = np.stack([np.asarray(v, dtype=np.float64) for v in values])
    seen = ~np.isnan(stacked)
    total = np.where(seen, stacked, 0.0).sum(axis=0)
    n = seen.sum(axis=0)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def _sum(reports: list[Feedback], name: str) -> np.ndarray | None:
    values = [getattr(r, name) for r in reports if getattr(r, name) is not None]
    if not values:
        return None
    return np.sum(np.stack([np.asarray(v, dtype=np.float64) for v in values]), axis=0)


def merge_reports(reports: list[Feedback]) -> Feedback:
    """One report from the ranks' reports of the same ``(version, step)``."""
    first = reports[0]
    if any(r.version != first.version or r.step != first.step for r in reports):
        raise ValueError("merge_reports needs reports of one (version, step)")
    return Feedback(version=first.version, step=first.step, train_loss=_weighted_loss(reports),
                    tokens=_sum(reports, "tokens"), counts=_sum(reports, "counts"),
                    eval_loss=_mean(reports, "eval_loss"), grad_dot_val=_mean(reports, "grad_dot_val"),
                    ref_loss=_mean(reports, "ref_loss"),
                    extra={k: v for r in reports for k, v in r.extra.items()})


class FeedbackMerger:
    """Collects per-rank reports; returns the merged report when the last rank's arrives.

    A report sent again (a retried call after an actor restart) is ignored and counted
    in ``duplicates``, also after its step was merged (the last ``remember`` merged
    steps are kept), so retries never feed a policy twice.
    """

    def __init__(self, world_size: int, remember: int = 4096):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.remember = remember
        self.duplicates = 0
        self._open: dict[tuple[str, int, int], dict[int, Feedback]] = {}
        self._done: dict[tuple[str, int, int], None] = {}  # insertion-ordered set

    def add(self, rank: int, kind: str, feedback: Feedback) -> Feedback | None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        key = (kind, feedback.version, feedback.step)
        got = self._open.setdefault(key, {})
        if key in self._done or rank in got:
            self.duplicates += 1
            if not got:
                del self._open[key]
            return None
        got[rank] = feedback
        if len(got) < self.world_size:
            return None
        del self._open[key]
        self._done[key] = None
        if len(self._done) > self.remember:
            del self._done[next(iter(self._done))]
        return merge_reports([got[r] for r in sorted(got)])

    @property
    def pending(self) -> int:
        return len(self._open)

    def state_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "duplicates": self.duplicates,
                "done": [list(k) for k in self._done],
                "open": [[list(key), {str(r): _fb_state(fb) for r, fb in got.items()}]
                         for key, got in self._open.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.world_size = state["world_size"]
        self.duplicates = state["duplicates"]
        self._done = {tuple(k): None for k in state["done"]}
        self._open = {tuple(key): {int(r): _fb_load(fb) for r, fb in got.items()} for key, got in state["open"]}


def _fb_state(fb: Feedback) -> dict[str, Any]:
    out: dict[str, Any] = {"version": fb.version, "step": fb.step, "extra": dict(fb.extra)}
    for name in _ARRAYS:
        value = getattr(fb, name)
        out[name] = None if value is None else np.asarray(value, dtype=np.float64).tolist()
    return out


def _fb_load(state: dict[str, Any]) -> Feedback:
    arrays = {n: None if state[n] is None else np.asarray(state[n], dtype=np.float64) for n in _ARRAYS}
    return Feedback(version=state["version"], step=state["step"], extra=state["extra"], **arrays)

"""Exact domain schedule: proportions ``p`` -> a per-sample domain sequence.

Sampling domains i.i.d. from ``p`` lets the realised mixture of a short window drift
far from ``p`` (a 32-sample Aioli sweep can be off by several samples). The schedule
instead places every sample deterministically so each prefix of a version's
sequence has counts ``c_d(n)`` close to ``p_d * n``. Counts restart at every mixture
version, and the counts realised under each version are kept so they can be fed back
to the policy (Aioli solves its mixing law against the *realised* mixtures).

Two rules:

* ``"greedy"`` (default): the greedy max-error rule of Megatron-LM's blended datasets
  (Shoeybi et al., "Megatron-LM: Training Multi-Billion Parameter Language Models Using
  Model Parallelism", 2019; ``build_blending_indices`` in ``helpers.cpp``): sample
  ``n+1`` goes to ``argmax_d (p_d * (n+1) - c_d(n))``. Megatron's helper writes
  ``p_d * max(n, 1)``; ``n+1`` is the deficit after placing the sample, which is what the
  rule means, so sequences can differ from Megatron's by a few swaps. Over-counts stay
  ``< 1`` always (the chosen deficit is ``> 0``), but under-counts can exceed one sample
  for ``m >= 5`` domains (seen: ``c_d - p_d n = -1.11`` for m = 6..10).
* ``"tijdeman"``: R. Tijdeman, "The chairman assignment problem", Discrete Mathematics
  32 (1980). With ``k`` domains of positive weight and ``s = 1/(2k-2)``, only domains
  whose deficit ``p_d (n+1) - c_d >= s`` are eligible, and among them the one with the
  earliest deadline ``(c_d + 1 - s) / p_d`` wins. This guarantees
  ``|c_d(n) - p_d n| <= 1 - 1/(2k-2) < 1`` for every prefix and domain. Both quantities
  are fixed until the domain is chosen, so it runs as earliest-deadline-first with
  release times on two heaps.

Ties (equal deficits / deadlines, e.g. uniform ``p``) are broken by a priority
permutation drawn from the schedule's ``np.random.Generator`` at every new version, so
the same seed gives the same sequence and different seeds rotate the domain order.
A plain Python loop over samples runs ~1e5 samples in ~0.1-0.2 s for m <= 10.
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np

from .policy import check_distribution

SCHEDULE_RULES = ("greedy", "tijdeman")


def _greedy(p: list[float], counts: list[int], start: int, k: int, order: list[int]) -> list[int]:
    """``k`` domains by max deficit; ``order`` lists domains by tie priority (first wins)."""
    out = [0] * k
    live = [d for d in order if p[d] > 0]
    for i in range(k):
        t = start + i + 1
        best = live[0]
        best_err = p[best] * t - counts[best]
        for d in live[1:]:
            err = p[d] * t - counts[d]
            if err > best_err:
                best, best_err = d, err
        counts[best] += 1
        out[i] = best
    return out


def _tijdeman(p: list[float], counts: list[int], start: int, k: int, rank: list[int]) -> list[int]:
    """``k`` domains by Tijdeman's rule; ``rank[d]`` is d's tie priority (lower wins)."""
    live = [d for d in range(len(p)) if p[d] > 0]
    if len(live) == 1:
        counts[live[0]] += k
        return [live[0]] * k
    s = 1.0 / (2 * len(live) - 2)
    pending: list[tuple[float, int, int]] = []  # (release time, rank, domain)
    ready: list[tuple[float, int, int]] = []    # (deadline, rank, domain)
    for d in live:
        heapq.heappush(pending, ((counts[d] + s) / p[d], rank[d], d))
    out = [0] * k
    for i in range(k):
        t = start + i + 1
        limit = t * (1.0 + 1e-12) + 1e-9  # release == t exactly, up to rounding
        while pending and pending[0][0] <= limit:
            _, r, d = heapq.heappop(pending)
            heapq.heappush(ready, ((counts[d] + 1.0 - s) / p[d], r, d))
        _, r, d = heapq.heappop(ready)
        counts[d] += 1
        heapq.heappush(pending, ((counts[d] + s) / p[d], r, d))
        out[i] = d
    return out


class ExactSchedule:
    """Turns the current mixture into domain ids, sample by sample, with exact prefixes.

    ``set_mixture(p, version)`` switches to a new version (counts restart); ``take(k)``
    returns the next ``k`` domain ids; ``realised_counts(version)`` gives the samples
    placed per domain under that version.
    """

    def __init__(self, num_domains: int, rng: np.random.Generator, rule: str = "greedy"):
        if num_domains < 1:
            raise ValueError(f"num_domains must be >= 1, got {num_domains}")
        if rule not in SCHEDULE_RULES:
            raise ValueError(f"unknown schedule rule {rule!r}; choose one of {', '.join(SCHEDULE_RULES)}")
        self.m = num_domains
        self.rule = rule
        self.rng = rng
        self.version: int | None = None
        self.p = np.full(num_domains, 1.0 / num_domains)
        self.n = 0
        self._rank = list(range(num_domains))
        self._counts: dict[int, list[int]] = {}

    def set_mixture(self, p: np.ndarray, version: int) -> None:
        """Use ``p`` from now on. A new version restarts the prefix counts; the current
        version again with the same ``p`` is a no-op; an older version is an error."""
        p = check_distribution(p, self.m, where="schedule p")
        if self.version is not None:
            if version == self.version:
                if not np.allclose(p, self.p, rtol=0, atol=1e-12):
                    raise ValueError(f"version {version} was already scheduled with p={self.p.tolist()}, "
                                     f"got a different p={p.tolist()}")
                return
            if version < self.version:
                raise ValueError(f"mixture version went backwards: {version} after {self.version}")
        self.version = int(version)
        self.p = p
        self.n = 0
        self._rank = [int(r) for r in np.argsort(self.rng.permutation(self.m))]
        self._counts[self.version] = [0] * self.m

    def take(self, k: int) -> np.ndarray:
        """The domain ids of the next ``k`` samples (int64) under the current version."""
        if self.version is None:
            raise ValueError("no mixture set: call set_mixture(p, version) before take()")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        counts = self._counts[self.version]
        p = self.p.tolist()
        if self.rule == "greedy":
            order = sorted(range(self.m), key=self._rank.__getitem__)
            out = _greedy(p, counts, self.n, k, order)
        else:
            out = _tijdeman(p, counts, self.n, k, self._rank)
        self.n += k
        return np.asarray(out, dtype=np.int64)

    def realised_counts(self, version: int) -> np.ndarray:
        """Samples placed per domain under ``version`` (int64, length m)."""
        if version not in self._counts:
            raise ValueError(f"version {version} was never scheduled; known: {sorted(self._counts)}")
        return np.asarray(self._counts[version], dtype=np.int64)

    def state_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "m": self.m, "version": self.version, "p": self.p.tolist(),
                "n": self.n, "rank": list(self._rank),
                "counts": {str(v): list(c) for v, c in self._counts.items()},
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("m") != self.m or state.get("rule") != self.rule:
            raise ValueError(f"state is for a {state.get('rule')!r} schedule with m={state.get('m')}, "
                             f"not {self.rule!r} with m={self.m}")
        self.version = None if state["version"] is None else int(state["version"])
        self.p = np.asarray(state["p"], dtype=np.float64)
        self.n = int(state["n"])
        self._rank = [int(r) for r in state["rank"]]
        self._counts = {int(v): [int(x) for x in c] for v, c in state["counts"].items()}
        self.rng.bit_generator.state = state["rng"]

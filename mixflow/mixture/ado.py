"""ADO: Adaptive Data Optimization with per-domain scaling laws.

Jiang, Zhou, Feng, Malladi, Kolter, "Adaptive Data Optimization: Dynamic Sample
Selection with Scaling Laws", ICLR 2025.

Each domain d gets a power law fitted online to its training loss against the tokens
it has contributed so far, ``L_d(n) = e_d + b_d * n^(-a_d)``. Its predicted learning
speed is ``-dL_d/dn = a_d * b_d * n^(-a_d - 1)`` at the domain's current ``n_d``. Then

    rho_d   ∝  mu_d * h_d^s * (-dL_d/dn)          (preference)
    pi      =  g * rho + (1 - g) * pibar          floored at d_min
    pibar  <-  running mean of rho (weight 1/(k+1) at the k-th update, starting at mu)
    h      <-  decay * h + (1 - decay) * realised share of the report  (starting at mu)

with prior ``mu`` (default: the initial mixture), ``g = 0.1``, ``s = 0.5``,
``d_min = 0.01`` and ``decay = 0.9`` as in the paper and its code. ``h`` is the credit
assignment term: a domain's recent share of the data, so a domain whose loss falls
while it is rarely sampled (transfer) is not over-credited. The realised share comes
from ``feedback.counts`` (samples), or ``feedback.tokens`` when counts are absent.

The fit (:func:`fit_power_law`) needs no scipy: for a fixed exponent the law is linear
in ``(e, b)``, solved in closed form by weighted least squares with weights ``1/L^2``
(relative errors, the first-order form of the paper's log-space fit) and bounds
``0 <= e <= min(L)``, ``b >= 0``; the exponent is searched on a grid over
``exponent_bounds`` (default ``[0.001, 0.8]``, the paper's bound) and refined by golden
section. The paper additionally bounds ``e`` and ``b`` in log space for language-model
losses; here the bounds are the ones that hold for any non-negative loss.

This follows ALGORITHMS.md; where the authors' code differs: it floors ``rho`` where
this floors ``pi``; its credit term is ``(h (1 - h))^s`` where this uses ``h^s``; its
default x-axis adds every report's tokens to every domain where this uses the domain's
own token count; it smooths losses (Savitzky-Golay) and skips early steps, which this
does not. Too many points per domain
(over ``max_points``) are merged pairwise (mean tokens, mean loss), keeping the whole
curve at half the resolution.

The policy publishes nothing until every domain with a positive prior has
``min_points`` loss points, then one mixture per report that trained tokens; laws are
refitted every ``refit_every`` reports. Reports tagged with an older mixture version
are *used*: tokens trained and losses seen are facts whatever mixture produced them.
NaN, inf or negative tokens/counts and inf or negative losses are rejected with a
:class:`FeedbackWarning`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mixflow.mixture.policy import (
    Feedback,
    MixturePolicy,
    apply_floor,
    check_distribution,
    clean_losses,
)

_GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class PowerLaw:
    """``L(n) = irreducible + scale * n^(-exponent)``."""

    irreducible: float
    scale: float
    exponent: float

    def __call__(self, n: np.ndarray | float) -> np.ndarray | float:
        return self.irreducible + self.scale * np.power(n, -self.exponent)

    def decrease_rate(self, n: np.ndarray | float) -> np.ndarray | float:
        """``-dL/dn = exponent * scale * n^(-exponent - 1)`` (>= 0)."""
        return self.exponent * self.scale * np.power(n, -self.exponent - 1.0)


def _fit_linear(x: np.ndarray, loss: np.ndarray, w: np.ndarray, e_max: float) -> tuple[float, float, float]:
    """Weighted least squares ``loss ≈ e + b x`` with ``0 <= e <= e_max``, ``b >= 0``.

    Returns ``(sse, e, b)``. The problem is a convex QP in two variables: the optimum is
    the unconstrained solution if feasible, else lies on an edge of the box.
    """
    sw, swx, swxx = w.sum(), (w * x).sum(), (w * x * x).sum()
    swl, swxl = (w * loss).sum(), (w * x * loss).sum()
    candidates = []
    det = sw * swxx - swx * swx
    if det > 1e-12 * sw * swxx:
        e = (swxx * swl - swx * swxl) / det
        b = (sw * swxl - swx * swl) / det
        if 0.0 <= e <= e_max and b >= 0.0:
            candidates.append((e, b))
    for e in (0.0, e_max):
        candidates.append((e, max((swxl - e * swx) / swxx, 0.0)))
    candidates.append((min(max(swl / sw, 0.0), e_max), 0.0))
    best = min(((float((w * (loss - e - b * x) ** 2).sum()), e, b) for e, b in candidates))
    return float(best[0]), float(best[1]), float(best[2])


def fit_power_law(tokens: np.ndarray, losses: np.ndarray,
                  exponent_bounds: tuple[float, float] = (1e-3, 0.8),
                  grid: int = 64, refine_iters: int = 60) -> PowerLaw:
    """Fit ``L(n) = e + b n^(-a)`` to points ``(tokens, losses)`` (see the module docs)."""
    n = np.asarray(tokens, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    if n.shape != loss.shape or n.ndim != 1:
        raise ValueError(f"tokens and losses must be 1-D of one length, got {n.shape} and {loss.shape}")
    if not (np.all(np.isfinite(n)) and np.all(n > 0) and np.all(np.isfinite(loss)) and np.all(loss >= 0)):
        raise ValueError("tokens must be finite and > 0, losses finite and >= 0")
    if len(np.unique(n)) < 3:
        raise ValueError(f"a power law needs points at >= 3 distinct token counts, got {len(np.unique(n))}")
    lo, hi = float(exponent_bounds[0]), float(exponent_bounds[1])
    if not 0 < lo < hi:
        raise ValueError(f"exponent_bounds must satisfy 0 < low < high, got {exponent_bounds}")
    n_ref = n.max()
    log_x = np.log(n / n_ref)
    w = 1.0 / np.maximum(loss, 1e-12) ** 2
    e_max = float(loss.min())

    def profile(a: float) -> tuple[float, float, float]:
        return _fit_linear(np.exp(-a * log_x), loss, w, e_max)

    exps = np.linspace(lo, hi, grid)
    sse = [profile(a)[0] for a in exps]
    k = int(np.argmin(sse))
    left, right = exps[max(k - 1, 0)], exps[min(k + 1, grid - 1)]
    c, d = right - _GOLDEN * (right - left), left + _GOLDEN * (right - left)
    fc, fd = profile(c)[0], profile(d)[0]
    for _ in range(refine_iters):
        if fc < fd:
            right, d, fd = d, c, fc
            c = right - _GOLDEN * (right - left)
            fc = profile(c)[0]
        else:
            left, c, fc = c, d, fd
            d = left + _GOLDEN * (right - left)
            fd = profile(d)[0]
    best = min((profile(a) + (a,) for a in (exps[k], c, d)), key=lambda r: r[0])
    _, e, b_ref, a = best
    return PowerLaw(float(e), float(b_ref * n_ref ** a), float(a))


class ADOPolicy(MixturePolicy):
    """ADO: mixture from per-domain power-law learning speeds, prior and credit."""

    name = "ado"

    def __init__(self, num_domains: int, prior: np.ndarray | None = None, gamma: float = 0.1,
                 s: float = 0.5, d_min: float = 0.01, history_decay: float = 0.9, min_points: int = 8,
                 refit_every: int = 10, max_points: int = 1000,
                 exponent_bounds: tuple[float, float] = (1e-3, 0.8),
                 initial: np.ndarray | None = None, floor: float = 0.0):
        super().__init__(num_domains, initial, floor)
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        if not (np.isfinite(s) and s >= 0):
            raise ValueError(f"s must be a finite number >= 0, got {s}")
        if not 0.0 <= d_min * num_domains <= 1.0:
            raise ValueError(f"d_min must be in [0, 1/num_domains] = [0, {1 / num_domains}], got {d_min}")
        if not 0.0 <= history_decay < 1.0:
            raise ValueError(f"history_decay must be in [0, 1), got {history_decay}")
        if int(min_points) != min_points or min_points < 3:
            raise ValueError(f"min_points must be an integer >= 3, got {min_points}")
        if int(refit_every) != refit_every or refit_every < 1:
            raise ValueError(f"refit_every must be an integer >= 1, got {refit_every}")
        if int(max_points) != max_points or max_points < 2 * min_points:
            raise ValueError(f"max_points must be an integer >= 2 * min_points = {2 * min_points}, "
                             f"got {max_points}")
        if not 0 < exponent_bounds[0] < exponent_bounds[1]:
            raise ValueError(f"exponent_bounds must satisfy 0 < low < high, got {exponent_bounds}")
        self.prior = self.p0.copy() if prior is None else check_distribution(prior, num_domains, where="prior")
        self.gamma, self.s, self.d_min = float(gamma), float(s), float(d_min)
        self.history_decay = float(history_decay)
        self.min_points, self.refit_every, self.max_points = int(min_points), int(refit_every), int(max_points)
        self.exponent_bounds = (float(exponent_bounds[0]), float(exponent_bounds[1]))
        self.tokens_seen = np.zeros(num_domains)
        self.points: list[list[list[float]]] = [[[], []] for _ in range(num_domains)]
        self.laws: list[PowerLaw | None] = [None] * num_domains
        self.history = self.prior.copy()
        self.pibar = self.prior.copy()
        self.updates = 0
        self.since_fit = 0

    def preference(self) -> np.ndarray | None:
        """``rho`` (normalised) from the current laws, or None before every domain with a
        positive prior has one (a zero-prior domain has ``rho_d = 0`` and needs none)."""
        if any(law is None and mu > 0 for law, mu in zip(self.laws, self.prior)):
            return None
        n = np.maximum(self.tokens_seen, 1.0)
        speed = np.array([0.0 if law is None else law.decrease_rate(n[d]) for d, law in enumerate(self.laws)])
        rho = self.prior * self.history ** self.s * speed
        if not (np.all(np.isfinite(rho)) and rho.sum() > 0):
            return self.prior.copy()
        return rho / rho.sum()

    def _add_points(self, loss: np.ndarray) -> None:
        for d in np.flatnonzero(~np.isnan(loss) & (self.tokens_seen > 0)):
            xs, ys = self.points[d]
            xs.append(float(self.tokens_seen[d]))
            ys.append(float(loss[d]))
            if len(xs) > self.max_points:
                self.points[d] = [_merge_pairs(xs), _merge_pairs(ys)]

    def _refit(self) -> None:
        for d, (xs, ys) in enumerate(self.points):
            if len(xs) >= self.min_points and len(set(xs)) >= 3:
                self.laws[d] = fit_power_law(np.array(xs), np.array(ys), self.exponent_bounds)
        self.since_fit = 0

    def _update(self, feedback: Feedback) -> np.ndarray | None:
        if feedback.train_loss is None or feedback.tokens is None:
            return None
        loss = clean_losses(feedback.train_loss, "train_loss")
        tokens = clean_losses(feedback.tokens, "tokens", allow_nan=False)
        counts = None if feedback.counts is None else clean_losses(feedback.counts, "counts", allow_nan=False)
        if loss is None or tokens is None or (feedback.counts is not None and counts is None):
            return None
        for name, values in (("train_loss", loss), ("tokens", tokens), ("counts", counts)):
            if values is not None and values.shape != (self.m,):
                raise ValueError(f"feedback.{name} must have shape ({self.m},), got {values.shape}")
        if tokens.sum() <= 0:
            return None
        self.tokens_seen += tokens
        self._add_points(loss)
        realised = counts if counts is not None and counts.sum() > 0 else tokens
        self.history = self.history_decay * self.history + (1 - self.history_decay) * realised / realised.sum()
        self.since_fit += 1
        missing = any(law is None and len(xs) >= self.min_points
                      for law, (xs, _) in zip(self.laws, self.points))
        if missing or self.since_fit >= self.refit_every:
            self._refit()
        rho = self.preference()
        if rho is None:
            return None
        self.updates += 1
        pi = self.gamma * rho + (1 - self.gamma) * self.pibar
        self.pibar = self.pibar + (rho - self.pibar) / (self.updates + 1)
        return apply_floor(pi, self.d_min)

    def _extra_state(self) -> dict[str, Any]:
        return {"prior": self.prior.tolist(), "tokens_seen": self.tokens_seen.tolist(),
                "points": [[list(xs), list(ys)] for xs, ys in self.points],
                "laws": [None if law is None else [law.irreducible, law.scale, law.exponent]
                         for law in self.laws],
                "history": self.history.tolist(), "pibar": self.pibar.tolist(),
                "updates": self.updates, "since_fit": self.since_fit}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.prior = np.asarray(state["prior"], dtype=np.float64)
        self.tokens_seen = np.asarray(state["tokens_seen"], dtype=np.float64)
        self.points = [[[float(v) for v in xs], [float(v) for v in ys]] for xs, ys in state["points"]]
        self.laws = [None if law is None else PowerLaw(*map(float, law)) for law in state["laws"]]
        self.history = np.asarray(state["history"], dtype=np.float64)
        self.pibar = np.asarray(state["pibar"], dtype=np.float64)
        self.updates = int(state["updates"])
        self.since_fit = int(state["since_fit"])


def _merge_pairs(values: list[float]) -> list[float]:
    """Means of consecutive pairs (an odd last value is kept as is)."""
    v = np.asarray(values, dtype=np.float64)
    even = len(v) - len(v) % 2
    merged = ((v[0:even:2] + v[1:even:2]) / 2.0).tolist()
    return merged + v[even:].tolist()

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

The fit (:func:`fit_power_laws`: every domain in one numpy computation;
:func:`fit_power_law`: one domain) needs no scipy. For a fixed exponent the law is
linear in ``(e, b)``, solved in closed form by weighted least squares with weights
``1/L^2`` (relative errors, the first-order form of the paper's log-space fit) and
bounds ``0 <= e <= min(L)``, ``b >= 0``. The exponent is searched on a grid of 64 over
``exponent_bounds`` (default ``[0.001, 0.8]``, the paper's bound). That search needs
only sums over a domain's points (``w``, ``w L``, ``w L^2`` and, per grid exponent
``a_g``, ``w x``, ``w L x``, ``w x^2`` with ``x = (n / n_first)^(-a_g)``), which the
policy keeps per domain and extends as points arrive, so a refit never revisits old
points for the grid. The best grid exponent is refined, for all domains at once, by
Newton's method on the profile ``SSE(a) = min_{e, b} SSE(a, e, b)`` with its exact
first and second derivatives, kept inside the neighbouring grid points by bisection
(the minimum the golden-section search used before converged to, to a tighter
tolerance); the policy starts it at the domain's previous exponent and refits only
domains with new points. The paper additionally bounds ``e`` and ``b`` in log space
for language-model losses; here the bounds are the ones that hold for any
non-negative loss.

This follows ALGORITHMS.md; where the authors' code differs: it floors ``rho`` where
this floors ``pi``; its credit term is ``(h (1 - h))^s`` where this uses ``h^s``; its
default x-axis adds every report's tokens to every domain where this uses the domain's
own token count; it smooths losses (Savitzky-Golay) and skips early steps, which this
does not. Too many points per domain (over ``max_points``) are merged pairwise (mean
tokens, mean loss), keeping the whole curve at half the resolution.

The policy publishes nothing until every domain with a positive prior has
``min_points`` loss points, then one mixture per report that trained tokens; laws are
refitted every ``refit_every`` reports. Reports tagged with an older mixture version
are *used*: tokens trained and losses seen are facts whatever mixture produced them.
NaN, inf or negative tokens/counts and inf or negative losses are rejected with a
:class:`FeedbackWarning`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from mixflow.mixture.policy import (
    Feedback,
    MixturePolicy,
    apply_floor,
    check_distribution,
    clean_losses,
)

GRID_POINTS = 64
"""Exponents on the search grid over ``exponent_bounds``."""

_MOMENTS = 3  # sw, swl, swll ahead of the grid moments in a sums row


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


def _point_terms(tokens: np.ndarray, losses: np.ndarray, first: np.ndarray | float,
                 exps: np.ndarray) -> np.ndarray:
    """What each point adds to its domain's sums: ``[w, w L, w L^2, w x_g, w L x_g, w x_g^2]``.

    ``w = 1/L^2`` and ``x_g = (n / first)^(-a_g)`` for every grid exponent ``a_g``; the
    last axis has ``3 + 3 * len(exps)`` entries. The sums are additive over points, so a
    domain's grid is kept up to date point by point.
    """
    w = 1.0 / np.maximum(losses, 1e-12) ** 2
    wl = w * losses
    x = np.exp(np.multiply.outer(np.log(tokens / first), -exps))
    wx = w[..., None] * x
    return np.concatenate([np.stack([w, wl, wl * losses], axis=-1), wx, wl[..., None] * x, wx * x], axis=-1)


def _solve_box(sw, swl, swll, swx, swxx, swxl, e_max):
    """Weighted least squares ``L ≈ e + b x`` with ``0 <= e <= e_max``, ``b >= 0``, elementwise.

    Takes the weighted sums and returns ``(e, b, sse, interior)``. The problem is a
    convex QP in two variables: the optimum is the unconstrained solution if feasible
    (``interior``), else the best of the minimisers on the edges ``e = 0``,
    ``e = e_max`` and ``b = 0`` (the first of them on a tie).
    """
    def sse_of(e, b):
        return swll - 2.0 * (e * swl + b * swxl) + e * e * sw + 2.0 * e * b * swx + b * b * swxx

    b = np.maximum(swxl / swxx, 0.0)
    e, sse = 0.0, swll - b * (2.0 * swxl - b * swxx)
    for edge_e, edge_b in ((e_max, np.maximum((swxl - e_max * swx) / swxx, 0.0)),
                           (np.minimum(np.maximum(swl / sw, 0.0), e_max), 0.0)):
        edge_sse = sse_of(edge_e, edge_b)
        better = edge_sse < sse
        e, b, sse = np.where(better, edge_e, e), np.where(better, edge_b, b), np.where(better, edge_sse, sse)
    det = sw * swxx - swx * swx
    solvable = det > 1e-12 * sw * swxx
    safe = np.where(solvable, det, 1.0)
    e_int = (swxx * swl - swx * swxl) / safe
    b_int = (sw * swxl - swx * swl) / safe
    interior = solvable & (e_int >= 0.0) & (e_int <= e_max) & (b_int >= 0.0)
    return (np.where(interior, e_int, e), np.where(interior, b_int, b),
            np.where(interior, sse_of(e_int, b_int), sse), interior)


def _refine(log_ratio: np.ndarray, w: np.ndarray, losses: np.ndarray, moments: np.ndarray,
            e_max: np.ndarray, a: np.ndarray, left: np.ndarray, right: np.ndarray, tol: float,
            max_iters: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Safeguarded Newton on the profile ``f(a) = min_{e, b} SSE`` for every row at once.

    ``log_ratio = s = log(n / n_ref)``, ``x = e^(-a s)``; padding has ``w = 0``. By the
    envelope theorem ``f'(a) / 2 = b * sum w s x r`` (``r = L - e - b x``), and
    ``f''(a) / 2`` is ``G_aa`` minus the Schur term of the free variables of the box QP
    (``G = SSE / 2``): eight weighted sums of ``x``, ``x^2`` and ``r x`` per iteration.
    A step that leaves the bracket ``[left, right]`` (``f' < 0`` left of it, ``> 0``
    right of it) or meets ``f'' <= 0`` is a bisection. A row stops when its Newton step
    or bracket is under ``tol``, when its steps under ``1000 tol`` stop shrinking (the
    rounding floor of ``f'``), or when ``b = 0`` (a flat profile). Returns
    ``(a, e, b, sse)`` with ``x`` relative to ``n_ref``.
    """
    rows, width = log_ratio.shape
    coef = np.empty((4, rows, width))  # w L, w, w s, w s^2
    np.multiply(w, losses, out=coef[0])
    coef[1] = w
    np.multiply(w, log_ratio, out=coef[2])
    np.multiply(coef[2], log_ratio, out=coef[3])
    x_buf, x2_buf, rx_buf = np.empty((rows, width)), np.empty((rows, width)), np.empty((rows, width))
    out = np.empty((4, rows))
    live = np.arange(rows)
    sw, swl, swll = moments.T
    last_size = np.full(rows, np.inf)
    for it in range(max_iters):
        x, x2, rx = x_buf[:len(live)], x2_buf[:len(live)], rx_buf[:len(live)]
        np.multiply(log_ratio, -a[:, None], out=x)
        np.exp(x, out=x)
        np.multiply(x, x, out=x2)
        swxl, swx, swsx = np.einsum("kij,ij->ki", coef[0:3], x)
        swxx, swsxx, sws2xx = np.einsum("kij,ij->ki", coef[1:4], x2)
        e, b, sse, interior = _solve_box(sw, swl, swll, swx, swxx, swxl, e_max)
        np.multiply(x, -b[:, None], out=rx)
        rx += losses
        rx -= e[:, None]
        rx *= x  # r x, r = L - e - b x
        srx, s2rx = np.einsum("kij,ij->ki", coef[2:4], rx)  # sum w s x r, sum w s^2 x r
        grad = b * srx
        g_aa, g_ea, g_ba = b * b * sws2xx - b * s2rx, -b * swsx, srx - b * swsxx
        det = np.where(interior, sw * swxx - swx * swx, 1.0)
        schur = np.where(interior, (swxx * g_ea * g_ea - 2.0 * swx * g_ea * g_ba + sw * g_ba * g_ba) / det,
                         g_ba * g_ba / swxx)
        hess = g_aa - schur
        left = np.where(grad < 0, a, left)
        right = np.where(grad > 0, a, right)
        step = -grad / np.where(hess > 0, hess, np.inf)
        newton = a + step
        newton_ok = (hess > 0) & (newton > left) & (newton < right)
        size = np.abs(step)
        # converged (a step under tol, whether or not it rounds onto the bracket's end), or at
        # the rounding floor of f' (tiny steps that stopped shrinking)
        done = (grad == 0) | (right - left <= tol) | (hess > 0) & (
            (size <= tol) | (size <= 1e3 * tol) & (size >= 0.5 * last_size)) | (it == max_iters - 1)
        out[:, live[done]] = np.stack([a, e, b, sse])[:, done]
        keep = ~done
        if not keep.any():
            break
        live, a = live[keep], np.where(newton_ok, newton, 0.5 * (left + right))[keep]
        left, right, e_max, sw, swl, swll, last_size = (v[keep] for v in (left, right, e_max, sw, swl, swll, size))
        if not keep.all():
            log_ratio, losses, coef = log_ratio[keep], losses[keep], coef[:, keep]
    return out[0], out[1], out[2], out[3]


def _fit_rows(tokens: np.ndarray, losses: np.ndarray, counts: np.ndarray, sums: np.ndarray, exps: np.ndarray,
              start: np.ndarray, max_iters: int) -> np.ndarray:
    """Power laws for padded rows of points (the first ``counts`` of each row, token
    counts nondecreasing) with their sums (laid out as :func:`_point_terms` gives them,
    relative to each row's first token count). Returns ``(rows, 3)`` of
    ``(irreducible, scale, exponent)``.

    The grid profile comes from the sums alone; the exponent of the best grid point ``k``
    is refined by :func:`_refine` in ``[a_(k-1), a_(k+1)]``, started at ``start`` where
    that lies inside (a previous fit), else at the vertex of the parabola through the
    profile at the three grid points. The grid point is kept if it beats the refined
    exponent.
    """
    rows, g = len(tokens), len(exps)
    valid = np.arange(tokens.shape[1]) < counts[:, None]
    e_max = np.where(valid, losses, np.inf).min(axis=1)
    moments = sums[:, :_MOMENTS]
    sw, swl, swll = (moments[:, i:i + 1] for i in range(_MOMENTS))
    grid_x, grid_xl, grid_xx = (sums[:, _MOMENTS + i * g:_MOMENTS + (i + 1) * g] for i in range(3))
    grid_e, grid_b, grid_sse, _ = _solve_box(sw, swl, swll, grid_x, grid_xx, grid_xl, e_max[:, None])
    k = np.argmin(grid_sse, axis=1)
    at_k = np.arange(rows), k
    left, right = exps[np.maximum(k - 1, 0)], exps[np.minimum(k + 1, g - 1)]
    # without a previous fit: the vertex of the parabola through the grid profile at k - 1, k, k + 1
    inner = (k > 0) & (k < g - 1)
    f_left = grid_sse[np.arange(rows), np.maximum(k - 1, 0)]
    f_right = grid_sse[np.arange(rows), np.minimum(k + 1, g - 1)]
    curve = np.where(inner, f_left - 2.0 * grid_sse[at_k] + f_right, 0.0)
    vertex = exps[k] + 0.5 * (exps[1] - exps[0]) * (f_left - f_right) / np.where(curve > 0, curve, np.inf)
    a0 = np.where((start > left) & (start < right), start,
                  np.where((vertex > left) & (vertex < right), vertex, exps[k]))
    n_ref = tokens[np.arange(rows), counts - 1]
    log_ratio = np.log(tokens / n_ref[:, None])
    log_ratio[~valid] = 0.0
    w = 1.0 / np.maximum(losses, 1e-12) ** 2
    w[~valid] = 0.0
    tol = 1e-9 * (exps[-1] - exps[0]) / max(g - 1, 1)
    a, e, b, sse = _refine(log_ratio, w, losses, moments, e_max, a0, left, right, tol, max_iters)
    use_grid = grid_sse[at_k] < sse
    exponent = np.where(use_grid, exps[k], a)
    scale = np.where(use_grid, grid_b[at_k] * tokens[:, 0] ** exps[k], b * n_ref ** a)
    return np.stack([np.where(use_grid, grid_e[at_k], e), scale, exponent], axis=1)


def _check_points(n: np.ndarray, loss: np.ndarray, where: str) -> None:
    if n.shape != loss.shape or n.ndim != 1:
        raise ValueError(f"{where}tokens and losses must be 1-D of one length, got {n.shape} and {loss.shape}")
    if not (np.all(np.isfinite(n)) and np.all(n > 0) and np.all(np.isfinite(loss)) and np.all(loss >= 0)):
        raise ValueError(f"{where}tokens must be finite and > 0, losses finite and >= 0")
    distinct = len(np.unique(n))
    if distinct < 3:
        raise ValueError(f"{where}a power law needs points at >= 3 distinct token counts, got {distinct}")


def fit_power_laws(tokens: Sequence[np.ndarray], losses: Sequence[np.ndarray],
                   exponent_bounds: tuple[float, float] = (1e-3, 0.8), grid: int = GRID_POINTS,
                   max_iters: int = 100) -> list[PowerLaw]:
    """Fit ``L_d(n) = e_d + b_d n^(-a_d)`` to every domain's points ``(tokens[d], losses[d])``
    in one batched computation (see the module docs); domains may have different
    numbers of points."""
    if len(tokens) != len(losses):
        raise ValueError(f"tokens and losses must list the same domains, got {len(tokens)} and {len(losses)}")
    lo, hi = float(exponent_bounds[0]), float(exponent_bounds[1])
    if not 0 < lo < hi:
        raise ValueError(f"exponent_bounds must satisfy 0 < low < high, got {exponent_bounds}")
    if int(grid) != grid or grid < 2:
        raise ValueError(f"grid must be an integer >= 2, got {grid}")
    if int(max_iters) != max_iters or max_iters < 1:
        raise ValueError(f"max_iters must be an integer >= 1, got {max_iters}")
    points = [(np.asarray(n, dtype=np.float64), np.asarray(v, dtype=np.float64)) for n, v in zip(tokens, losses)]
    for d, (n, loss) in enumerate(points):
        _check_points(n, loss, f"domain {d}: " if len(points) > 1 else "")
    if not points:
        return []
    counts = np.array([len(n) for n, _ in points])
    n_pad, loss_pad = np.ones((len(points), counts.max())), np.ones((len(points), counts.max()))
    for d, (n, loss) in enumerate(points):
        order = np.argsort(n, kind="stable")
        n_pad[d, :len(n)], loss_pad[d, :len(n)] = n[order], loss[order]
    exps = np.linspace(lo, hi, int(grid))
    w = np.where(np.arange(counts.max()) < counts[:, None], 1.0 / np.maximum(loss_pad, 1e-12) ** 2, 0.0)
    wl = w * loss_pad
    x = np.exp(np.multiply.outer(np.log(n_pad / n_pad[:, :1]), -exps))
    sums = np.concatenate([np.stack([w.sum(1), wl.sum(1), (wl * loss_pad).sum(1)], axis=1),
                           np.einsum("rp,rpg->rg", w, x), np.einsum("rp,rpg->rg", wl, x),
                           np.einsum("rp,rpg,rpg->rg", w, x, x)], axis=1)
    fitted = _fit_rows(n_pad, loss_pad, counts, sums, exps, np.full(len(points), np.nan), int(max_iters))
    return [PowerLaw(*map(float, row)) for row in fitted]


def fit_power_law(tokens: np.ndarray, losses: np.ndarray, exponent_bounds: tuple[float, float] = (1e-3, 0.8),
                  grid: int = GRID_POINTS, max_iters: int = 100) -> PowerLaw:
    """Fit ``L(n) = e + b n^(-a)`` to points ``(tokens, losses)`` (see the module docs)."""
    return fit_power_laws([tokens], [losses], exponent_bounds, grid, max_iters)[0]


class ADOPolicy(MixturePolicy):
    """ADO: mixture from per-domain power-law learning speeds, prior and credit."""

    name = "ado"
    inputs = ("train_loss",)

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
        self._exps = np.linspace(*self.exponent_bounds, GRID_POINTS)
        self.tokens_seen = np.zeros(num_domains)
        # points per domain, in arrival order (token counts never decrease), with their sums
        self._tokens = np.ones((num_domains, self.max_points + 1))
        self._losses = np.ones((num_domains, self.max_points + 1))
        self._count = np.zeros(num_domains, dtype=np.int64)
        self._sums = np.zeros((num_domains, _MOMENTS + 3 * GRID_POINTS))
        self._stale = np.zeros(num_domains, dtype=bool)  # points added since the domain's last fit
        self._law = np.full((num_domains, 3), np.nan)  # (irreducible, scale, exponent); NaN: no law yet
        self.history = self.prior.copy()
        self.pibar = self.prior.copy()
        self.updates = 0
        self.since_fit = 0

    @property
    def points(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each domain's ``(tokens, losses)`` points (copies)."""
        return [(self._tokens[d, :c].copy(), self._losses[d, :c].copy()) for d, c in enumerate(self._count)]

    @property
    def laws(self) -> list[PowerLaw | None]:
        """Each domain's fitted law, None before its first fit."""
        return [None if np.isnan(row[0]) else PowerLaw(*map(float, row)) for row in self._law]

    def preference(self) -> np.ndarray | None:
        """``rho`` (normalised) from the current laws, or None before every domain with a
        positive prior has one (a zero-prior domain has ``rho_d = 0`` and needs none)."""
        has_law = ~np.isnan(self._law[:, 0])
        if np.any(~has_law & (self.prior > 0)):
            return None
        n = np.maximum(self.tokens_seen, 1.0)
        _, scale, exponent = np.where(has_law[:, None], self._law, 0.0).T
        speed = exponent * scale * np.power(n, -exponent - 1.0)
        rho = self.prior * self.history ** self.s * speed
        if not (np.all(np.isfinite(rho)) and rho.sum() > 0):
            return self.prior.copy()
        return rho / rho.sum()

    def _recompute_sums(self, d: int) -> None:
        """Domain ``d``'s sums from its points, added in order (as :meth:`_add_points` does)."""
        c = self._count[d]
        terms = _point_terms(self._tokens[d, :c], self._losses[d, :c], self._tokens[d, 0], self._exps)
        self._sums[d] = np.add.accumulate(terms, axis=0)[-1] if c else 0.0

    def _add_points(self, loss: np.ndarray) -> None:
        rows = np.flatnonzero(~np.isnan(loss) & (self.tokens_seen > 0))
        slot = self._count[rows]
        self._tokens[rows, slot] = self.tokens_seen[rows]
        self._losses[rows, slot] = loss[rows]
        self._count[rows] += 1
        self._stale[rows] = True
        self._sums[rows] += _point_terms(self.tokens_seen[rows], loss[rows], self._tokens[rows, 0], self._exps)
        for d in rows[self._count[rows] > self.max_points]:
            self._set_points(d, _merge_pairs(self._tokens[d, :self._count[d]]),
                             _merge_pairs(self._losses[d, :self._count[d]]))

    def _set_points(self, d: int, tokens: np.ndarray, losses: np.ndarray) -> None:
        while len(tokens) > self.max_points:
            tokens, losses = _merge_pairs(tokens), _merge_pairs(losses)
        self._count[d] = len(tokens)
        self._tokens[d, :len(tokens)], self._losses[d, :len(tokens)] = tokens, losses
        self._recompute_sums(d)

    def _refit(self) -> None:
        """Refit, in one batch, every domain with new points and enough of them."""
        rows = np.flatnonzero(self._stale & (self._count >= self.min_points))
        if len(rows):
            width = int(self._count[rows].max())
            tokens, counts = self._tokens[rows, :width], self._count[rows]
            steps = (np.diff(tokens, axis=1) > 0) & (np.arange(1, width) < counts[:, None])
            rows = rows[steps.sum(axis=1) >= 2]  # >= 3 distinct token counts (they never decrease)
        if len(rows):
            width = int(self._count[rows].max())
            self._law[rows] = _fit_rows(self._tokens[rows, :width], self._losses[rows, :width], self._count[rows],
                                        self._sums[rows], self._exps, self._law[rows, 2], max_iters=100)
            self._stale[rows] = False
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
        missing = np.any(np.isnan(self._law[:, 0]) & (self._count >= self.min_points))
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
                "points": [[xs.tolist(), ys.tolist()] for xs, ys in self.points],
                "laws": [None if np.isnan(row[0]) else row.tolist() for row in self._law],
                "stale": self._stale.tolist(),
                "history": self.history.tolist(), "pibar": self.pibar.tolist(),
                "updates": self.updates, "since_fit": self.since_fit}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.prior = np.asarray(state["prior"], dtype=np.float64)
        self.tokens_seen = np.asarray(state["tokens_seen"], dtype=np.float64)
        for d, (xs, ys) in enumerate(state["points"]):
            self._set_points(d, np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64))
        self._law = np.array([[np.nan] * 3 if law is None else [float(v) for v in law] for law in state["laws"]],
                             dtype=np.float64).reshape(self.m, 3)
        # a state without "stale" (written before it was kept) refits every domain once
        self._stale = np.asarray(state.get("stale", [True] * self.m), dtype=bool)
        self.history = np.asarray(state["history"], dtype=np.float64)
        self.pibar = np.asarray(state["pibar"], dtype=np.float64)
        self.updates = int(state["updates"])
        self.since_fit = int(state["since_fit"])


def _merge_pairs(values: np.ndarray) -> np.ndarray:
    """Means of consecutive pairs (an odd last value is kept as is)."""
    v = np.asarray(values, dtype=np.float64)
    even = len(v) - len(v) % 2
    return np.concatenate([(v[0:even:2] + v[1:even:2]) / 2.0, v[even:]])

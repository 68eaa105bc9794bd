"""Aioli: online data mixing from a mixing law re-estimated during training.

Chen, Hu, Lourie, Cho, Ré, "Aioli: A Unified Optimization Framework for Language Model
Data Mixing", ICLR 2025 (arXiv 2411.05735), Algorithm 1; reference code
HazyResearch/aioli (``trainer/aioli_trainer.py``).

Each round t:

1. **Baseline.** The mixture trained before the round ends with an evaluation of every
   domain (``eval_after``); that eval is ``L_before`` of the first sweep. Before the
   first round the policy publishes ``p0`` with ``steps=0, eval_after=True`` (evaluate
   only), or with ``steps=prior_steps`` in the restricted setting (below).
2. **LearnParams** (:mod:`mixflow.mixture.aioli_params`): ``lp_rounds`` random orders
   over the m domains (a generator seeded with ``(seed, crc32("aioli"))``); each sweep
   is published as ``Mixture(w^(j), steps=lp_steps, eval_after=True)`` and its (merged)
   eval report closes it. The solve uses the compositions realised in each sweep
   (``Feedback.counts`` summed over the version's reports received up to its eval); a
   sweep whose reports carried no counts falls back to its published mixture and is
   counted in ``nominal_sweeps``.
3. **Update.** Optionally normalise ``A`` (shift by a negative minimum, divide by the
   total). ``update="eg"``: ``p^t ∝ p^{t-1} * exp(eta * 1^T A^t)`` (``p^{t-1}`` the
   mixture trained before the round; ``p_anchor`` in the first round);
   ``update="ema"``: ``Abar = (1 - ema) A^t + ema * Abar_prev`` (``Abar = A^1`` in the
   first round), ``p^t ∝ p_anchor * exp(eta * 1^T Abar)``.
4. **Train** ``steps_per_round`` steps on ``p^t`` (with ``eval_after``: the next
   round's baseline). After ``rounds`` rounds the last ``p`` is published with
   ``steps=None`` (train on it to the end); ``rounds=None`` re-estimates until training
   stops.

Every mixture waits for its own eval: a report tagged with any other version (prefetch
stragglers) is ignored and counted in ``ignored_reports``; one with a NaN / inf /
negative eval loss or count is rejected with a FeedbackWarning.

**Restricted setting** (the paper's Aioli-restricted, reference flags ``--aioli_prior``
and ``--prior_steps``): proportions learned elsewhere (e.g. by another method on a
shorter run) are given as ``initial``; the model first trains ``prior_steps`` steps on
them, then Aioli adjusts them dynamically for the rest of training. With
``anchor="initial"`` (default) the updates multiply the prior (``p_anchor = p0``, and the
first EG step starts from it), so Aioli adjusts the prior as the paper describes. The
reference code resets its anchor to uniform once the prior phase ends, so the prior
only shapes those first steps; ``anchor="uniform"`` reproduces that. In the unrestricted
setting ``p0`` is uniform and the two agree.

**Paper settings** (Pythia-160M, SlimPajama groups, batch 8 x 2048 tokens, 5000 steps
for m = 2, 3 and 40000 for m = 7), :data:`AIOLI_PAPER_SETTINGS`: the reference's round
is ``update_steps`` steps (250, 250, 200) including LearnParams's
``lp_rounds * lp_steps * m`` steps, so ``steps_per_round`` here is their difference
(the reference trains ``update_steps * batch - lp_duration`` *samples*, mixing units).
The paper runs ``max_steps / update_steps`` rounds (20, 20, 200). ``eta``, ``ema``,
``one_hot_factor`` and ``lp_rounds`` left as ``None`` take the setting of the nearest
documented m (m <= 2 -> 2, 3..4 -> 3, >= 5 -> 7).

**Rounds fitted to the run** (:func:`fit_schedule`). The round's *length* and the *share*
of it spent in LearnParams are kept from the nearest paper m, not its ``lp_steps``: for
another m, ``lp_steps = round(share * round_length / (lp_rounds * m))`` and the round's
training fills the rest (m = 4: 4 x 4 x 4 = 64 of 250 steps, 26%, where the paper's m = 3
spends 29%; m = 8: 2 x 9 x 8 = 144 of 200, 72%, paper m = 7: 70%). With
``total_steps`` (the run's step budget; the pipeline passes ``trainer.steps``) the round
length is the paper's *proportion of the run* (250 / 5000 = 5% for m = 2, 3; 200 / 40000 =
0.5% for m = 7; a run too short for that gets fewer, longer rounds with one step per sweep
and the same share), which gives exactly the paper's
rounds at the paper's budgets, and ``rounds`` defaults to as many whole rounds as fit,
the last one training on its learned mixture to the end: the run never ends mid-sweep.
A ``rounds`` that cannot fit is refused. Without ``total_steps`` the round is the paper's
length in steps and ``rounds=None`` re-estimates until training stops (so a run may end
inside a LearnParams pass). Values given explicitly are kept.

**Update defaults** (``update="eg"``, ``normalize=True``): chosen by the linear
mixing-law simulation in ``benchmarks/aioli_defaults.py`` (the real policy on
``L <- L - lr * A p``, fixed and saturating ``A``, m = 2, 3, 4, 7, 10 seeds, 2,000 steps;
numbers in the README): ``eg`` beat stratified on 76 of 80 (law, m, seed) runs and moved the
final mixture 0.07-1.2 in L1 from uniform, ``ema`` on 54 of 80, within 0.05 of uniform and
indistinguishable from stratified. With ``update="ema"`` (the reference scripts' variant) and
normalisation each round's gain ``1^T Abar`` sums to 1 over the domains and is re-applied
to the *anchor*, so the mixture never moves further than ``eta`` times one normalised
estimate from ``p0`` (0.6-4% per round from uniform at the paper's eta); Algorithm 1's
``eg`` multiplies the previous mixture, so consistent estimates accumulate.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from .aioli_params import LearnParams, normalize_interactions, sweep_mixture
from .policy import Feedback, Mixture, MixturePolicy
from .version_reports import VersionReports

AIOLI_PAPER_SETTINGS: dict[int, dict[str, float | int]] = {
    2: {"lp_rounds": 4, "lp_steps": 4, "eta": 0.2, "ema": 0.1, "one_hot_factor": 0.625,
        "steps_per_round": 250 - 4 * 4 * 2},
    3: {"lp_rounds": 4, "lp_steps": 6, "eta": 0.1, "ema": 0.5, "one_hot_factor": 0.5,
        "steps_per_round": 250 - 4 * 6 * 3},
    7: {"lp_rounds": 2, "lp_steps": 10, "eta": 1.0, "ema": 0.1, "one_hot_factor": 0.75,
        "steps_per_round": 200 - 2 * 10 * 7},
}
AIOLI_PAPER_BUDGET = {2: 5000, 3: 5000, 7: 40000}  # the paper's training steps per m
UPDATES = ("ema", "eg")
ANCHORS = ("initial", "uniform")


def _paper_key(num_domains: int) -> int:
    return 2 if num_domains <= 2 else 3 if num_domains <= 4 else 7


def paper_setting(num_domains: int) -> dict[str, float | int]:
    """The documented setting of the nearest paper m (see the module docstring)."""
    return dict(AIOLI_PAPER_SETTINGS[_paper_key(num_domains)])


def fit_schedule(num_domains: int, total_steps: int | None = None, prior_steps: int = 0,
                 lp_rounds: int | None = None, lp_steps: int | None = None,
                 steps_per_round: int | None = None, rounds: int | None = None) -> dict[str, int | None]:
    """``lp_rounds``, ``lp_steps``, ``steps_per_round`` and ``rounds`` for m domains and a run of
    ``total_steps`` steps (None: no known budget), keeping the nearest paper m's round length
    and LearnParams share (module docstring); given values are kept. Raises ``ValueError``
    when the budget cannot hold one round, or ``rounds`` cannot end on a learned mixture."""
    key = _paper_key(num_domains)
    paper = AIOLI_PAPER_SETTINGS[key]
    paper_lp = int(paper["lp_rounds"] * paper["lp_steps"] * key)
    paper_round = paper_lp + int(paper["steps_per_round"])
    share = paper_lp / paper_round
    lp_rounds = int(paper["lp_rounds"] if lp_rounds is None else lp_rounds)
    if lp_rounds < 1:
        raise ValueError(f"lp_rounds must be >= 1, got {lp_rounds}")
    # the first mixture: an evaluation-only step, or the restricted setting's prior steps
    budget = None if total_steps is None else int(total_steps) - max(int(prior_steps), 1)
    length = paper_round if budget is None else budget * paper_round / AIOLI_PAPER_BUDGET[key]
    length = max(length, lp_rounds * num_domains / share)  # a short run: fewer, longer rounds, same share
    if num_domains == key and budget is None and lp_steps is None:
        lp_steps = int(paper["lp_steps"])
    if lp_steps is None:
        lp_steps = max(1, round(share * length / (lp_rounds * num_domains)))
    lp = lp_rounds * int(lp_steps) * num_domains
    if steps_per_round is None:
        steps_per_round = (int(paper["steps_per_round"]) if num_domains == key and budget is None
                           else max(1, round(length) - lp))
    if budget is not None:
        # n rounds take n * lp + (n - 1) * steps_per_round steps; the last trains >= 1 step to the end
        fits = (budget - 1 + steps_per_round) // (lp + steps_per_round)
        if fits < 1:
            raise ValueError(f"total_steps={total_steps} is too short for one Aioli round: LearnParams takes "
                             f"lp_rounds * lp_steps * m = {lp_rounds} * {lp_steps} * {num_domains} = {lp} steps, "
                             f"after {max(int(prior_steps), 1)} first step(s), and the learned mixture >= 1")
        if rounds is None:
            rounds = int(fits)
        elif rounds > fits:
            raise ValueError(f"rounds={rounds} do not fit total_steps={total_steps}: at most {fits} rounds of "
                             f"{lp} LearnParams + {steps_per_round} training steps end on a learned mixture")
    return {"lp_rounds": lp_rounds, "lp_steps": int(lp_steps), "steps_per_round": int(steps_per_round),
            "rounds": rounds}


class AioliPolicy(MixturePolicy):
    """Aioli: LearnParams sweeps estimate ``A``, exponentiated-gradient updates of ``p``."""

    name = "aioli"
    inputs = ("eval_loss",)

    def __init__(self, num_domains: int, rounds: int | None = None, steps_per_round: int | None = None,
                 lp_rounds: int | None = None, lp_steps: int | None = None, eta: float | None = None,
                 update: str = "eg", ema: float | None = None, one_hot_factor: float | None = None,
                 normalize: bool = True, prior_steps: int = 0, anchor: str = "initial",
                 total_steps: int | None = None,
                 initial: np.ndarray | None = None, floor: float = 0.0, seed: int = 0):
        if num_domains < 2:
            raise ValueError(f"num_domains must be >= 2 for Aioli, got {num_domains}")
        super().__init__(num_domains, initial, floor)
        paper = paper_setting(num_domains)
        if rounds is not None and rounds < 1:
            raise ValueError(f"rounds must be >= 1 or None (no limit), got {rounds}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1 or None, got {total_steps}")
        for name, value in (("lp_rounds", lp_rounds), ("lp_steps", lp_steps)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if steps_per_round is not None and steps_per_round < 0:
            raise ValueError(f"steps_per_round must be >= 0, got {steps_per_round}")
        if prior_steps < 0:
            raise ValueError(f"prior_steps must be >= 0, got {prior_steps}")
        fitted = fit_schedule(num_domains, total_steps, prior_steps, lp_rounds, lp_steps, steps_per_round, rounds)
        self.total_steps = total_steps
        self.rounds = fitted["rounds"]
        self.steps_per_round = int(fitted["steps_per_round"])
        self.lp_rounds = int(fitted["lp_rounds"])
        self.lp_steps = int(fitted["lp_steps"])
        self.eta = float(paper["eta"] if eta is None else eta)
        self.ema = float(paper["ema"] if ema is None else ema)
        self.one_hot_factor = float(paper["one_hot_factor"] if one_hot_factor is None else one_hot_factor)
        self.update = update
        self.normalize = bool(normalize)
        self.prior_steps = int(prior_steps)
        self.anchor_mode = anchor
        self._check()
        self.anchor = self.p0.copy() if anchor == "initial" else np.full(num_domains, 1.0 / num_domains)
        self.seed = int(seed)
        self.rng = np.random.default_rng([self.seed, zlib.crc32(self.name.encode())])
        self.round = 0
        self.phase = "baseline"          # baseline -> sweep -> (baseline ... | final)
        self.reports = VersionReports(num_domains, eval_needs_all_domains=True)
        self.learn: LearnParams | None = None
        self.trained_p = self.p0.copy()  # the p of the mixture whose eval starts the round
        self.ema_A: np.ndarray | None = None
        self.last_A: np.ndarray | None = None  # last estimate, before normalisation
        self.ignored_reports = 0
        self.nominal_sweeps = 0
        self.sweep_versions: list[int] = []  # the versions of LearnParams sweep mixtures (summary share)
        self._publish_first(Mixture(self.p0, 0, self.prior_steps, True))

    def _check(self) -> None:
        m = self.m
        if self.rounds is not None and self.rounds < 1:
            raise ValueError(f"rounds must be >= 1 or None (no limit), got {self.rounds}")
        for name in ("steps_per_round", "prior_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lp_rounds", "lp_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1.0 / m < self.one_hot_factor <= 1.0:
            raise ValueError(f"one_hot_factor must be in (1/m, 1] = ({1.0 / m:.4g}, 1] so the sweep "
                             f"mixtures are independent, got {self.one_hot_factor}")
        if not (np.isfinite(self.eta) and self.eta > 0):
            raise ValueError(f"eta must be a finite number > 0, got {self.eta}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if self.update not in UPDATES:
            raise ValueError(f"unknown update {self.update!r}; choose one of {', '.join(UPDATES)}")
        if self.anchor_mode not in ANCHORS:
            raise ValueError(f"unknown anchor {self.anchor_mode!r}; choose one of {', '.join(ANCHORS)}")

    def _update(self, feedback: Feedback) -> Mixture | None:
        if self.phase == "final":
            return None
        if feedback.version != self._current.version:
            self.ignored_reports += 1
            return None
        if not self.reports.add(feedback) or feedback.eval_loss is None:
            return None
        loss = self.reports.eval_loss
        if self.phase == "baseline":
            self.trained_p = self._current.p.copy()
            order = np.concatenate([self.rng.permutation(self.m) for _ in range(self.lp_rounds)])
            self.learn = LearnParams(self.m, order, loss)
            self.phase = "sweep"
            return self._next_sweep()
        realised, from_counts = self.reports.composition(self._current.p)
        self.nominal_sweeps += not from_counts
        self.learn.record(loss, realised)
        if not self.learn.done:
            return self._next_sweep()
        return self._finish_round()

    def run_stats(self) -> dict[str, Any]:
        return {"sweep_versions": list(self.sweep_versions), "round": self.round, "rounds": self.rounds,
                "lp_steps": self.lp_steps, "lp_rounds": self.lp_rounds, "steps_per_round": self.steps_per_round}

    def _next_sweep(self) -> Mixture:
        self.sweep_versions.append(self._current.version + 1)  # what observe() publishes it as
        self.reports.reset()
        w = sweep_mixture(self.learn.domain, self.m, self.one_hot_factor)
        return Mixture(w, -1, self.lp_steps, True)  # observe() assigns the next version

    def _finish_round(self) -> Mixture:
        A = self.learn.estimate()
        self.last_A = A
        self.learn = None
        if self.normalize:
            A = normalize_interactions(A)
        if self.update == "ema":
            self.ema_A = A if self.ema_A is None else (1.0 - self.ema) * A + self.ema * self.ema_A
            base, gain = self.anchor, self.ema_A.sum(axis=0)
        else:
            base, gain = (self.anchor if self.round == 0 else self.trained_p), A.sum(axis=0)
        z = self.eta * gain
        p = base * np.exp(z - z.max())
        self.round += 1
        self.reports.reset()
        if self.rounds is not None and self.round >= self.rounds:
            self.phase = "final"
            return Mixture(p, -1, None, False)
        self.phase = "baseline"
        return Mixture(p, -1, self.steps_per_round, True)

    def _extra_state(self) -> dict[str, Any]:
        return {"round": self.round, "phase": self.phase, "reports": self.reports.state_dict(),
                "learn": None if self.learn is None else self.learn.state_dict(),
                "trained_p": self.trained_p.tolist(), "anchor": self.anchor.tolist(),
                "ema_A": None if self.ema_A is None else self.ema_A.tolist(),
                "last_A": None if self.last_A is None else self.last_A.tolist(),
                "ignored_reports": self.ignored_reports, "nominal_sweeps": self.nominal_sweeps,
                "sweep_versions": list(self.sweep_versions), "rng": self.rng.bit_generator.state}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.round = int(state["round"])
        self.phase = state["phase"]
        self.reports.load_state_dict(state["reports"])
        self.learn = None if state["learn"] is None else LearnParams.from_state(self.m, state["learn"])
        self.trained_p = np.asarray(state["trained_p"], dtype=np.float64)
        self.anchor = np.asarray(state["anchor"], dtype=np.float64)
        self.ema_A = None if state["ema_A"] is None else np.asarray(state["ema_A"], dtype=np.float64)
        self.last_A = None if state["last_A"] is None else np.asarray(state["last_A"], dtype=np.float64)
        self.ignored_reports = int(state["ignored_reports"])
        self.nominal_sweeps = int(state["nominal_sweeps"])
        self.sweep_versions = [int(v) for v in state.get("sweep_versions", [])]
        self.rng.bit_generator.state = state["rng"]

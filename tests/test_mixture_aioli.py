"""Aioli: hand-computed LearnParams + updates, recovery of a synthetic mixing law,
realised vs nominal mixtures, restricted setting, version attribution, bad feedback,
resumption."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from mixflow.mixture.aioli import AIOLI_PAPER_SETTINGS, AioliPolicy, paper_setting
from mixflow.mixture.aioli_params import normalize_interactions, solve_mixing_law, sweep_mixture
from mixflow.mixture.policy import Feedback, FeedbackWarning
from mixflow.mixture.schedule import ExactSchedule


class LinearLawTrainer:
    """A trainer on the mixing law ``L <- L - A c_t / b (+ noise)``: every step takes
    ``batch`` domain ids from the exact schedule for the current mixture, reports their
    counts, and evaluates after the mixture's last step when asked.

    ``skew`` moves half of domain 0's samples of every step to domain 1 (say, domain 0's
    documents ran short and were back-filled), so realised and nominal mixtures differ.
    ``report_counts=False`` withholds counts (the policy then only knows nominal ones).
    """

    def __init__(self, A, loss0, batch=8, noise=0.0, seed=0, skew=False, report_counts=True,
                 open_ended_steps=5):
        self.A = np.asarray(A, dtype=np.float64)
        self.m = self.A.shape[0]
        self.loss = np.asarray(loss0, dtype=np.float64).copy()
        self.batch = batch
        self.noise = noise
        self.rng = np.random.default_rng(seed)
        self.schedule = ExactSchedule(self.m, np.random.default_rng(seed + 1))
        self.skew = skew
        self.report_counts = report_counts
        self.open_ended_steps = open_ended_steps
        self.step = 0

    def run_mixture(self, policy) -> None:
        mix = policy.mixture()
        self.schedule.set_mixture(mix.p, mix.version)
        steps = self.open_ended_steps if mix.steps is None else mix.steps
        for _ in range(steps):
            counts = np.bincount(self.schedule.take(self.batch), minlength=self.m).astype(float)
            if self.skew:
                moved = counts[0] // 2
                counts[0] -= moved
                counts[1] += moved
            self.loss = self.loss - self.A @ counts / self.batch
            self.step += 1
            policy.observe(Feedback(mix.version, self.step, train_loss=self.loss.copy(),
                                    counts=counts if self.report_counts else None))
        if mix.eval_after:
            noisy = self.loss + self.noise * self.rng.standard_normal(self.m)
            policy.observe(Feedback(mix.version, self.step, eval_loss=noisy))


def run(policy, trainer, mixtures):
    for _ in range(mixtures):
        trainer.run_mixture(policy)


def run_to_final(policy, trainer, limit=500):
    for _ in range(limit):
        if policy.phase == "final":
            return
        trainer.run_mixture(policy)
    raise AssertionError(f"policy did not finish within {limit} mixtures")


A_TRUE = np.array([[0.30, 0.05, 0.02],
                   [0.04, 0.20, 0.01],
                   [0.10, 0.06, 0.50]])  # column sums: 0.44, 0.31, 0.53 -> domain 2 is best


def test_sweep_mixture_and_helpers_by_hand():
    assert sweep_mixture(1, 3, 0.5).tolist() == [0.25, 0.5, 0.25]
    W = np.array([[0.75, 0.25], [0.25, 0.75]])
    A = np.array([[0.4, 0.0], [0.1, 0.2]])
    assert np.allclose(solve_mixing_law(A @ W.T, W), A)
    assert np.allclose(normalize_interactions(np.array([[1.0, -1.0], [0.0, 2.0]])),
                       np.array([[2.0, 0.0], [1.0, 3.0]]) / 6.0)
    assert normalize_interactions(np.zeros((2, 2))).tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_one_round_matches_hand_computation():
    # m = 2, ohf 0.75, A = [[.4, 0], [.1, .2]], L0 = [2, 3]. Sweeps realise W = [[.75,.25],[.25,.75]]
    # (counts 6:2 and 2:6). B[:,0] = A w0 = [.3, .125], B[:,1] = A w1 = [.1, .175].
    policy = AioliPolicy(2, lp_rounds=1, lp_steps=1, one_hot_factor=0.75, eta=1.0, update="eg",
                         normalize=False, steps_per_round=10, seed=3)
    first = policy.mixture()
    assert (first.version, first.steps, first.eval_after) == (0, 0, True)
    assert first.p.tolist() == [0.5, 0.5]
    # Whatever the seeded order, chaining the evals gives the same B.
    v = policy.mixture().version
    assert policy.observe(Feedback(v, 0, eval_loss=np.array([2.0, 3.0])))
    j_first = int(np.argmax(policy.mixture().p))
    drops = {0: np.array([0.3, 0.125]), 1: np.array([0.1, 0.175])}
    counts = {0: [6.0, 2.0], 1: [2.0, 6.0]}
    loss = np.array([2.0, 3.0])
    for j in (j_first, 1 - j_first):
        mix = policy.mixture()
        assert mix.p.tolist() == sweep_mixture(j, 2, 0.75).tolist()
        assert (mix.steps, mix.eval_after) == (1, True)
        loss = loss - drops[j]
        assert not policy.observe(Feedback(mix.version, 1, counts=np.array(counts[j])))
        assert policy.observe(Feedback(mix.version, 1, eval_loss=loss.copy()))
    assert np.allclose(policy.last_A, [[0.4, 0.0], [0.1, 0.2]])
    # EG from uniform: p ∝ exp(1 * colsum A) = exp([0.5, 0.2]) -> p_0 = 1 / (1 + e^-0.3)
    mix = policy.mixture()
    assert mix.p[0] == pytest.approx(1.0 / (1.0 + math.exp(-0.3)), abs=1e-12)
    assert (mix.version, mix.steps, mix.eval_after) == (3, 10, True)


def test_normalised_ema_two_rounds_by_hand():
    policy = AioliPolicy(2, lp_rounds=1, lp_steps=1, one_hot_factor=0.75, eta=1.0, update="ema", ema=0.25,
                         normalize=True, steps_per_round=10, seed=0)
    A1 = np.array([[0.4, 0.0], [0.1, 0.2]])       # normalised: /0.7, colsums [5/7, 2/7]
    A2 = np.array([[0.1, 0.3], [-0.1, 0.1]])      # normalised: +0.1 -> [[.2,.4],[0,.2]], /0.8
    W = np.array([[0.75, 0.25], [0.25, 0.75]])
    for A in (A1, A2):
        B = A @ W.T
        loss0 = np.array([2.0, 3.0])
        # chain: the order decides which column is taken first
        v = policy.mixture().version
        assert policy.observe(Feedback(v, 0, eval_loss=loss0))
        loss = loss0.copy()
        for _ in range(2):
            mix = policy.mixture()
            j = int(np.argmax(mix.p))
            loss = loss - B[:, j]
            policy.observe(Feedback(mix.version, 1, counts=W[j] * 8))
            policy.observe(Feedback(mix.version, 1, eval_loss=loss.copy()))
    g1 = np.array([5 / 7, 2 / 7])
    g2 = np.array([0.2, 0.6]) / 0.8
    gbar = 0.75 * g2 + 0.25 * g1
    expected = np.exp(gbar) / np.exp(gbar).sum()
    assert np.allclose(policy.proportions(), expected, atol=1e-12)
    assert policy.round == 2


def test_recovers_known_A_and_moves_toward_the_laws_optimum():
    lp_steps = 6
    policy = AioliPolicy(3, lp_rounds=4, lp_steps=lp_steps, one_hot_factor=0.5, eta=4.0, update="eg",
                         steps_per_round=20, rounds=8, seed=1)
    trainer = LinearLawTrainer(A_TRUE, [1000.0, 1000.0, 1000.0], noise=1e-3, seed=2)
    best_share = []
    estimates = []
    for _ in range(200):
        if policy.phase == "final":
            break
        trainer.run_mixture(policy)
        if policy.last_A is not None and len(estimates) < policy.round:
            estimates.append(policy.last_A.copy())
            best_share.append(policy.proportions()[2])
    assert len(estimates) == 8
    # the loss drop over a sweep of lp_steps steps is lp_steps * A w
    for A_hat in estimates:
        assert np.allclose(A_hat, lp_steps * A_TRUE, atol=0.02)
    assert all(b > a for a, b in zip(best_share, best_share[1:]))
    assert best_share[-1] > 0.8
    final = policy.mixture()
    assert final.steps is None and not final.eval_after
    assert policy.ignored_reports == 0


def test_realised_counts_not_nominal_mixtures_recover_A():
    def estimate(report_counts):
        policy = AioliPolicy(3, lp_rounds=1, lp_steps=4, one_hot_factor=0.5, rounds=1, seed=0)
        trainer = LinearLawTrainer(A_TRUE, [1000.0, 1000.0, 1000.0], skew=True, report_counts=report_counts)
        run_to_final(policy, trainer)
        return policy

    realised = estimate(True)
    assert np.allclose(realised.last_A, 4 * A_TRUE, atol=1e-10)
    assert realised.nominal_sweeps == 0
    nominal = estimate(False)
    assert nominal.nominal_sweeps == 3
    assert np.abs(nominal.last_A - 4 * A_TRUE).max() > 0.3


def test_restricted_setting_trains_prior_then_adjusts_it():
    prior = np.array([0.6, 0.3, 0.1])
    kwargs = dict(lp_rounds=1, lp_steps=4, one_hot_factor=0.5, eta=1.0, update="ema", steps_per_round=5,
                  prior_steps=40, initial=prior, seed=0)
    adjusted = AioliPolicy(3, **kwargs)
    reference = AioliPolicy(3, anchor="uniform", **kwargs)
    for policy in (adjusted, reference):
        first = policy.mixture()
        assert (first.steps, first.eval_after) == (40, True)
        assert np.allclose(first.p, prior)
        trainer = LinearLawTrainer(A_TRUE, [1000.0, 1000.0, 1000.0])
        run(policy, trainer, 1 + 3)  # prior phase + three sweeps
        assert policy.round == 1
    gain = normalize_interactions(adjusted.last_A).sum(axis=0)
    assert np.allclose(adjusted.proportions(), prior * np.exp(gain) / (prior * np.exp(gain)).sum())
    assert np.allclose(reference.proportions(), np.exp(gain) / np.exp(gain).sum())


def test_reports_of_other_versions_are_ignored_and_counted():
    policy = AioliPolicy(2, lp_rounds=1, lp_steps=1, seed=0)
    assert not policy.observe(Feedback(5, 0, eval_loss=np.array([1.0, 1.0])))
    assert not policy.observe(Feedback(-1, 0, counts=np.array([3.0, 1.0])))
    assert policy.ignored_reports == 2
    assert policy.mixture().version == 0 and policy.phase == "baseline"
    assert policy.observe(Feedback(0, 0, eval_loss=np.array([1.0, 1.0])))
    assert policy.phase == "sweep"


@pytest.mark.parametrize("bad", [[np.nan, 1.0], [np.inf, 1.0], [-0.5, 1.0]])
def test_bad_eval_losses_rejected_with_warning(bad):
    policy = AioliPolicy(2, lp_rounds=1, lp_steps=1, seed=0, floor=0.1)
    assert policy.observe(Feedback(0, 0, eval_loss=np.array([2.0, 2.0])))
    v = policy.mixture().version
    with pytest.warns(FeedbackWarning, match="rejected feedback"):
        assert not policy.observe(Feedback(v, 1, eval_loss=np.array(bad)))
    with pytest.warns(FeedbackWarning, match="counts"):
        assert not policy.observe(Feedback(v, 1, counts=np.array([np.inf, 1.0])))
    assert policy.mixture().version == v and policy.learn.k == 0
    p = policy.proportions()
    assert p.sum() == pytest.approx(1.0) and p.min() >= 0.1
    with pytest.raises(ValueError, match=r"feedback.eval_loss must have shape \(2,\)"):
        policy.observe(Feedback(v, 1, eval_loss=np.array([1.0, 2.0, 3.0])))


def test_floor_applies_to_sweeps_and_updates():
    policy = AioliPolicy(3, lp_rounds=1, lp_steps=2, one_hot_factor=0.9, floor=0.1, eta=5.0, update="eg",
                         steps_per_round=3, rounds=2, seed=4)
    trainer = LinearLawTrainer(A_TRUE, [1000.0, 1000.0, 1000.0])
    seen = []
    for _ in range(100):
        if policy.phase == "final":
            break
        trainer.run_mixture(policy)
        seen.append(policy.proportions().copy())
    assert all(p.min() >= 0.1 - 1e-12 and p.sum() == pytest.approx(1.0) for p in seen)
    assert max(p.max() for p in seen) == pytest.approx(0.8)  # 0.9 sweep floored


def test_state_round_trip_mid_learnparams_continues_identically():
    kwargs = dict(lp_rounds=2, lp_steps=3, one_hot_factor=0.5, update="ema", ema=0.3, steps_per_round=4,
                  rounds=4, seed=7)
    a = AioliPolicy(3, **kwargs)
    trainer_a = LinearLawTrainer(A_TRUE, [1000.0, 1000.0, 1000.0], noise=1e-3, seed=3)
    run(a, trainer_a, 1 + 6 + 1 + 2)  # into the second round's LearnParams
    a.observe(Feedback(a.mixture().version, 99, counts=np.array([1.0, 0.0, 0.0])))  # half-collected sweep
    state = json.loads(json.dumps(a.state_dict()))
    b = AioliPolicy(3, **{**kwargs, "seed": 123})
    b.load_state_dict(state)
    trainer_b = copy.deepcopy(trainer_a)
    history_a, history_b = [], []
    for _ in range(100):
        if a.phase == "final":
            break
        trainer_a.run_mixture(a)
        trainer_b.run_mixture(b)
        history_a.append((a.mixture().version, a.proportions().tolist()))
        history_b.append((b.mixture().version, b.proportions().tolist()))
    assert history_a == history_b and len(history_a) > 8


def test_paper_settings_are_the_defaults():
    for m, key in ((2, 2), (3, 3), (4, 3), (7, 7), (9, 7)):
        policy = AioliPolicy(m)
        s = AIOLI_PAPER_SETTINGS[key]
        assert (policy.lp_rounds, policy.eta, policy.ema, policy.one_hot_factor) == (
            s["lp_rounds"], s["eta"], s["ema"], s["one_hot_factor"])
        assert paper_setting(m) == s
        if m == key:
            assert (policy.lp_steps, policy.steps_per_round) == (s["lp_steps"], s["steps_per_round"])
    assert AioliPolicy(2).steps_per_round == 218 and AioliPolicy(7).steps_per_round == 60
    assert AioliPolicy(3).update == "eg" and AioliPolicy(3).normalize


def _round(policy):
    return policy.lp_rounds * policy.lp_steps * policy.m + policy.steps_per_round


def test_round_length_and_learnparams_share_of_the_nearest_paper_m():
    # m = 4 keeps m = 3's 250-step round and ~29% LearnParams share (was 4 x 6 x 4 + 178 = 274)
    four = AioliPolicy(4)
    assert _round(four) == 250 and (four.lp_steps, four.steps_per_round) == (4, 186)
    # m = 8 keeps m = 7's 200-step round, 72% sweeps (paper m = 7: 70%; was 160 of 220, 73%)
    eight = AioliPolicy(8)
    assert _round(eight) == 200 and eight.lp_rounds * eight.lp_steps * 8 == 144


@pytest.mark.parametrize("m, total", [(2, 5000), (3, 5000), (7, 40000)])
def test_total_steps_at_the_paper_budget_gives_the_papers_rounds(m, total):
    policy = AioliPolicy(m, total_steps=total)
    s = AIOLI_PAPER_SETTINGS[m]
    assert (policy.lp_steps, policy.steps_per_round) == (s["lp_steps"], s["steps_per_round"])
    assert policy.rounds == {2: 20, 3: 20, 7: 200}[m]


@pytest.mark.parametrize("m, total", [(2, 300), (3, 61), (4, 300), (4, 1000), (8, 500), (5, 97)])
def test_fitted_rounds_end_on_a_learned_mixture(m, total):
    """Drive the policy through the run's budget: every LearnParams pass completes, and the last
    mixture (trained to the end, at least one step) is a learned one."""
    policy = AioliPolicy(m, total_steps=total)
    key = 2 if m <= 2 else 3 if m <= 4 else 7
    share = AIOLI_PAPER_SETTINGS[key]["lp_rounds"] * AIOLI_PAPER_SETTINGS[key]["lp_steps"] * key / (
        AIOLI_PAPER_SETTINGS[key]["lp_rounds"] * AIOLI_PAPER_SETTINGS[key]["lp_steps"] * key
        + AIOLI_PAPER_SETTINGS[key]["steps_per_round"])
    lp = policy.lp_rounds * policy.lp_steps * m
    assert abs(lp / _round(policy) - share) < 0.12
    A = np.eye(m) * 0.01 + 0.001
    trainer = LinearLawTrainer(A, np.full(m, 10.0), open_ended_steps=0)
    used = 0
    while policy.phase != "final":
        mix = policy.mixture()
        used += max(mix.steps, 1)
        trainer.run_mixture(policy)
    assert policy.round == policy.rounds and policy.learn is None
    assert used <= total - 1, "the learned mixture gets at least one step"
    assert total - used < lp + policy.steps_per_round + 1  # no room was left for another round


def test_rounds_that_cannot_fit_the_budget_are_refused():
    with pytest.raises(ValueError, match="rounds=6 do not fit total_steps=100"):
        AioliPolicy(3, lp_rounds=1, lp_steps=3, steps_per_round=10, rounds=6, total_steps=100)
    with pytest.raises(ValueError, match="too short for one Aioli round"):
        AioliPolicy(3, lp_rounds=2, lp_steps=3, total_steps=10)


@pytest.mark.parametrize("kwargs, message", [
    (dict(one_hot_factor=1 / 3), r"one_hot_factor must be in \(1/m, 1\]"),
    (dict(update="adam"), "unknown update 'adam'; choose one of ema, eg"),
    (dict(anchor="prior"), "unknown anchor 'prior'; choose one of initial, uniform"),
    (dict(ema=1.0), r"ema must be in \[0, 1\)"),
    (dict(lp_steps=0), "lp_steps must be >= 1"),
    (dict(rounds=0), "rounds must be >= 1 or None"),
    (dict(eta=0.0), "eta must be a finite number > 0"),
    (dict(prior_steps=-1), "prior_steps must be >= 0"),
])
def test_invalid_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AioliPolicy(3, **kwargs)
    with pytest.raises(ValueError, match="num_domains must be >= 2 for Aioli"):
        AioliPolicy(1)

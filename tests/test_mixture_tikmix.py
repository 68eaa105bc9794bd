"""TiKMiX-D and TiKMiX-M: hand-computed steps, regression recovery, moving toward a known
optimum, version attribution, bad feedback, resumption."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mixflow.mixture.mixture_regression import MixtureRegression, kl_trust_region_ascent
from mixflow.mixture.policy import Feedback, FeedbackWarning
from mixflow.mixture.schedule import ExactSchedule
from mixflow.mixture.tikmix import TiKMiXDPolicy, TiKMiXMPolicy


def softmax_times(p, z):
    w = np.asarray(p) * np.exp(np.asarray(z) - np.max(z))
    return w / w.sum()


# --- TiKMiX-D -------------------------------------------------------------------------

def test_tikmix_d_step_by_hand():
    policy = TiKMiXDPolicy(3, tau=0.5, reports_per_update=2, initial=[0.5, 0.3, 0.2])
    assert not policy.observe(Feedback(0, 1, grad_dot_val=np.array([1.0, -2.0, np.nan])))
    assert policy.proportions().tolist() == [0.5, 0.3, 0.2]
    assert policy.observe(Feedback(0, 2, grad_dot_val=np.array([3.0, 0.0, 1.0])))
    # I = mean = [2, -1, 1]; / max|I| = [1, -0.5, 0.5]; p ∝ p * exp(0.5 * I)
    w = np.array([0.5 * math.exp(0.5), 0.3 * math.exp(-0.25), 0.2 * math.exp(0.25)])
    assert np.allclose(policy.proportions(), w / w.sum(), atol=1e-15)
    assert policy.mixture().version == 1 and policy.updates == 1


def test_tikmix_d_unnormalised_and_missing_domains():
    policy = TiKMiXDPolicy(3, tau=2.0, reports_per_update=1, normalize=False)
    assert policy.observe(Feedback(0, 1, grad_dot_val=np.array([0.1, np.nan, 0.3])))
    # the domain with no value takes the others' mean 0.2: p ∝ exp(2 * [0.1, 0.2, 0.3])
    assert np.allclose(policy.proportions(), softmax_times(np.ones(3), [0.2, 0.4, 0.6]), atol=1e-15)
    assert not policy.observe(Feedback(1, 2, grad_dot_val=np.array([np.nan] * 3)))  # no information
    assert policy.mixture().version == 1


def test_tikmix_d_closed_form_is_the_kl_regularised_maximiser():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4))
    I = rng.normal(size=4)
    tau = 0.7
    policy = TiKMiXDPolicy(4, tau=tau, normalize=False, initial=p)
    q = policy.influence_step(I)
    q = q / q.sum()

    def objective(x):
        return x @ I - np.sum(x * np.log(x / p)) / tau

    for _ in range(200):  # no random simplex point does better
        x = rng.dirichlet(np.ones(4))
        assert objective(x) <= objective(q) + 1e-12


def test_tikmix_d_uses_older_versions_and_rejects_inf():
    policy = TiKMiXDPolicy(2, tau=1.0, reports_per_update=1, floor=0.2)
    assert policy.observe(Feedback(0, 1, grad_dot_val=np.array([5.0, -5.0])))
    assert policy.observe(Feedback(0, 2, grad_dot_val=np.array([5.0, -5.0])))  # version 0 after 1: used
    assert policy.mixture().version == 2
    before = policy.proportions().copy()
    with pytest.warns(FeedbackWarning, match="grad_dot_val"):
        assert not policy.observe(Feedback(2, 3, grad_dot_val=np.array([np.inf, 1.0])))
    with pytest.warns(FeedbackWarning, match="counts"):
        assert not policy.observe(Feedback(2, 3, grad_dot_val=np.array([1.0, 1.0]), counts=np.array([-1.0, 2.0])))
    assert policy.proportions().tolist() == before.tolist()
    assert policy.proportions().min() >= 0.2 - 1e-12 and policy.proportions().sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"feedback.grad_dot_val must have shape \(2,\)"):
        policy.observe(Feedback(2, 3, grad_dot_val=np.array([1.0])))


def test_tikmix_d_state_round_trip():
    rng = np.random.default_rng(5)
    reports = [rng.normal(size=3) for _ in range(40)]
    a = TiKMiXDPolicy(3, tau=0.3, reports_per_update=3)
    for i, g in enumerate(reports[:17]):
        a.observe(Feedback(a.mixture().version, i, grad_dot_val=g))
    b = TiKMiXDPolicy(3, tau=0.3, reports_per_update=3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for i, g in enumerate(reports[17:]):
        a.observe(Feedback(a.mixture().version, i, grad_dot_val=g))
        b.observe(Feedback(b.mixture().version, i, grad_dot_val=g))
        assert a.proportions().tolist() == b.proportions().tolist()
    assert a.updates == 13


# --- regression helpers ----------------------------------------------------------------

def test_quadratic_regression_recovers_an_exact_model():
    rng = np.random.default_rng(1)
    X = rng.dirichlet(np.ones(3), size=30)
    Q = np.array([[-2.0, 0.5, 0.0], [0.5, -1.0, 0.2], [0.0, 0.2, -3.0]])
    c = np.array([1.0, 0.0, -0.5])
    y = X @ c + np.einsum("ki,ij,kj->k", X, Q, X)
    model = MixtureRegression(3, degree=2, ridge=0.0)
    model.fit(X, y)
    Xt = rng.dirichlet(np.ones(3), size=10)
    assert np.allclose(model.predict(Xt), Xt @ c + np.einsum("ki,ij,kj->k", Xt, Q, Xt), atol=1e-9)
    q = np.array([0.2, 0.3, 0.5])
    # the gradient is determined only up to a constant on the simplex: compare differences
    g, g_true = model.gradient(q), c + 2 * Q @ q
    assert np.allclose(g - g.mean(), g_true - g_true.mean(), atol=1e-8)
    with pytest.raises(ValueError, match="degree must be 1"):
        MixtureRegression(3, degree=3)


def test_trust_region_ascent_linear_closed_form():
    model = MixtureRegression(3, degree=1)
    model.linear = np.array([1.0, -1.0, 0.5])
    p = np.array([0.2, 0.5, 0.3])
    q = kl_trust_region_ascent(model, p, tau=0.8)
    assert np.allclose(q, softmax_times(p, 0.8 * model.linear), atol=1e-12)


# --- TiKMiX-M --------------------------------------------------------------------------

def test_tikmix_m_linear_step_by_hand():
    # Influence is constant I_true; each window's record is y = x . I_true for the realised x.
    I_true = np.array([0.3, -0.1, 0.6])
    policy = TiKMiXMPolicy(3, target="influence", degree=1, ridge=0.0, min_records=3, tau=0.5,
                           reports_per_update=1, seed=0)
    xs = [np.array([6.0, 1.0, 1.0]), np.array([1.0, 6.0, 1.0]), np.array([2.0, 2.0, 4.0])]
    for k, counts in enumerate(xs):
        v = policy.mixture().version
        assert policy.observe(Feedback(v, k, counts=counts, grad_dot_val=I_true))
    y = np.array([c / c.sum() @ I_true for c in xs])
    assert np.allclose(policy.records_y, y)
    # standardised fit: theta = (I_true - mean y) / std y; ascent: p0 * exp(tau * theta)
    expected = softmax_times(np.full(3, 1 / 3), 0.5 * I_true / y.std())
    assert np.allclose(policy.proportions(), expected, atol=1e-10)


def test_tikmix_m_explores_with_seeded_dirichlet_until_min_records():
    a = TiKMiXMPolicy(3, reports_per_update=1, min_records=4, seed=3)
    b = TiKMiXMPolicy(3, reports_per_update=1, min_records=4, seed=3)
    c = TiKMiXMPolicy(3, reports_per_update=1, min_records=4, seed=4)
    for policy in (a, b, c):
        for k in range(3):
            policy.observe(Feedback(policy.mixture().version, k, counts=np.array([3.0, 3.0, 2.0]),
                                    grad_dot_val=np.array([1.0, 0.0, 0.5])))
    assert a.proportions().tolist() == b.proportions().tolist() != c.proportions().tolist()
    assert a.centre.tolist() == [1 / 3] * 3  # exploration does not move the trust region


class ConcaveEffectTrainer:
    """Each step's samples come from the exact schedule; the domain-mean eval loss drops by
    ``0.01 * steps * (1 - ||x - x_star||^2)`` for the realised composition x."""

    def __init__(self, x_star, seed=0):
        self.x_star = np.asarray(x_star, dtype=np.float64)
        self.m = len(self.x_star)
        self.schedule = ExactSchedule(self.m, np.random.default_rng(seed))
        self.loss = 100.0
        self.step = 0

    def run_mixture(self, policy, batch=10):
        mix = policy.mixture()
        self.schedule.set_mixture(mix.p, mix.version)
        for _ in range(mix.steps):
            counts = np.bincount(self.schedule.take(batch), minlength=self.m).astype(float)
            x = counts / counts.sum()
            self.loss -= 0.01 * (1.0 - np.sum((x - self.x_star) ** 2))
            self.step += 1
            policy.observe(Feedback(mix.version, self.step, counts=counts))
        policy.observe(Feedback(mix.version, self.step, eval_loss=np.full(self.m, self.loss)))


def test_tikmix_m_eval_target_moves_toward_the_best_mixture():
    x_star = np.array([0.6, 0.3, 0.1])
    policy = TiKMiXMPolicy(3, target="eval_loss", steps_per_update=10, degree=2, ridge=1e-4, tau=1.0,
                           min_records=12, explore=3.0, seed=2)
    first = policy.mixture()
    assert (first.version, first.steps, first.eval_after) == (0, 0, True)
    trainer = ConcaveEffectTrainer(x_star)
    distances = []
    for _ in range(40):
        trainer.run_mixture(policy)
        mix = policy.mixture()
        assert (mix.steps, mix.eval_after) == (10, True)
        distances.append(np.linalg.norm(mix.p - x_star))
    assert len(policy.records_y) == 39
    assert distances[-1] < 0.05
    assert distances[-1] < np.linalg.norm(np.full(3, 1 / 3) - x_star) / 5
    assert policy.ignored_reports == 0


def test_tikmix_m_ignores_other_versions_and_rejects_bad_losses():
    policy = TiKMiXMPolicy(2, target="eval_loss", steps_per_update=2, floor=0.1, seed=0)
    assert not policy.observe(Feedback(3, 1, eval_loss=np.array([1.0, 1.0])))
    assert policy.ignored_reports == 1
    for bad in ([np.nan, np.nan], [np.inf, 1.0], [-1.0, 1.0]):
        with pytest.warns(FeedbackWarning, match="rejected feedback eval_loss"):
            assert not policy.observe(Feedback(0, 1, eval_loss=np.array(bad)))
    assert policy.baseline_loss is None and policy.mixture().version == 0
    assert policy.observe(Feedback(0, 1, eval_loss=np.array([2.0, np.nan])))  # one domain suffices
    assert policy.baseline_loss == 2.0
    p = policy.proportions()
    assert p.min() >= 0.1 - 1e-12 and p.sum() == pytest.approx(1.0)


def test_tikmix_m_state_round_trip_gives_identical_future():
    x_star = np.array([0.2, 0.2, 0.6])
    kwargs = dict(target="eval_loss", steps_per_update=5, min_records=6, tau=1.0, seed=9)
    a = TiKMiXMPolicy(3, **kwargs)
    trainer_a = ConcaveEffectTrainer(x_star, seed=1)
    for _ in range(8):
        trainer_a.run_mixture(a)
    b = TiKMiXMPolicy(3, **{**kwargs, "seed": 0})
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    trainer_b = ConcaveEffectTrainer(x_star, seed=1)
    trainer_b.schedule.load_state_dict(json.loads(json.dumps(trainer_a.schedule.state_dict())))
    trainer_b.loss, trainer_b.step = trainer_a.loss, trainer_a.step
    for _ in range(10):
        trainer_a.run_mixture(a)
        trainer_b.run_mixture(b)
        assert a.proportions().tolist() == b.proportions().tolist()


@pytest.mark.parametrize("cls, kwargs, message", [
    (TiKMiXDPolicy, dict(tau=0.0), "tau must be a finite number > 0"),
    (TiKMiXDPolicy, dict(reports_per_update=0), "reports_per_update must be >= 1"),
    (TiKMiXMPolicy, dict(target="loss"), "unknown target 'loss'; choose one of influence, eval_loss"),
    (TiKMiXMPolicy, dict(min_records=80, history=64), r"min_records \(80\) must be <= history \(64\)"),
    (TiKMiXMPolicy, dict(ridge=-1.0), "ridge must be a finite number >= 0"),
    (TiKMiXMPolicy, dict(explore=0.0), "explore must be a finite number > 0"),
])
def test_invalid_parameters(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(3, **kwargs)

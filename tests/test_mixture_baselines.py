"""Baseline mixture policies: DoReMi, DoGE, Skill-It, ODM, ADO.

Hand-computed update steps (numbers written out), state round trips mid-run, rejection
of bad feedback, and one behaviour per method.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from mixflow.mixture.ado import ADOPolicy, PowerLaw, fit_power_law, fit_power_laws
from mixflow.mixture.doge import DoGEPolicy
from mixflow.mixture.doremi import DoReMiPolicy
from mixflow.mixture.odm import ODMPolicy
from mixflow.mixture.policy import Feedback, FeedbackWarning
from mixflow.mixture.skill_it import SkillItPolicy, estimate_skills_graph

NAN = float("nan")


def fb(policy, **arrays) -> Feedback:
    """A report for the policy's current version."""
    extra = arrays.pop("extra", {})
    return Feedback(version=policy.mixture().version, step=0, extra=extra,
                    **{k: None if v is None else np.asarray(v, dtype=np.float64) for k, v in arrays.items()})


# --- DoReMi -------------------------------------------------------------------------------------

def test_doremi_hand_computed_two_steps_and_average():
    policy = DoReMiPolicy(3)
    # lambda = max([3.0, 2.0, 2.5] - [2.0, 2.5, 2.0], 0) = [1.0, 0.0, 0.5]
    assert policy.observe(fb(policy, train_loss=[3.0, 2.0, 2.5], ref_loss=[2.0, 2.5, 2.0]))
    # alpha' = (1/3)[e^1, e^0, e^0.5] normalised = [0.506480, 0.186324, 0.307196]
    # alpha = 0.999 * alpha' + 0.001 / 3 = [0.506307, 0.186471, 0.307222]
    first = np.array([0.506307, 0.186471, 0.307222])
    np.testing.assert_allclose(policy.proportions(), first, atol=1e-6)
    # domain 2 has no data: lambda = [max(2.0-2.5, 0), max(3.0-2.0, 0), 0] = [0, 1, 0]
    assert policy.observe(fb(policy, train_loss=[2.0, 3.0, NAN], ref_loss=[2.5, 2.0, 1.0]))
    second = np.array([0.383397, 0.383830, 0.232772])
    np.testing.assert_allclose(policy.proportions(), second, atol=1e-6)
    assert policy.mixture().version == 2
    np.testing.assert_allclose(policy.average_weights(), (first + second) / 2, atol=1e-6)


def test_doremi_per_token_excess_clips_each_token():
    policy = DoReMiPolicy(3)
    report = fb(policy, train_loss=[2.0, NAN, 2.0], ref_loss=[2.0, NAN, 1.0],
                extra={"token_loss": [[3.0, 1.0], [], [2.0]], "ref_token_loss": [[2.0, 2.0], None, [1.0]]})
    # per token: mean(max([1, -1], 0)) = 0.5 on domain 0; the means alone would give 0
    np.testing.assert_allclose(policy.excess_loss(report), [0.5, 0.0, 1.0])
    del report.extra["token_loss"], report.extra["ref_token_loss"]
    np.testing.assert_allclose(policy.excess_loss(report), [0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="ref_token_loss"):
        policy.excess_loss(fb(policy, extra={"token_loss": [[1.0], [1.0], [1.0]]}))


def test_doremi_upweights_largest_excess_loss():
    policy = DoReMiPolicy(3)
    previous = policy.proportions()[1]
    for _ in range(5):
        policy.observe(fb(policy, train_loss=[2.1, 2.5, 2.2], ref_loss=[2.0, 2.0, 2.0]))
        assert policy.proportions()[1] > previous
        previous = policy.proportions()[1]
    assert np.argmax(policy.proportions()) == 1
    assert np.argmin(policy.proportions()) == 0


def test_doremi_ignores_reports_without_reference_losses():
    policy = DoReMiPolicy(2)
    assert not policy.observe(fb(policy, train_loss=[1.0, 2.0]))
    assert not policy.observe(fb(policy, train_loss=[NAN, NAN], ref_loss=[1.0, 1.0]))
    assert policy.mixture().version == 0


# --- DoGE ---------------------------------------------------------------------------------------

def test_doge_hand_computed_with_learning_rate_from_report():
    policy = DoGEPolicy(3, eta=1e-3, mu=1e-3)
    # eta / mu = 1, W = [0.2, -0.1, NaN -> 0]: alpha = softmax([0.2, -0.1, 0]) = [0.390694, 0.289433, 0.319873]
    assert policy.observe(fb(policy, grad_dot_val=[0.2, -0.1, NAN]))
    first = np.array([0.390694, 0.289433, 0.319873])
    np.testing.assert_allclose(policy.proportions(), first, atol=1e-6)
    # lr 2e-3 from the report doubles the step: alpha * exp(2 W) normalised
    assert policy.observe(fb(policy, grad_dot_val=[0.2, -0.1, 0.0], extra={"lr": 2e-3}))
    second = np.array([0.511409, 0.207923, 0.280667])
    np.testing.assert_allclose(policy.proportions(), second, atol=1e-6)
    np.testing.assert_allclose(policy.average_weights(), (first + second) / 2, atol=1e-6)


def test_doge_upweights_domain_aligned_with_target():
    policy = DoGEPolicy(3)
    for _ in range(10):
        policy.observe(fb(policy, grad_dot_val=[-0.5, 2.0, 0.5]))
    p = policy.proportions()
    assert p[1] > p[2] > p[0]


# --- Skill-It -----------------------------------------------------------------------------------

def test_skill_it_hand_computed_window():
    graph = np.array([[1.0, 0.5], [0.0, 1.0]])
    policy = SkillItPolicy(2, graph, eta=0.2, window=2)
    # before any eval: softmax(0.2 * A 1) = softmax([0.3, 0.2]) = [0.524979, 0.475021]
    np.testing.assert_allclose(policy.proportions(), [0.524979, 0.475021], atol=1e-6)
    # eval [2, 1]: A L = [2.5, 1] -> softmax([0.5, 0.2]) = [0.574443, 0.425557]
    assert policy.observe(fb(policy, eval_loss=[2.0, 1.0]))
    np.testing.assert_allclose(policy.proportions(), [0.574443, 0.425557], atol=1e-6)
    # + eval [1.5, 1]: A [3.5, 2] = [4.5, 2] -> softmax([0.9, 0.4]) = [0.622459, 0.377541]
    assert policy.observe(fb(policy, eval_loss=[1.5, 1.0]))
    np.testing.assert_allclose(policy.proportions(), [0.622459, 0.377541], atol=1e-6)
    # window 2 drops the first eval: A ([1.5, 1] + [1, 0.8]) = [3.4, 1.8] -> [0.579324, 0.420676]
    assert policy.observe(fb(policy, eval_loss=[1.0, 0.8]))
    np.testing.assert_allclose(policy.proportions(), [0.579324, 0.420676], atol=1e-6)


def test_skill_it_moves_toward_prerequisite_of_lossy_skills():
    # training on skill 2 also lowers the loss of skills 0 and 1 (A[2, 0] = A[2, 1] = 0.5)
    graph = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 1.0]])
    policy = SkillItPolicy(3, graph, initial=np.full(3, 1 / 3))
    # skills 0 and 1 are lossy, skill 2 is learned: A L = [3, 3, 3.5]
    policy.observe(fb(policy, eval_loss=[3.0, 3.0, 0.5]))
    p = policy.proportions()
    assert np.argmax(p) == 2 and p[2] > 1 / 3
    plain = SkillItPolicy(3, np.eye(3), initial=np.full(3, 1 / 3))
    plain.observe(fb(plain, eval_loss=[3.0, 3.0, 0.5]))
    assert np.argmin(plain.proportions()) == 2


def test_skill_it_rounds_ask_for_eval_and_ignore_stale_and_train_reports():
    policy = SkillItPolicy(2, np.eye(2), round_steps=50)
    first = policy.mixture()
    assert (first.version, first.steps, first.eval_after) == (0, 50, True)
    assert not policy.observe(fb(policy, train_loss=[1.0, 2.0]))
    assert policy.observe(Feedback(version=0, step=50, eval_loss=np.array([2.0, 1.0])))
    assert (policy.mixture().version, policy.mixture().steps, policy.mixture().eval_after) == (1, 50, True)
    # the same round reported again (version 0 < 1) is counted and ignored
    assert not policy.observe(Feedback(version=0, step=50, eval_loss=np.array([9.0, 1.0])))
    assert policy.stale_evals == 1 and len(policy.evals) == 1


def test_estimate_skills_graph_from_loss_drops():
    graph = estimate_skills_graph([2.0, 2.0], [[1.5, 1.9], [2.1, 1.0]])
    # row i = trained on i: drops [0.5, 0.1] and [-0.1 -> 0, 1.0]
    np.testing.assert_allclose(graph, [[0.5, 0.1], [0.0, 1.0]])
    per_run = estimate_skills_graph([[2.0, 2.0], [3.0, 3.0]], [[1.5, 1.9], [2.1, 1.0]])
    np.testing.assert_allclose(per_run, [[0.5, 0.1], [0.9, 2.0]])
    with pytest.raises(ValueError, match="loss_after must be a square"):
        estimate_skills_graph([1.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="skills_graph must be finite and >= 0"):
        SkillItPolicy(2, [[1.0, -0.5], [0.0, 1.0]])


# --- ODM ----------------------------------------------------------------------------------------

def test_odm_hand_computed_two_reports():
    policy = ODMPolicy(2)
    np.testing.assert_allclose(policy.proportions(), [0.5, 0.5])
    # Rhat = 0.5 * 0 + 0.5 * exp([2, 1]) = [3.694528, 1.359141]
    assert policy.observe(fb(policy, train_loss=[2.0, 1.0]))
    np.testing.assert_allclose(policy.reward, [3.694528, 1.359141], atol=1e-6)
    # eps_1 = min(1/2, sqrt(ln2/2)) = 0.5, eps_2 = sqrt(ln2/4) = 0.416277
    # softmax(0.5 Rhat) = [0.762728, 0.237272]; pi = (1 - 2 eps_2) soft + eps_2
    np.testing.assert_allclose(policy.proportions(), [0.543993, 0.456007], atol=1e-6)
    # only domain 1 sampled: Rhat_1 = 0.5 * 1.359141 + 0.5 * e^3 = 10.722339, Rhat_0 kept
    assert policy.observe(fb(policy, train_loss=[NAN, 3.0]))
    np.testing.assert_allclose(policy.reward, [3.694528, 10.722339], atol=1e-6)
    # eps_3 = sqrt(ln2/6) = 0.339889; softmax(eps_2 Rhat) -> pi = [0.356190, 0.643810]
    assert policy.exploration(3) == pytest.approx(0.339889, abs=1e-6)
    np.testing.assert_allclose(policy.proportions(), [0.356190, 0.643810], atol=1e-6)


def test_odm_exploration_floor_holds():
    policy = ODMPolicy(4)
    for t in range(1, 60):
        policy.observe(fb(policy, train_loss=[6.0, 1.0, 1.0, NAN if t % 2 else 0.5]))
        eps = min(1 / 4, math.sqrt(math.log(4) / (4 * (t + 1))))
        assert policy.exploration(t + 1) == pytest.approx(eps)
        p = policy.proportions()
        assert p.min() >= eps - 1e-12 and p.sum() == pytest.approx(1.0)
    assert np.argmax(p) == 0 and p[0] > 0.5
    assert not policy.observe(fb(policy, train_loss=[NAN] * 4))


# --- ADO ----------------------------------------------------------------------------------------

def test_ado_fit_recovers_noiseless_power_law():
    n = np.geomspace(1e3, 1e7, 40)
    for e, b, a in [(1.8, 25.0, 0.35), (0.0, 3.0, 0.05), (2.0, 100.0, 0.79)]:
        law = fit_power_law(n, e + b * n ** -a)
        assert law.irreducible == pytest.approx(e, abs=1e-6)
        assert law.scale == pytest.approx(b, rel=1e-6)
        assert law.exponent == pytest.approx(a, rel=1e-6)
    assert PowerLaw(1.0, 4.0, 0.5).decrease_rate(400.0) == pytest.approx(0.5 * 4.0 * 400.0 ** -1.5)
    with pytest.raises(ValueError, match=">= 3 distinct token counts"):
        fit_power_law([1.0, 1.0, 2.0], [3.0, 3.0, 2.0])


def _reference_fit_power_law(tokens, losses, exponent_bounds=(1e-3, 0.8), grid=64, refine_iters=60):
    """The per-domain fit ADO used before the batched one (64-point grid, then 60 golden-section
    steps, a box-constrained weighted least squares solved per exponent): the reference that
    the batched fit must reproduce, and the baseline of the CPU-time test."""
    n, loss = np.asarray(tokens, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    log_x = np.log(n / n.max())
    w = 1.0 / np.maximum(loss, 1e-12) ** 2
    e_max = float(loss.min())

    def profile(a):
        x = np.exp(-a * log_x)
        sw, swx, swxx = w.sum(), (w * x).sum(), (w * x * x).sum()
        swl, swxl = (w * loss).sum(), (w * x * loss).sum()
        candidates = []
        det = sw * swxx - swx * swx
        if det > 1e-12 * sw * swxx:
            e, b = (swxx * swl - swx * swxl) / det, (sw * swxl - swx * swl) / det
            if 0.0 <= e <= e_max and b >= 0.0:
                candidates.append((e, b))
        candidates += [(e, max((swxl - e * swx) / swxx, 0.0)) for e in (0.0, e_max)]
        candidates.append((min(max(swl / sw, 0.0), e_max), 0.0))
        return min((float((w * (loss - e - b * x) ** 2).sum()), e, b) for e, b in candidates)

    golden = (math.sqrt(5.0) - 1.0) / 2.0
    exps = np.linspace(exponent_bounds[0], exponent_bounds[1], grid)
    k = int(np.argmin([profile(a)[0] for a in exps]))
    left, right = exps[max(k - 1, 0)], exps[min(k + 1, grid - 1)]
    c, d = right - golden * (right - left), left + golden * (right - left)
    fc, fd = profile(c)[0], profile(d)[0]
    for _ in range(refine_iters):
        if fc < fd:
            right, d, fd = d, c, fc
            c = right - golden * (right - left)
            fc = profile(c)[0]
        else:
            left, c, fc = c, d, fd
            d = left + golden * (right - left)
            fd = profile(d)[0]
    _, e, b_ref, a = min((profile(a) + (a,) for a in (exps[k], c, d)), key=lambda r: r[0])
    return PowerLaw(float(e), float(b_ref * n.max() ** a), float(a))


def _random_law_points(rng, domains, low=8, high=200):
    """Points of random laws, every third domain noiseless, the others with 0.1% or 1% noise."""
    tokens, losses = [], []
    for d in range(domains):
        n = np.cumsum(rng.uniform(100, 5000, int(rng.integers(low, high))))
        e, b, a = rng.uniform(0.0, 2.5), rng.uniform(2, 60), rng.uniform(0.05, 0.75)
        noise = (0.0, 1e-3, 1e-2)[d % 3]
        tokens.append(n)
        losses.append((e + b * n ** -a) * (1 + noise * rng.normal(size=len(n))))
    return tokens, losses


def _sse(law, n, loss):
    return float((((loss - law(n)) / loss) ** 2).sum())


def test_ado_batched_fit_equals_per_domain_reference_on_random_laws():
    tokens, losses = _random_law_points(np.random.default_rng(7), 24)
    batched = fit_power_laws(tokens, losses)
    for n, loss, law in zip(tokens, losses, batched):
        ref = _reference_fit_power_law(n, loss)
        # never a worse fit (up to rounding), and the same law: the curve to 1e-7, the learning
        # speed ADO uses to 1e-6; e alone is loose along the valley e + b n^-a of noisy data
        assert _sse(law, n, loss) <= _sse(ref, n, loss) * (1 + 1e-9) + 1e-18
        np.testing.assert_allclose(law(n), ref(n), rtol=1e-7)
        assert law.decrease_rate(n[-1]) == pytest.approx(ref.decrease_rate(n[-1]), rel=1e-6)
        assert law.exponent == pytest.approx(ref.exponent, rel=1e-6)
        assert law.scale == pytest.approx(ref.scale, rel=1e-6)
        assert law.irreducible == pytest.approx(ref.irreducible, abs=1e-5)
    # one domain alone gives the law it gets in the batch; points need not be sorted
    order = np.random.default_rng(8).permutation(len(tokens[4]))
    alone = fit_power_law(tokens[4][order], losses[4][order])
    assert alone.exponent == pytest.approx(batched[4].exponent, rel=1e-9)
    assert alone.scale == pytest.approx(batched[4].scale, rel=1e-9)
    with pytest.raises(ValueError, match="domain 1: a power law needs points at >= 3 distinct token counts"):
        fit_power_laws([tokens[0], [5.0, 5.0, 6.0]], [losses[0], [2.0, 2.0, 1.0]])
    with pytest.raises(ValueError, match="tokens and losses must list the same domains"):
        fit_power_laws(tokens[:2], losses[:1])


def test_ado_incremental_refits_equal_a_fresh_fit_of_the_points():
    # grid sums kept point by point, pairs merged at max_points, refits warm-started from the
    # previous exponent: the laws still equal a fresh batched fit of the domains' points
    true = [PowerLaw(1.0, 30.0, 0.4), PowerLaw(0.5, 8.0, 0.15), PowerLaw(2.0, 50.0, 0.7)]
    policy = ADOPolicy(3, min_points=4, refit_every=1, max_points=20)
    rng = np.random.default_rng(3)
    for step in range(1, 60):
        n = 256.0 * step
        loss = np.array([law(n) for law in true]) * rng.uniform(0.995, 1.005, 3)
        loss[step % 3] = NAN  # each domain misses every third report
        policy.observe(fb(policy, train_loss=loss, tokens=[256.0] * 3))
    points = policy.points
    assert all(len(xs) <= 20 for xs, _ in points)  # each domain had 39 or 40 points: merged
    # the sums kept point by point are, bit for bit, the sums a restored policy recomputes
    restored = ADOPolicy(3, min_points=4, refit_every=1, max_points=20)
    restored.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    np.testing.assert_array_equal(restored._sums, policy._sums)
    fresh = fit_power_laws([xs for xs, _ in points], [ys for _, ys in points])
    for law, ref in zip(policy.laws, fresh):
        assert law.exponent == pytest.approx(ref.exponent, rel=1e-8)
        assert law.scale == pytest.approx(ref.scale, rel=1e-8)
        assert law.irreducible == pytest.approx(ref.irreducible, rel=1e-8, abs=1e-10)


def test_ado_64_domain_refit_costs_far_less_cpu_than_per_domain_loop():
    # CPU seconds of this process (never wall-clock): the policy's refit of 64 domains with
    # 48 and 58 points each, and a fresh batched fit of the same points, against the
    # per-domain loop of the reference fit on those points, measured here
    m, reports = 64, 60
    tokens, losses = _random_law_points(np.random.default_rng(11), m, low=reports + 1, high=reports + 2)
    policy = ADOPolicy(m, min_points=8, refit_every=10)
    refit_cpu = []
    for i in range(reports):
        trained = [n[i] - (n[i - 1] if i else 0.0) for n in tokens]
        report = fb(policy, train_loss=[loss[i] for loss in losses], tokens=trained)
        start = time.process_time()
        policy.observe(report)
        if policy.since_fit == 0 and i >= 40:  # the refits after 48 and 58 reports, of all 64 domains
            refit_cpu.append(time.process_time() - start)
    assert len(refit_cpu) == 2 and all(law is not None for law in policy.laws)
    points = policy.points
    start = time.process_time()
    reference = [_reference_fit_power_law(xs, ys) for xs, ys in points]
    loop_cpu = time.process_time() - start
    start = time.process_time()
    batched = fit_power_laws([xs for xs, _ in points], [ys for _, ys in points])
    batched_cpu = time.process_time() - start
    assert 5 * min(refit_cpu) <= loop_cpu, f"refit {refit_cpu} s vs per-domain loop {loop_cpu} s"
    assert 5 * batched_cpu <= loop_cpu, f"batched fit {batched_cpu} s vs per-domain loop {loop_cpu} s"
    n_last = points[0][0][-1]
    for fresh, ref in zip(batched, reference):
        assert fresh.decrease_rate(n_last) == pytest.approx(ref.decrease_rate(n_last), rel=1e-6)


def _ado_report(policy, n, laws, tokens=(100.0, 100.0)):
    return fb(policy, train_loss=[law(n) for law in laws], tokens=list(tokens), counts=[8.0, 8.0])


def test_ado_hand_computed_steps():
    laws = [PowerLaw(1.0, 4.0, 0.5), PowerLaw(0.5, 1.0, 0.3)]
    policy = ADOPolicy(2, min_points=4, refit_every=1)
    for n in (100.0, 200.0, 300.0):
        assert not policy.observe(_ado_report(policy, n, laws))
    assert policy.observe(_ado_report(policy, 400.0, laws))
    # h stays [0.5, 0.5] (equal counts), mu = [0.5, 0.5]; -dL/dn at n = 400:
    # 0.5 * 4 * 400^-1.5 = 2.5e-4 and 0.3 * 1 * 400^-1.3 = 1.242920e-4
    # rho = [0.66792767, 0.33207233]; pi = 0.1 rho + 0.9 mu = [0.51679277, 0.48320723]
    np.testing.assert_allclose(policy.proportions(), [0.51679277, 0.48320723], atol=1e-6)
    np.testing.assert_allclose(policy.pibar, [0.58396383, 0.41603617], atol=1e-6)
    # n = 500: rho = [0.65795593, 0.34204407]; pi = 0.1 rho + 0.9 pibar = [0.59136304, 0.40863696]
    assert policy.observe(_ado_report(policy, 500.0, laws))
    np.testing.assert_allclose(policy.proportions(), [0.59136304, 0.40863696], atol=1e-6)


def test_ado_upweights_steepest_predicted_decrease():
    laws = [PowerLaw(1.0, 1.0, 0.2), PowerLaw(1.0, 10.0, 0.5), PowerLaw(1.0, 2.0, 0.3)]
    policy = ADOPolicy(3, min_points=4, refit_every=2)
    for n in np.arange(1, 30) * 100.0:
        policy.observe(fb(policy, train_loss=[law(n) for law in laws], tokens=[100.0] * 3))
    fitted = policy.laws[1]
    assert fitted.scale == pytest.approx(10.0, rel=1e-4) and fitted.exponent == pytest.approx(0.5, rel=1e-4)
    rates = [law.decrease_rate(2900.0) for law in laws]
    p = policy.proportions()
    assert np.argmax(rates) == 1 and np.argmax(p) == 1 and p[1] > 1 / 3


def test_ado_floor_and_point_merging():
    laws = [PowerLaw(1.0, 50.0, 0.8), PowerLaw(1.0, 0.01, 0.01)]
    policy = ADOPolicy(2, d_min=0.2, gamma=1.0, min_points=3, refit_every=1, max_points=6)
    for n in np.arange(1, 12) * 10.0:
        policy.observe(_ado_report(policy, n, laws, tokens=(10.0, 10.0)))
        assert len(policy.points[0][0]) <= 6
    # gamma 1: pi = rho, which puts nearly everything on domain 0; d_min holds domain 1 at 0.2
    np.testing.assert_allclose(policy.proportions(), [0.8, 0.2], atol=1e-9)


def test_ado_zero_prior_domain_needs_no_law_and_gets_d_min():
    laws = [PowerLaw(1.0, 4.0, 0.5), PowerLaw(0.5, 1.0, 0.3)]
    policy = ADOPolicy(3, prior=[0.5, 0.5, 0.0], initial=[0.5, 0.5, 0.0], min_points=3, refit_every=1)
    for n in (100.0, 200.0):
        assert not policy.observe(fb(policy, train_loss=[laws[0](n), laws[1](n), NAN], tokens=[100, 100, 0]))
    assert policy.observe(fb(policy, train_loss=[laws[0](300.0), laws[1](300.0), NAN], tokens=[100, 100, 0]))
    assert policy.laws[2] is None
    assert policy.proportions()[2] == pytest.approx(0.01)


# --- shared contract: state round trip, bad feedback, parameter errors -----------------------------

def _doremi_report(policy, rng):
    return fb(policy, train_loss=rng.uniform(2, 4, 3), ref_loss=rng.uniform(2, 3, 3))


def _doge_report(policy, rng):
    return fb(policy, grad_dot_val=rng.normal(size=3), extra={"lr": float(rng.uniform(1e-3, 3e-3))})


def _skill_report(policy, rng):
    return fb(policy, eval_loss=rng.uniform(1, 3, 3))


def _odm_report(policy, rng):
    loss = rng.uniform(1, 4, 3)
    loss[rng.integers(3)] = NAN
    return fb(policy, train_loss=loss)


def _ado_random_report(policy, rng):
    step = len(policy.points[0][0]) + 1
    n = 64.0 * step
    loss = np.array([1.0 + 5 * n ** -0.4, 0.8 + 2 * n ** -0.2, 1.5 + 9 * n ** -0.6]) * rng.uniform(0.99, 1.01, 3)
    return fb(policy, train_loss=loss, tokens=[64.0] * 3, counts=rng.integers(1, 9, 3))


FACTORIES = {
    "doremi": (lambda floor: DoReMiPolicy(3, floor=floor), _doremi_report),
    "doge": (lambda floor: DoGEPolicy(3, eta=1.0, mu=4.0, floor=floor), _doge_report),
    "skill_it": (lambda floor: SkillItPolicy(3, [[1, 0.2, 0], [0, 1, 0.3], [0.5, 0, 1]], floor=floor),
                 _skill_report),
    "odm": (lambda floor: ODMPolicy(3, floor=floor), _odm_report),
    "ado": (lambda floor: ADOPolicy(3, min_points=4, refit_every=3, max_points=8, floor=floor),
            _ado_random_report),
}

BAD = {
    "doremi": [dict(train_loss=[np.inf, 1.0, 1.0], ref_loss=[1.0, 1.0, 1.0]),
               dict(train_loss=[1.0, 1.0, 1.0], ref_loss=[1.0, -1.0, 1.0])],
    "doge": [dict(grad_dot_val=[np.inf, 0.0, 0.0]), dict(grad_dot_val=[0.1, 0.0, 0.0], extra={"lr": NAN})],
    "skill_it": [dict(eval_loss=[NAN, 1.0, 1.0]), dict(eval_loss=[-1.0, 1.0, 1.0])],
    "odm": [dict(train_loss=[-1.0, 1.0, 1.0]), dict(train_loss=[1000.0, 1.0, 1.0])],
    "ado": [dict(train_loss=[np.inf, 1.0, 1.0], tokens=[1.0, 1.0, 1.0]),
            dict(train_loss=[1.0, 1.0, 1.0], tokens=[NAN, 1.0, 1.0])],
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_round_trip_mid_run_gives_identical_future(name):
    make, report = FACTORIES[name]
    rng = np.random.default_rng(0)
    policy = make(0.0)
    for _ in range(12):
        policy.observe(report(policy, rng))
    assert policy.mixture().version > 0
    restored = make(0.0)
    restored.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    for _ in range(12):
        assert policy.observe(report(policy, rng_a)) == restored.observe(report(restored, rng_b))
        assert policy.mixture().version == restored.mixture().version
        np.testing.assert_array_equal(policy.proportions(), restored.proportions())
    with pytest.raises(ValueError, match="state is for policy"):
        (DoReMiPolicy(3) if name != "doremi" else ODMPolicy(3)).load_state_dict(policy.state_dict())


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_bad_feedback_is_rejected_with_warning_and_p_stays_valid(name):
    make, report = FACTORIES[name]
    rng = np.random.default_rng(2)
    policy = make(0.05)
    for _ in range(8):
        policy.observe(report(policy, rng))
    before, version = policy.proportions().copy(), policy.mixture().version
    for bad in BAD[name]:
        with pytest.warns(FeedbackWarning, match="rejected feedback"):
            assert not policy.observe(fb(policy, **bad))
        np.testing.assert_array_equal(policy.proportions(), before)
        assert policy.mixture().version == version
    assert policy.proportions().min() >= 0.05 - 1e-12 and policy.proportions().sum() == pytest.approx(1.0)
    policy.observe(report(policy, rng))
    assert policy.proportions().min() >= 0.05 - 1e-12


@pytest.mark.parametrize("build, message", [
    (lambda: DoReMiPolicy(2, eta=0.0), "eta must be a finite number > 0"),
    (lambda: DoReMiPolicy(2, smoothing=1.5), r"smoothing must be in \[0, 1\]"),
    (lambda: DoGEPolicy(2, mu=-1.0), "mu must be a finite number > 0"),
    (lambda: SkillItPolicy(2, np.eye(3)), r"skills_graph must have shape \(2, 2\)"),
    (lambda: SkillItPolicy(2, np.eye(2), window=0), "window must be an integer >= 1"),
    (lambda: ODMPolicy(2, smoothing=1.0), r"smoothing must be in \[0, 1\)"),
    (lambda: ADOPolicy(4, d_min=0.3), r"d_min must be in \[0, 1/num_domains\]"),
    (lambda: ADOPolicy(2, min_points=2), "min_points must be an integer >= 3"),
])
def test_parameter_errors_name_the_parameter(build, message):
    with pytest.raises(ValueError, match=message):
        build()

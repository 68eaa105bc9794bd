"""benchmarks/aioli_defaults.py, the evidence Aioli's ``update="eg"`` default cites: its
simulation drives the real policy through every eval it asks for, and on a linear mixing
law EG ends further from uniform and lower in loss than the EMA variant."""

from __future__ import annotations

import numpy as np

from benchmarks.aioli_defaults import make_law, run, simulate
from mixflow.mixture.aioli import AioliPolicy


def test_simulation_follows_the_policys_protocol_to_its_learned_mixture():
    A = make_law(3, np.random.default_rng(0))
    policy = AioliPolicy(3, total_steps=600, seed=0)
    final, p = simulate(policy, A, "fixed", 600, seed=0)
    assert policy.round == policy.rounds >= 1            # every round's evals arrived
    assert policy.mixture().steps is None               # and it ended on its learned mixture
    np.testing.assert_allclose(p, policy.mixture().p)
    assert (final < 5.0).all()
    strat, uniform = simulate(None, A, "fixed", 600, seed=0)
    np.testing.assert_allclose(uniform, 1 / 3)
    assert not np.allclose(final, strat)


def test_eg_beats_ema_on_the_linear_law():
    rows = {(r["law"], r["update"]): r for r in run(seeds=2, steps=800, domains=[2])}
    for law in ("fixed", "saturating"):
        eg, ema = rows[(law, "eg")], rows[(law, "ema")]
        assert eg["gain_mean"] > ema["gain_mean"]
        assert eg["l1_from_uniform"] > 2 * ema["l1_from_uniform"]

"""Static and stratified policies: fixed mixtures, floor, feedback still checked, state."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mixflow.mixture.policy import Feedback, FeedbackWarning
from mixflow.mixture.static import StaticPolicy, StratifiedPolicy


def test_static_keeps_its_normalised_floored_p_whatever_the_feedback():
    policy = StaticPolicy(3, p=[2.0, 1.0, 0.0], floor=0.1)
    # floor: 0.1 for the empty domain, the other 0.9 split 2:1
    assert np.allclose(policy.proportions(), [0.6, 0.3, 0.1])
    for step in range(5):
        assert not policy.observe(Feedback(0, step, train_loss=np.array([5.0, 1.0, np.nan]),
                                           eval_loss=np.array([3.0, 2.0, 1.0])))
    assert policy.mixture().version == 0 and np.allclose(policy.proportions(), [0.6, 0.3, 0.1])


def test_stratified_is_uniform():
    policy = StratifiedPolicy(4)
    assert policy.proportions().tolist() == [0.25] * 4
    assert (policy.mixture().steps, policy.mixture().eval_after) == (None, False)


@pytest.mark.parametrize("field", ["train_loss", "eval_loss", "ref_loss"])
@pytest.mark.parametrize("bad", [np.inf, -1.0])
def test_bad_losses_warn_and_change_nothing(field, bad):
    policy = StratifiedPolicy(2, floor=0.2)
    with pytest.warns(FeedbackWarning, match=f"rejected feedback {field}"):
        assert not policy.observe(Feedback(0, 1, **{field: np.array([bad, 1.0])}))
    assert policy.proportions().tolist() == [0.5, 0.5]


def test_state_round_trip_and_wrong_policy():
    a = StaticPolicy(3, p=[0.5, 0.25, 0.25])
    state = json.loads(json.dumps(a.state_dict()))
    b = StaticPolicy(3, p=[1.0, 1.0, 1.0])
    b.load_state_dict(state)
    assert b.proportions().tolist() == [0.5, 0.25, 0.25]
    with pytest.raises(ValueError, match="state is for policy 'static' with m=3, not 'stratified'"):
        StratifiedPolicy(3).load_state_dict(state)


def test_invalid_p():
    with pytest.raises(ValueError, match=r"initial must have shape \(3,\)"):
        StaticPolicy(3, p=[0.5, 0.5])
    with pytest.raises(ValueError, match="initial must be finite and >= 0"):
        StaticPolicy(2, p=[-0.5, 1.5])

"""The mixture controller journals its events and a restarted controller replays them to the same state."""

from __future__ import annotations

import time

import numpy as np
import pytest

from mixflow.runtime.mixture_controller import MixtureController

pytestmark = pytest.mark.timeout(120)


def drive(ray, ctl, steps, start=0, seed=0):
    """Two ranks: ask each step's mixture, then report a train loss per domain."""
    rng = np.random.default_rng(seed)
    for step in range(start, start + steps):
        mix = ray.get(ctl.mixture_for_step.remote(step))
        for rank in (0, 1):
            msg = {"version": mix["version"], "step": step, "train_loss": (1 + rng.random(3)).tolist(),
                   "tokens": [64, 64, 64], "counts": [2, 1, 1]}
            ray.get(ctl.report.remote(rank, "train", msg))


def restart(ray, ctl):
    pid = ray.get(ctl.pid.remote())
    ray.kill(ctl, no_restart=False)
    deadline = time.monotonic() + 60
    while ray.get(ctl.pid.remote()) == pid:  # calls are retried until the restarted actor answers
        assert time.monotonic() < deadline, "the controller did not restart"
        time.sleep(0.1)


def test_restarted_controller_replays_snapshot_and_journal_to_the_same_state(ray_session, tmp_path):
    ray = ray_session
    path = tmp_path / "controller_state.json"
    ctl = MixtureController.remote("odm", {}, 3, 2, str(path))
    drive(ray, ctl, 60)
    before = ray.get(ctl.state_dict.remote())
    assert before["policy"]["version"] > 5, "the policy moved"
    assert path.exists() and (tmp_path / "controller_state.json.journal").exists()
    restart(ray, ctl)
    assert ray.get(ctl.state_dict.remote()) == before
    assert ray.get(ctl.stats.remote())["restored"] is True
    drive(ray, ctl, 5, start=60, seed=1)  # and it goes on from there
    assert len(ray.get(ctl.get_merged_log.remote())) == 65
    ray.kill(ctl, no_restart=True)


def test_a_new_controller_starts_a_new_journal_and_a_resumed_one_restarts_from_its_journal(ray_session, tmp_path):
    ray = ray_session
    path = tmp_path / "controller_state.json"
    first = MixtureController.remote("odm", {}, 3, 2, str(path))
    drive(ray, first, 20)
    checkpoint = ray.get(first.state_dict.remote())
    ray.kill(first, no_restart=True)

    fresh = MixtureController.remote("odm", {}, 3, 2, str(path))  # same run dir, no checkpoint: starts over
    state = ray.get(fresh.state_dict.remote())
    assert state["policy"]["version"] == 0 and len(state["trajectory"]) == 1 and state["merged_log"] == []
    ray.kill(fresh, no_restart=True)

    resumed = MixtureController.remote("odm", {}, 3, 2, str(path), checkpoint)
    assert ray.get(resumed.state_dict.remote()) == checkpoint
    drive(ray, resumed, 10, start=20, seed=2)
    live = ray.get(resumed.state_dict.remote())
    restart(ray, resumed)
    assert ray.get(resumed.state_dict.remote()) == live, "the restart continues from the journal, not the checkpoint"
    ray.kill(resumed, no_restart=True)

"""Hostile or hand-edited pipeline states are refused, naming the field, within seconds (pure: no Ray).

A valid position is one the rank's mixer can produce: :func:`_walk` replays its round-robin
walk over the reader slots (``mixflow.runtime.mixer_actor``) and every position it passes
must validate; everything else names the first wrong field.
"""

from __future__ import annotations

import copy
import json

import pytest

from mixflow.data.listing import list_shards
from mixflow.runtime import image_checkpoint as ckpt
from tests.conftest import make_spec

pytestmark = pytest.mark.timeout(60)

SECTIONS = {"trainer": {"ranks": 2, "epochs": 2, "batch_size": 32, "model": "none"},
            "runtime": {"readers_per_rank": 2, "prefetch": 2}}


@pytest.fixture()
def setup(digits_shards, tmp_path):
    spec = make_spec(digits_shards, tmp_path, **SECTIONS)
    shards = list_shards(digits_shards)
    return spec, shards, ckpt.initial_state(spec, shards)


def _walk(lengths: list[int], bs: int, epoch: int = 0) -> list[dict]:
    """Every position the mixer passes in an epoch (``on_error: raise``): after each batch."""
    k, starts, step, out = len(lengths), [0] * len(lengths), 0, []
    batches = [-(-n // bs) for n in lengths]
    for entry in range(k * max(batches)):
        slot, index = entry % k, entry // k
        if index < batches[slot]:
            starts[slot] = min((index + 1) * bs, lengths[slot])
            step += 1
            out.append({"epoch": epoch, "step": step, "cursor": entry + 1, "starts": list(starts)})
    return out


def _refused(state, spec, shards) -> str:
    with pytest.raises(ValueError) as err:
        ckpt.check_resumable(state, spec, shards)
    return str(err.value)


def _with(state: dict, rank: int, **position) -> dict:
    out = copy.deepcopy(state)
    out["rank_states"][rank]["position"].update(position)
    return out


def test_every_position_the_mixer_produces_is_accepted(setup):
    spec, shards, state = setup
    rows = ckpt.epoch_rows(shards, 7, 4, 1, 4, [])
    def at(rank: int, pos: dict) -> dict:  # rank at ``pos``, the other one at the epoch's start
        return {**state, "epoch": 1, "rank_states": [
            {"position": pos if r == rank else ckpt.fresh_position(1), "skipped": []} for r in (0, 1)]}

    for rank in (0, 1):
        positions = _walk([len(rows[2 * rank]), len(rows[2 * rank + 1])], 32, epoch=1)
        assert len(positions) > 20
        for pos in positions:
            ckpt.check_resumable(json.loads(json.dumps(at(rank, pos))), spec, shards)
        ckpt.check_resumable(at(rank, {**positions[-1], "done": True}), spec, shards)


def test_the_reported_hostile_states_are_refused_naming_the_field(setup):
    spec, shards, state = setup
    rows = ckpt.epoch_rows(shards, 7, 4, 0, 4, [])
    n = len(rows[2])  # rank 1's first reader slot
    assert _refused(_with(state, 1, starts=[-50, 0]), spec, shards) == (
        f"resume_from: rank_states[1].position.starts[0]: -50 is outside 0..{n}")
    assert _refused(_with(state, 1, starts=[100000, 0]), spec, shards) == (
        f"resume_from: rank_states[1].position.starts[0]: 100000 is outside 0..{n}")
    last = _walk([len(rows[2]), len(rows[3])], 32)[-1]["cursor"]
    assert _refused(_with(state, 1, step=999, cursor=999), spec, shards) == (
        f"resume_from: rank_states[1].position.cursor: 999 is outside 0..{last}")
    assert _refused(_with(state, 0, step=999), spec, shards) == (
        "resume_from: rank_states[0].position.step: 999 does not follow from cursor 0 (0 batches end before it)")
    assert _refused({"format": ckpt.FORMAT}, spec, shards).startswith(
        "resume_from: the state lacks field(s) stream, epoch, ranks, readers_per_rank, cuts, "
        "skipped_before_cuts, rank_states")


def test_inconsistent_positions_name_the_field(setup):
    spec, shards, state = setup
    # Cursor 5 with 2 slots: slot 0 is at batch 3 (row 96), slot 1 at batch 2 (row 64), 5 batches.
    ckpt.check_resumable(_with(state, 0, step=5, cursor=5, starts=[96, 64]), spec, shards)
    assert _refused(_with(state, 0, step=4, cursor=5, starts=[96, 64]), spec, shards).endswith(
        "rank_states[0].position.step: 4 does not follow from cursor 5 (5 batches end before it)")
    assert _refused(_with(state, 0, step=5, cursor=5, starts=[96, 65]), spec, shards).endswith(
        "rank_states[0].position.starts[1]: 65 does not follow from cursor 5 (reader slot 1's next batch "
        "is 2, which starts at 64)")
    assert "rank_states[0].position.starts: must hold 2 entries, got 1" in _refused(
        _with(state, 0, step=5, cursor=5, starts=[96]), spec, shards)
    assert "rank_states[0].position.starts: is null but cursor is 5" in _refused(
        _with(state, 0, step=5, cursor=5, starts=None), spec, shards)
    assert "rank_states[1].position.cursor: must be an integer, got '5'" in _refused(
        _with(state, 1, cursor="5"), spec, shards)
    assert "rank_states[1].position.step: must be an integer, got True" in _refused(
        _with(state, 1, step=True), spec, shards)
    assert "rank_states[0].position.epoch: 1 is not the state's epoch 0" in _refused(
        _with(state, 0, epoch=1), spec, shards)
    assert "rank_states[0].position.done: must be true or false, got 'yes'" in _refused(
        _with(state, 0, done="yes"), spec, shards)
    assert "rank_states[0].position.cursor: 3 is not the end of the epoch" in _refused(
        _with(state, 0, step=3, cursor=3, starts=[64, 32], done=True), spec, shards)
    del state["rank_states"][0]["position"]["cursor"]
    assert "rank_states[0].position.cursor: is missing" in _refused(state, spec, shards)


def test_bad_state_fields_are_named(setup):
    spec, shards, state = setup
    assert _refused({**state, "ranks": 3}, spec, shards) == "resume_from: rank_states: must hold 3 entries, got 2"
    assert _refused({**state, "ranks": 0}, spec, shards) == "resume_from: ranks: 0 is outside 1..4096"
    assert _refused({**state, "epoch": -1}, spec, shards) == "resume_from: epoch: -1 must be >= 0"
    assert _refused({**state, "readers_per_rank": "2"}, spec, shards) == (
        "resume_from: readers_per_rank: must be an integer, got '2'")
    rows = ckpt.epoch_rows(shards, 7, 4, 0, 4, [])
    assert _refused({**state, "cuts": [{"readers": 4, "consumed": [1, 2, 3, 1000]}]}, spec, shards) == (
        f"resume_from: cuts[0].consumed[3]: 1000 is outside 0..{len(rows[3])}")
    assert _refused({**state, "cuts": [{"readers": 4, "consumed": [1, 2]}]}, spec, shards) == (
        "resume_from: cuts[0].consumed: must hold 4 entries, got 2")
    bad = copy.deepcopy(state)
    bad["rank_states"][1]["skipped"] = [{"key": "k", "reason": "bad"}]
    assert _refused(bad, spec, shards) == "resume_from: rank_states[1].skipped[0].shard: is missing"
    assert _refused({**state, "checkpoints": [3, 4]}, spec, shards) == (
        "resume_from: checkpoints[0]: must be a file path, got 3")
    assert "rank_states[0]: must be an object with position and skipped" in _refused(
        {**state, "rank_states": [{}, {}]}, spec, shards)


def test_skip_mode_positions_are_bounded_by_the_plan(digits_shards, tmp_path):
    spec = make_spec(digits_shards, tmp_path, **SECTIONS, on_error="skip")
    shards = list_shards(digits_shards)
    state = ckpt.initial_state(spec, shards)
    # A bad row in slot 0's first batch: that batch ends at 33, not 32.
    ckpt.check_resumable(_with(state, 0, step=2, cursor=2, starts=[33, 32]), spec, shards)
    ckpt.check_resumable(_with(state, 0, step=2, cursor=2, starts=[32, 32]), spec, shards)
    assert _refused(_with(state, 0, step=2, cursor=2, starts=[31, 32]), spec, shards).endswith(
        "rank_states[0].position.starts[0]: 31 is outside 32..458 (batch 1 of reader slot 0 starts at row 32 "
        "or later)")
    assert "rank_states[0].position.step: 3 is outside 2..2" in _refused(
        _with(state, 0, step=3, cursor=2, starts=[33, 32]), spec, shards)
    assert "rank_states[0].position.starts[1]: 5: reader slot 1 has delivered no batch" in _refused(
        _with(state, 0, step=1, cursor=1, starts=[33, 5]), spec, shards)


def test_feed_positions_are_checked_with_the_same_rules(setup):
    spec, shards, state = setup
    stream = state["stream"]
    ckpt.validate_feed_position({"epoch": 1, "step": 5, "cursor": 5, "starts": [96, 64]}, stream, 0, 2, 2)
    ckpt.validate_feed_position(ckpt.fresh_position(0), stream, 1, 2, 2)
    with pytest.raises(ValueError, match=r"^load_state_dict: position.starts\[0\]: -50 is outside 0\.\.\d+$"):
        ckpt.validate_feed_position({"epoch": 0, "step": 0, "cursor": 0, "starts": [-50, 0]}, stream, 1, 2, 2)
    with pytest.raises(ValueError, match=r"^load_state_dict: position.epoch: must be an integer, got None$"):
        ckpt.validate_feed_position({"step": 0}, stream, 1, 2, 2)
    with pytest.raises(ValueError, match=r"^load_state_dict: skipped\[0\]: must be a quarantine record"):
        ckpt.validate_records([3], "skipped", prefix="load_state_dict")


def test_absurd_reader_counts_are_refused_before_any_planning(setup):
    spec, shards, state = setup
    assert _refused({**state, "readers_per_rank": 10**9}, spec, shards) == (
        "resume_from: readers_per_rank: 1000000000 is outside 1..2048")
    assert _refused({**state, "cuts": [{"readers": 10**9, "consumed": []}]}, spec, shards) == (
        "resume_from: cuts[0].readers: 1000000000 is outside 1..4096")

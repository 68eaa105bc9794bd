"""The controller's durable state: snapshot + journal, replayed after a restart, I/O linear in the run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mixflow.runtime import state_journal
from mixflow.runtime.state_journal import StateJournal


def test_entries_come_back_in_order_after_the_snapshot(tmp_path):
    j = StateJournal(tmp_path / "s.json")
    j.compact({"items": []})
    for i in range(5):
        j.append({"i": i})
    j.close()
    state, entries = StateJournal(tmp_path / "s.json").load()
    assert state == {"items": []} and entries == [{"i": i} for i in range(5)]


def test_compaction_keeps_only_the_events_after_the_snapshot(tmp_path, monkeypatch):
    monkeypatch.setattr(state_journal, "MIN_COMPACT_BYTES", 100)
    j = StateJournal(tmp_path / "s.json")
    items: list[int] = []
    j.compact({"items": items})
    compactions = 0
    for i in range(50):
        items.append(i)
        j.append({"i": i})
        if j.should_compact():
            j.compact({"items": items})
            compactions += 1
    j.close()
    state, entries = StateJournal(tmp_path / "s.json").load()
    assert compactions >= 2
    assert state["items"] + [e["i"] for e in entries] == list(range(50)), "snapshot + replay = every event once"


def test_a_crash_between_snapshot_and_emptying_the_journal_replays_nothing_twice(tmp_path):
    path = tmp_path / "s.json"
    j = StateJournal(path)
    j.compact({"n": 0})
    for i in range(3):
        j.append({"i": i})
    j.close()
    journal_text = j.journal_path.read_text()
    j2 = StateJournal(path)
    j2.load()
    j2.compact({"n": 3})  # the snapshot is written ...
    j2.close()
    j2.journal_path.write_text(journal_text)  # ... but the process died before the journal was emptied
    j3 = StateJournal(path)
    state, entries = j3.load()
    assert state == {"n": 3} and entries == []
    j3.append({"i": 3})
    j3.close()
    assert StateJournal(path).load() == ({"n": 3}, [{"i": 3}])


def test_a_torn_last_line_is_dropped_and_the_journal_goes_on(tmp_path):
    path = tmp_path / "s.json"
    j = StateJournal(path)
    j.compact({})
    j.append({"i": 0})
    j.append({"i": 1})
    j.close()
    with open(j.journal_path, "a") as f:
        f.write('{"seq": 3, "entry": {"i"')  # the process died mid-write
    j2 = StateJournal(path)
    assert j2.load() == ({}, [{"i": 0}, {"i": 1}])
    j2.append({"i": 2})
    j2.close()
    assert StateJournal(path).load() == ({}, [{"i": 0}, {"i": 1}, {"i": 2}])


def test_a_gap_or_a_corrupt_line_inside_the_journal_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "s.json"
    j = StateJournal(path)
    j.compact({})
    j.close()
    j.journal_path.write_text(json.dumps({"seq": 1, "entry": {}}) + "\n" + json.dumps({"seq": 3, "entry": {}}) + "\n")
    with pytest.raises(ValueError, match=r"s\.json\.journal: line 2 has entry 3, expected 2"):
        StateJournal(path).load()
    j.journal_path.write_text("not json\n" + json.dumps({"seq": 1, "entry": {}}) + "\n")
    with pytest.raises(ValueError, match=r"s\.json\.journal: line 1 is not JSON"):
        StateJournal(path).load()


def test_bytes_written_grow_linearly_with_a_growing_state(tmp_path, monkeypatch):
    """A state that keeps a history (one item per event): rewriting it after every event writes
    O(n^2) bytes; snapshot + journal stays within a small multiple of the final state."""
    monkeypatch.setattr(state_journal, "MIN_COMPACT_BYTES", 1024)
    written = {"bytes": 0}
    real_compact, real_append = StateJournal.compact, StateJournal.append

    def compact(self, state):
        written["bytes"] += len(json.dumps({"seq": self.seq, "state": state}))
        real_compact(self, state)

    def append(self, entry):
        written["bytes"] += len(json.dumps({"seq": self.seq + 1, "entry": entry})) + 1
        real_append(self, entry)

    monkeypatch.setattr(StateJournal, "compact", compact)
    monkeypatch.setattr(StateJournal, "append", append)
    j = StateJournal(tmp_path / "s.json")
    history: list[list[float]] = []
    rng = np.random.default_rng(0)
    n = 3000
    for i in range(n):
        event = {"step": i, "loss": rng.random(4).round(6).tolist()}
        history.append(event["loss"])
        j.append(event)
        if j.should_compact():
            j.compact({"history": history})
    j.close()
    final = len(json.dumps({"history": history}))
    rewrite_every_time = sum(final * (i + 1) / n for i in range(n))  # ~ n * final / 2
    assert written["bytes"] < 5 * final
    assert written["bytes"] < rewrite_every_time / 100


def test_a_complete_last_line_without_its_newline_counts_as_torn(tmp_path):
    path = tmp_path / "s.json"
    j = StateJournal(path)
    j.compact({})
    j.append({"i": 0})
    j.close()
    with open(j.journal_path, "a") as f:
        f.write(json.dumps({"seq": 2, "entry": {"i": 1}}))  # whole JSON, but the newline never made it
    j2 = StateJournal(path)
    assert j2.load() == ({}, [{"i": 0}])
    j2.append({"i": 1})
    j2.close()
    assert StateJournal(path).load() == ({}, [{"i": 0}, {"i": 1}])


def test_start_replaces_an_earlier_history_and_a_crash_inside_it_leaves_none(tmp_path):
    path = tmp_path / "s.json"
    old = StateJournal(path)
    old.compact({"run": "old"})
    old.append({"i": 0})
    old.close()
    new = StateJournal(path)
    new.start({"run": "new"})
    new.append({"i": 9})
    new.close()
    assert StateJournal(path).load() == ({"run": "new"}, [{"i": 9}])
    StateJournal(path).remove()  # what start() does before its snapshot: a crash here ...
    assert not StateJournal(path).exists()
    assert StateJournal(path).load() == (None, [])  # ... leaves nothing to resume, not the old run


def test_an_entry_that_cannot_be_encoded_is_refused_before_any_effect(tmp_path):
    with pytest.raises(TypeError):
        StateJournal.encode({"extra": object()})
    j = StateJournal(tmp_path / "s.json")
    j.compact({})
    j.append(StateJournal.encode({"i": 0}))
    j.close()
    assert StateJournal(tmp_path / "s.json").load() == ({}, [{"i": 0}])

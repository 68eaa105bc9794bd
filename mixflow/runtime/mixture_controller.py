"""The mixture controller: a Ray actor that holds one policy and publishes versioned mixtures.

Trainer ranks send feedback (``report``); the controller merges the ranks' reports of
the same ``(kind, version, step)`` (:class:`~mixflow.mixture.feedback_merge.FeedbackMerger`),
lets the policy observe the merged report, and publishes the policy's new mixture under
the next version.

The controller is also the step clock that keeps the ranks in agreement: a producer
asks ``mixture_for_step(step)`` before building its batch of global step ``step``; the
first rank to ask fixes which version that step uses (the current one, at once — no
trainer stalls for a policy update), and every other rank gets the same answer, so the
ranks' batches of one step always share a version and their reports merge. Assignments
are kept until the step's training reports have merged, so a resumed or restarted
producer asking again for a step gets the same answer. When a
mixture is limited to ``steps`` batches (Aioli's LearnParams sweeps), the step after
them waits until the policy has published the next version; the last of them carries
``eval_after`` (a mixture of ``steps=0`` gives one empty step that only evaluates).

Every assignment and report is journaled under ``state_path``
(:class:`~mixflow.runtime.state_journal.StateJournal`: a snapshot of the state — policy,
half-merged reports, trajectory — plus the events since), and a restarted controller
(Ray ``max_restarts``) reloads the snapshot and replays the events, so the policy's state
survives the actor's death. A new controller (not a restart) starts a new journal from
its checkpoint (``initial_state``) or from the policy's start.

A policy whose inputs (``MixturePolicy.inputs``: ``ref_loss``, ``grad_dot_val``,
``eval_loss``, ...) never arrive cannot move; the controller warns once (its log) naming the
policy and the field after ``INPUT_WARN_AFTER`` merged reports without it
(:class:`~mixflow.mixture.input_watch.InputWatch`), and ``stats()["missing_inputs"]``
lists such fields (the run summary shows them and warns).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import numpy as np
import ray

from mixflow.mixture.feedback_merge import FeedbackMerger
from mixflow.mixture.input_watch import InputWatch
from mixflow.mixture.policy import Feedback, Mixture, MixturePolicy
from mixflow.runtime.placement import Placed
from mixflow.runtime.state_journal import StateJournal


def mixture_message(mix: Mixture) -> dict[str, Any]:
    return {"version": mix.version, "p": mix.p.tolist(), "steps": mix.steps, "eval_after": mix.eval_after}


def feedback_from(message: dict[str, Any]) -> Feedback:
    arrays = {k: (None if message.get(k) is None else np.asarray(message[k], dtype=np.float64))
              for k in ("train_loss", "tokens", "counts", "eval_loss", "grad_dot_val", "ref_loss")}
    return Feedback(version=int(message["version"]), step=int(message["step"]), extra=message.get("extra", {}),
                    **arrays)


INPUT_WARN_AFTER = 20


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class MixtureController(Placed):
    def __init__(self, policy_name: str, policy_params: dict, num_domains: int, world_size: int,
                 state_path: str | None = None, initial_state: dict | None = None):
        from mixflow.mixture.registry import build_policy

        self.policy: MixturePolicy = build_policy(policy_name, num_domains, **policy_params)
        self.merger = FeedbackMerger(world_size)
        self.watch = InputWatch(policy_name, self.policy.inputs, INPUT_WARN_AFTER)
        self.world_size = world_size
        self._at_checkpoint: dict[int, set[int]] = {}  # step -> ranks waiting in checkpoint(step)
        self.trajectory: list[dict[str, Any]] = []
        self.latencies_ms: list[float] = []
        self.stale_reports = 0
        self.restored = False
        self.merged_log: list[dict[str, Any]] = []  # every merged report: kind, version, step, counts
        self._changed = asyncio.Condition()
        # step -> mixture message, kept until every rank's training report of that step has
        # merged (then every rank has consumed it and no resume can ask for it again)
        self._assigned: dict[int, dict[str, Any]] = {}
        self._used: dict[int, int] = {}  # version -> steps assigned to it
        self.journal = StateJournal(state_path) if state_path else None
        if self.journal is not None and ray.get_runtime_context().was_current_actor_reconstructed:
            self._replay(initial_state)  # a restart: where the dead controller left off
            self.restored = True
            self.journal.compact(self.state_dict())
            return
        if initial_state is not None:
            self._load(initial_state)
            self.restored = True
        else:
            self._record(step=0)
        if self.journal is not None:
            self.journal.start(self.state_dict())  # a new history starts from this state

    def _replay(self, initial_state: dict | None) -> None:
        """The journal's snapshot (or the start state) and every event recorded after it."""
        snapshot, events = self.journal.load()
        if snapshot is not None:
            self._load(snapshot)
        elif initial_state is not None:
            self._load(initial_state)
        else:
            self._record(step=0)
        for event in events:
            if event["op"] == "assign":
                self._assign(event["step"])
            else:
                self._observe(event["rank"], event["kind"], event["message"])

    def _record(self, step: int) -> None:
        self.trajectory.append({"step": step, **mixture_message(self.policy.mixture())})

    async def mixture_for_step(self, step: int) -> dict[str, Any]:
        """The mixture every rank uses for global step ``step`` (``empty``: evaluate only)."""
        if step not in self._assigned:
            async with self._changed:
                # Woken together, the first rank may take the new version's last step for this very
                # step: the others must then take its answer, not wait for the version after it
                # (which needs their own report of this step: a deadlock with one-step mixtures).
                await self._changed.wait_for(lambda: step in self._assigned or self._has_steps_left())
            if step not in self._assigned:  # another rank may have fixed it while we waited
                self._assign(step)
                self._journal({"op": "assign", "step": step})
        return self._assigned[step]

    def _assign(self, step: int) -> None:
        """Fix the current mixture as the one of global step ``step``."""
        mix = self.policy.mixture()
        used = self._used.get(mix.version, 0)
        self._used[mix.version] = used + 1
        msg = mixture_message(mix)
        msg["empty"] = mix.steps == 0
        msg["eval_after"] = mix.eval_after and (mix.steps is not None and used + 1 >= mix.steps)
        self._assigned[step] = msg

    def _has_steps_left(self) -> bool:
        mix = self.policy.mixture()
        return mix.steps is None or self._used.get(mix.version, 0) < max(mix.steps, 1)

    async def report(self, rank: int, kind: str, message: dict[str, Any]) -> bool:
        """One rank's ``train`` or ``eval`` report; True when it completed a step and the policy moved."""
        event = StateJournal.encode({"op": "report", "rank": rank, "kind": kind, "message": message})
        changed = self._observe(rank, kind, message)
        self._journal(event)
        if changed:
            async with self._changed:
                self._changed.notify_all()
        return changed

    def _observe(self, rank: int, kind: str, message: dict[str, Any]) -> bool:
        """Merge the report; when it completes a step, the policy observes it (True if it moved)."""
        merged = self.merger.add(rank, kind, feedback_from(message))
        if merged is None:
            return False
        self.merged_log.append({"kind": kind, "version": merged.version, "step": merged.step,
                                "counts": None if merged.counts is None else merged.counts.tolist()})
        if kind == "train":
            for old in [s for s in self._assigned if s <= merged.step]:
                del self._assigned[old]
        self.watch.see(merged)  # a MissingInputWarning (the actor's log) once an input is overdue
        start = time.perf_counter()
        if merged.version != self.policy.mixture().version:
            self.stale_reports += 1
        changed = self.policy.observe(merged)
        if changed:
            self._record(merged.step)
        self.latencies_ms.append((time.perf_counter() - start) * 1e3)
        return changed

    async def checkpoint(self, rank: int, step: int, timeout_s: float) -> dict[str, Any] | None:
        """Every rank calls this after its reports of global step ``step`` have arrived (a
        collective, as torch.distributed checkpoints are); once all ranks are here, each gets the
        same state: every report up to ``step`` merged, none after it. None when not every rank
        came within ``timeout_s``."""
        waiting = self._at_checkpoint.setdefault(step, set())
        waiting.add(rank)
        async with self._changed:
            self._changed.notify_all()
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: len(waiting) >= self.world_size), timeout_s)
            except asyncio.TimeoutError:
                waiting.discard(rank)
                return None
        return self.state_dict()

    def stats(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return {"version": self.policy.mixture().version, "updates": len(self.latencies_ms),
                "latency_ms_p50": float(np.percentile(lat, 50)), "latency_ms_p99": float(np.percentile(lat, 99)),
                "stale_reports": self.stale_reports, "pending": self.merger.pending, "restored": self.restored,
                "missing_inputs": self.watch.missing() if self.watch.reports else [],
                "policy": _plain(self.policy.run_stats())}

    def get_trajectory(self) -> list[dict[str, Any]]:
        return list(self.trajectory)

    def get_merged_log(self) -> list[dict[str, Any]]:
        return list(self.merged_log)

    def state_dict(self) -> dict[str, Any]:
        return {"policy": _plain(self.policy.state_dict()), "merger": self.merger.state_dict(),
                "trajectory": self.trajectory, "stale_reports": self.stale_reports, "merged_log": self.merged_log,
                "watch": self.watch.state_dict(),
                "assigned": {str(k): v for k, v in self._assigned.items()},
                "used": {str(k): v for k, v in self._used.items()}}

    def _load(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.merger.load_state_dict(state["merger"])
        self.trajectory = list(state["trajectory"])
        self.stale_reports = int(state["stale_reports"])
        self.merged_log = list(state["merged_log"])
        if "watch" in state:
            self.watch.load_state_dict(state["watch"])
        self._assigned = {int(k): v for k, v in state["assigned"].items()}
        self._used = {int(k): v for k, v in state["used"].items()}

    def _journal(self, event: dict[str, Any] | str) -> None:
        if self.journal is None:
            return
        self.journal.append(event)
        if self.journal.should_compact():
            self.journal.compact(self.state_dict())

    def pid(self) -> int:
        return os.getpid()


def _plain(value: Any) -> Any:
    """numpy values -> JSON-ready Python values (policies may keep arrays in their state)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value

"""Load and shutdown: a short soak with a slow rank, SIGTERM/SIGINT on ``mixflow run``, a trainer
killed mid-epoch. Real Ray, real DALI, real digits shards."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import ray

from benchmarks.soak import (MIB, Sample, _longest_gap, _memory_marks, epochs_for_minutes, process_memory,
                             run_soak, soak_spec)
from mixflow.errors import PipelineError
from mixflow.runtime.image_pipeline import ImagePipeline
from tests.conftest import make_spec

ROOT = Path(__file__).resolve().parents[1]


def _processes() -> dict[int, tuple[int, str, str]]:
    """Every process as ``pid -> (parent pid, state letter, command line)`` (Linux /proc)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            after_name = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(entry)] = (int(after_name[1]), after_name[0], cmd)
    return out


def _descendants(root: int) -> dict[int, str]:
    procs, found, grown = _processes(), {root}, True
    while grown:
        grown = False
        for pid, (ppid, _, _) in procs.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grown = True
    return {pid: procs[pid][2] for pid in found - {root} if pid in procs}


def _living(pids) -> dict[int, str]:
    procs = _processes()
    return {pid: procs[pid][2] for pid in pids if pid in procs and procs[pid][1] != "Z"}


def _dead(handle, timeout: float = 10.0) -> bool:
    """Whether the actor is dead within ``timeout`` s. ``ray.kill`` returns before the kill reaches
    the actor (it goes through the GCS and the raylet, while a call goes straight to the actor),
    so a call right after a stop may still be served: ask again until the actor is gone."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ray.get(handle.__ray_call__.remote(lambda actor: None), timeout=max(0.1, deadline - time.monotonic()))
        except ray.exceptions.RayActorError:
            return True
        except ray.exceptions.GetTimeoutError:
            return False
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def test_process_memory_reads_this_process():
    mine = process_memory(os.getpid())
    assert mine is not None and 10 * MIB < mine < 64 * 2**30
    assert process_memory(2**22 + 12345) is None  # above Linux's PID_MAX_LIMIT: no such process


def test_soak_epochs_gaps_and_memory_marks_by_hand():
    # 1797 samples over 2 ranks in batches of 32: 29 steps per epoch; at 0.2 s each, 5.8 s per epoch.
    assert epochs_for_minutes(3, 1797, 2, 32, 0.2) == 32  # ceil(180 / 5.8) = ceil(31.03)
    assert epochs_for_minutes(0.01, 1797, 2, 32, 0.2) == 1
    with pytest.raises(ValueError, match="minutes must be > 0, got 0"):
        epochs_for_minutes(0, 1797, 2, 32, 0.2)
    with pytest.raises(ValueError, match="throttle_s must be > 0"):
        soak_spec("shards", 10, "run", epochs=1, throttle_s=0.0)
    with pytest.raises(ValueError, match=r"slow_rank must be in \[0, 1\] for ranks=2, got 2"):
        soak_spec("shards", 10, "run", epochs=1, throttle_s=0.1, slow_rank=2)
    memory = [100, 150, 120, 130, 170, 160]
    received = [0, 32, 32, 32, 64, 64]
    timeline = [Sample(0.5 * i, [0, 0], [0, 0], [memory[i], None if i == 3 else 1], [received[i], 32 * i])
                for i in range(6)]
    assert _longest_gap(timeline, 0) == 1.0  # no new batch from t=0.5 to t=1.5
    assert _longest_gap(timeline, 1) == 0.0
    # Warm-up: the first 20% of 0..2.5 s, i.e. t <= 0.5: the highest there is 150.
    assert _memory_marks(timeline, 0, 0.2) == (100, 150, 170, 160)
    assert _memory_marks(timeline, 1, 0.2) == (1, 1, 1, 1)  # the unreadable reading is left out


def test_soak_slow_rank_bounds_bytes_and_memory_fast_rank_keeps_receiving(ray_session, digits_shards, tmp_path):
    spec = soak_spec(digits_shards, 10, tmp_path / "run", epochs=2, throttle_s=0.2, slow_rank=1, size=24,
                     max_items=64, max_bytes=200_000)
    report = run_soak(spec, sample_every_s=0.25, warmup_fraction=0.3, growth_limit=128 * MIB)
    fast, slow = report.ranks
    assert report.exactly_once
    assert fast.samples + slow.samples == 2 * 1797
    assert len(report.timeline) >= 20  # sampled throughout the ~12 s the slow rank needs
    for rank in report.ranks:
        assert rank.max_batch_bytes > 0 and rank.max_bytes == 200_000
        # Producer-side bytes (queued + waiting for credit) never exceed the bound plus one batch.
        assert rank.peak_in_flight_bytes <= rank.max_bytes + rank.max_batch_bytes
        assert rank.peak_queued_bytes <= rank.max_bytes
        assert all(s.queued_bytes[rank.rank] <= rank.max_bytes for s in report.timeline)
        # Producer memory (decoders + mixer + channel) was measured and did not keep growing.
        assert rank.memory_warm is not None and rank.memory_peak >= rank.memory_warm > 0
        assert rank.memory_growth <= 128 * MIB, rank
    # The slow rank's producer was held back by byte credit, not by the item count.
    assert slow.put_wait_s > 1.0 and slow.peak_items < 64
    # The fast rank got each epoch's share long before the slow rank finished it.
    assert fast.wall_s < 0.5 * slow.wall_s
    assert fast.barrier_idle_s > slow.barrier_idle_s


def _write_spec(path: Path, shards: Path, run_dir: Path) -> Path:
    path.write_text(f"name: sigtest\nseed: 1\nrun_dir: {run_dir}\n"
                    f"data: {{shards: {shards}, num_classes: 10}}\n"
                    "decode: {size: [24, 24], scale: [0.5, 1.0]}\nmix: {method: mixup_cutmix}\n"
                    "channel: {max_items: 8, max_bytes: 256KiB}\n"
                    "trainer: {ranks: 2, epochs: 50, batch_size: 32, model: none, throttle: {1: 0.1}}\n")
    return path


def test_sigterm_stops_mixflow_run_and_leaves_no_ray_process(digits_shards, tmp_path):
    spec = _write_spec(tmp_path / "spec.yaml", digits_shards, tmp_path / "run")
    ray_tmp = tempfile.mkdtemp(prefix="mfray", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join another cluster
    env["RAY_TMPDIR"] = ray_tmp
    proc = subprocess.Popen([sys.executable, "-m", "mixflow.cli", "run", str(spec), "--no-progress"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_until(lambda: sum("ray::TrainerRank.run" in c for c in _descendants(proc.pid).values()) == 2,
                    180, "both trainer ranks running their epoch")
        before = _descendants(proc.pid)
        assert any("raylet" in c for c in before.values()) and any("gcs_server" in c for c in before.values())
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - sent < 60
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped by SIGTERM: producers stopped, channels closed" in out
    assert "embedded Ray shut down" in out
    assert "Unhandled error" not in out
    # No raylet, GCS, agent or worker of that Ray instance is left (Ray's own reaping may lag a little).
    _wait_until(lambda: not _living(before), 15, f"Ray processes to exit: {_living(before)}")
    assert not [c for c in (v[2] for v in _processes().values()) if ray_tmp in c]
    shutil.rmtree(ray_tmp, ignore_errors=True)  # its session logs (kept when the test fails)


def _outcome(fn) -> dict:
    try:
        return {"result": fn()}
    except BaseException as exc:  # noqa: BLE001 - inspected by the test
        return {"error": exc}


def _run_in_background(pipe, outcome: dict) -> threading.Thread:
    thread = threading.Thread(target=lambda: outcome.update(_outcome(pipe.run)), daemon=True)
    thread.start()
    return thread


def _handles_once_running(pipe: ImagePipeline, rank: int) -> list:
    """The pipeline's actors, once ``rank`` has received a batch."""
    _wait_until(lambda: bool(pipe.trainers), 120, "the pipeline's actors")
    trainer = pipe.trainers[rank]
    _wait_until(lambda: ray.get(trainer.progress.remote())["samples"] > 0, 120, f"rank {rank}'s first batch")
    return pipe.trainers + pipe.mixers + pipe.decoders + pipe.channels


def _kill_trainer_expect_stop(pipe, running, rank: int = 1) -> tuple[list, BaseException | None]:
    """Run ``pipe`` in the background; once ``running()`` returns the actors' handles, kill trainer
    ``rank`` and expect the run to stop by itself within 45 s. Returns the handles and the error
    the run raised."""
    outcome: dict = {}
    thread = _run_in_background(pipe, outcome)
    try:
        handles = running()
        ray.kill(pipe.trainers[rank])
        killed = time.monotonic()
        thread.join(timeout=90)
        assert not thread.is_alive(), "the pipeline hangs after a trainer died"
        assert time.monotonic() - killed < 45
    finally:
        if thread.is_alive():
            pipe._stop("test failed")
    return handles, outcome.get("error")


def test_trainer_killed_mid_epoch_stops_pipeline_with_named_error(ray_session, digits_shards, tmp_path):
    # Data-parallel ranks (gloo): the surviving rank's all-reduce fails too once its peer is gone.
    spec = make_spec(digits_shards, tmp_path, trainer={"epochs": 5, "model": "digits_cnn", "throttle": {1: 0.05}})
    pipe = ImagePipeline(spec, show_progress=False)
    handles, error = _kill_trainer_expect_stop(pipe, lambda: _handles_once_running(pipe, 1))
    assert isinstance(error, PipelineError), error
    # The entrypoint runs every epoch in one call on the rank actor: the rank is the stage named.
    assert re.match(r"trainer r1 died: The actor died", str(error)), str(error)
    assert "class_name: TrainerRank" in str(error) and "killed by `ray.kill`" in str(error)
    assert isinstance(error.__cause__, ray.exceptions.ActorDiedError)
    # Every actor the pipeline started is gone: trainers, mixers (each decoding its rank's one
    # reader: runtime.fuse_reader) and channels.
    assert len(handles) == 2 + 2 + 2 and not pipe.decoders
    assert all(_dead(h) for h in handles)
    assert not pipe.trainers and not pipe.mixers and not pipe.decoders and not pipe.channels


def test_sigint_during_mixflow_run_stops_pipeline_and_keeps_joined_ray(ray_session, digits_shards, tmp_path,
                                                                        monkeypatch, capsys):
    from mixflow import cli

    monkeypatch.setenv("RAY_IGNORE_UNHANDLED_ERRORS", "1")  # the stop sets it; restored after the test
    handler_before = signal.getsignal(signal.SIGINT)
    started: list[ImagePipeline] = []
    original = ImagePipeline._start_actors

    def recording(self, *args, **kwargs):
        started.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ImagePipeline, "_start_actors", recording)
    spec = _write_spec(tmp_path / "spec.yaml", digits_shards, tmp_path / "run")
    handles: list = []

    def interrupt():
        try:
            _wait_until(lambda: bool(started), 120, "the pipeline to start")
            handles.extend(_handles_once_running(started[0], 0))
        finally:  # cli's handler is installed while the pipeline runs; cli.main catches Ctrl-C anyway
            os.kill(os.getpid(), signal.SIGINT)

    killer = threading.Thread(target=interrupt, daemon=True)
    killer.start()
    code = cli.main(["run", str(spec), "--no-progress"])
    killer.join(timeout=5)
    out = capsys.readouterr().out
    assert code == 128 + signal.SIGINT
    assert "stopped by SIGINT: producers stopped, channels closed" in out and "Ray left running" in out
    assert len(handles) == 6 and all(_dead(h) for h in handles)  # 2 trainers, 2 mixers (fused readers), 2 channels
    # Ray was already running (the test session's): mixflow run stops its pipeline, not Ray.
    assert ray.is_initialized() and ray.get(ray.put(7)) == 7
    assert signal.getsignal(signal.SIGINT) is handler_before


def test_token_trainer_killed_mid_run_stops_pipeline_with_named_error(ray_session, tmp_path):
    from mixflow.config import validate_spec
    from mixflow.data.text_domains import machine_documents
    from mixflow.data.token_shard_writer import write_domain_splits
    from mixflow.runtime.token_pipeline import TokenPipeline

    root = tmp_path / "text"
    for name in ("python", "licenses"):
        write_domain_splits(machine_documents(name, max_bytes=64 * 2**10), root, name, 0.15, max_bytes=32 * 2**10)
    spec = validate_spec({
        "kind": "tokens", "name": "tok", "seed": 3, "run_dir": str(tmp_path / "run"),
        "data": {"shards": str(root), "seq_len": 32, "eval_sequences": 8},
        "mixture": {"policy": "odm"}, "channel": {"max_items": 3, "max_bytes": "1MiB"},
        "trainer": {"ranks": 2, "steps": 2000, "batch_size": 8, "d_model": 32, "layers": 1, "heads": 2,
                    "eval_every": 0, "throttle": {1: 0.05}},
    })
    pipe = TokenPipeline(spec, show_progress=False)

    def running() -> list:
        _wait_until(lambda: bool(pipe.trainers), 120, "the pipeline's actors")
        trainer = pipe.trainers[1]
        _wait_until(lambda: ray.get(trainer.progress.remote())["steps"] > 0, 120, "rank 1's first step")
        return pipe.trainers + pipe.producers + pipe.channels + [pipe.controller]

    handles, error = _kill_trainer_expect_stop(pipe, running)
    assert isinstance(error, PipelineError), error
    assert str(error).startswith("trainer r1 died: The actor died"), str(error)
    assert "class_name: TokenTrainerRank" in str(error) and "killed by `ray.kill`" in str(error)
    assert len(handles) == 2 + 2 + 2 + 1 and all(_dead(h) for h in handles)

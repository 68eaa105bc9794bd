"""Plain processes attach by name: ``mixflow serve`` a detached pipeline, ``torchrun`` two ranks that call
``mixflow.feed(name)``, ``mixflow stop`` it for the ledger verdict; and ``mixflow run`` of a spec with
a ``trainer.entrypoint``. Every command runs as a subprocess against the test session's Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _spec_file(shards, tmp_path, **trainer) -> Path:
    spec = {"name": "served", "seed": 7, "run_dir": str(tmp_path / "run"),
            "data": {"shards": str(shards), "num_classes": 10},
            "decode": {"size": [24, 24], "scale": [0.5, 1.0]},
            "mix": {"method": "mixup_cutmix", "label_smoothing": 0.1},
            "channel": {"max_items": 4, "max_bytes": "1MiB"},
            "trainer": {"ranks": 2, "epochs": 2, "batch_size": 32, **trainer}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _mixflow(*args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "mixflow.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_torchrun_ranks_attach_to_a_served_pipeline_by_name(ray_session, digits_shards, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_ADDRESS": address}
    served = _mixflow("serve", str(_spec_file(digits_shards, tmp_path)), "--name", "tr1", "--address", address,
                      env=env)
    assert served.returncode == 0, served.stdout + served.stderr[-3000:]
    auth = "RAY_AUTH_MODE=token " if os.environ.get("RAY_AUTH_MODE") == "token" else ""  # Ray's default here
    assert f"{auth}mixflow stop tr1 --address {address}" in served.stdout
    torchrun = Path(sys.executable).parent / "torchrun"
    run = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "tests/torchrun_train.py", "tr1",
                          str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env={**env, "PYTHONPATH": str(REPO)}, cwd=REPO)
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert [r["rank"] for r in results] == [0, 1], run.stdout[-3000:] + run.stderr[-3000:]
    for r in results:
        assert r["sums_ok"] and r["losses"][1] < r["losses"][0], r
    stopped = _mixflow("stop", "tr1", "--address", address, env=env)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr[-3000:]
    assert "epoch 0: 1797 keys delivered exactly once" in stopped.stdout
    assert "epoch 1: 1797 keys delivered exactly once" in stopped.stdout
    again = _mixflow("stop", "tr1", "--address", address, env=env)
    assert again.returncode == 2 and "no running pipeline named 'tr1'" in again.stdout


def test_mixflow_run_calls_the_specs_entrypoint(ray_session, digits_shards, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    spec = _spec_file(digits_shards, tmp_path, entrypoint="tests.test_feed_api:train_digits")
    run = _mixflow("run", str(spec), "--set", f"runtime.address={address}", "--set", "runtime.readers_per_rank=2",
                   env=dict(os.environ))
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "running tests.test_feed_api:train_digits on 2 rank(s)" in run.stdout
    # Restartable mixers get their channel and readers by name: no constructor argument of theirs
    # lives in the object store, where a restart could not find it (Ray warns when one does).
    assert "constructor arguments in the object store" not in run.stdout + run.stderr
    assert run.stdout.count("keys delivered exactly once") == 2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["exactly_once"] and sum(r["samples"] for r in summary["ranks"]) == 2 * 1797
    assert all(len(r["epoch_loss"]) == 2 for r in summary["ranks"])  # feed.report(loss=...) reached it

"""An existing Ray cluster, as a newcomer meets it: a head started on its own (``ray start --head``,
its own port and temp dir, token authentication on, as Ray turns it on), joined by ``mixflow run
--address`` from another directory with relative paths in the spec."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def own_head():
    """A head this test starts and stops (only its own processes: its process group)."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--port", str(port), "--temp-dir", temp,
                             "--num-cpus", "2", "--include-dashboard", "false", "--block"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the test's own Ray head did not come up in 90 s")
    time.sleep(3)  # the raylet registers after the GCS port opens
    yield f"127.0.0.1:{port}"
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)  # `ray start --block` may sit on SIGTERM; its group goes then
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)


def _run(args, cwd, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "mixflow.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def _plain_env(**extra) -> dict:
    """This process's environment without what would make joining work by accident."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    return {**env, **extra}


def test_mixflow_run_joins_an_existing_head_from_another_directory(own_head, tmp_path):
    """The default spec, copied to another directory and run there against the head: its relative
    ``data.shards`` (the demo set it builds) and ``run_dir`` are the driver's, resolved before the
    spec ships; the token Ray put on this machine is used without RAY_AUTH_MODE being set."""
    shutil.copy(REPO / "pipelines" / "digits_mixup.yaml", tmp_path / "spec.yaml")
    run = _run(["run", "spec.yaml", "--address", own_head, "--no-progress", "--set", "trainer.epochs=1"],
               tmp_path, _plain_env())
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "epoch 0: 1797 keys delivered exactly once" in run.stdout
    summary = json.loads((tmp_path / "runs" / "digits_mixup" / "summary.json").read_text())
    assert summary["exactly_once"] and summary["skipped"] == 0
    assert (tmp_path / "runs" / "data" / "digits").is_dir()  # the demo set was built where the driver runs
    # Restartable actors got their peers by name: nothing of theirs sits in the object store.
    assert "constructor arguments in the object store" not in run.stdout + run.stderr


def test_joining_without_the_token_fails_in_one_line_saying_what_to_set(own_head, digits_shards, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "nojoin", "data": {"shards": str(digits_shards), "num_classes": 10},
                                    "trainer": {"model": "none"}}))
    run = _run(["run", str(spec), "--address", own_head], tmp_path, _plain_env(HOME=str(home)), timeout=180)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"cannot join the Ray cluster at {own_head}" in errors[0], run.stdout + run.stderr
    assert "set RAY_AUTH_MODE=token" in errors[0] and "Traceback" not in run.stdout + run.stderr


ENTRYPOINT = '''
import os
from pathlib import Path


def train(feed, ctx):
    """Consumes its feed; says where it ran: the working directory Ray unpacked for the job."""
    for epoch in range(feed.current_epoch, feed.epochs):
        for batch in feed.epoch(epoch):
            pass
    (Path(ctx.run_dir) / f"cwd{ctx.rank}.txt").write_text(os.getcwd())
    (Path(ctx.run_dir) / f"shipped{ctx.rank}.txt").write_text(str(Path("my_loop.py").is_file()))
'''


def test_runtime_env_ships_the_drivers_code_to_the_cluster(own_head, digits_shards, tmp_path):
    """``runtime.runtime_env: {working_dir: .}``: the job's working directory (with the user's
    entrypoint module) is uploaded by Ray and is every rank's working directory."""
    (tmp_path / "my_loop.py").write_text(ENTRYPOINT)
    spec = {"name": "shipped", "run_dir": "out", "data": {"shards": str(digits_shards), "num_classes": 10},
            "decode": {"size": [24, 24]}, "channel": {"max_items": 4, "max_bytes": "1MiB"},
            "runtime": {"runtime_env": {"working_dir": "."}},
            "trainer": {"ranks": 2, "epochs": 1, "batch_size": 64, "entrypoint": "my_loop:train"}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    run = _run(["run", "spec.yaml", "--address", own_head, "--no-progress"], tmp_path, _plain_env())
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "epoch 0: 1797 keys delivered exactly once" in run.stdout
    for r in range(2):
        cwd = (tmp_path / "out" / f"cwd{r}.txt").read_text()
        assert "working_dir_files" in cwd and cwd != str(tmp_path), cwd  # Ray's unpacked copy, not the driver's
        assert (tmp_path / "out" / f"shipped{r}.txt").read_text() == "True"

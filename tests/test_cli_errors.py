"""The ``mixflow`` command answers bad input with one clear line and exit status 2, before Ray starts."""

from __future__ import annotations

import json
from importlib.metadata import version

import pytest
import yaml

from mixflow.cli import main

pytestmark = pytest.mark.timeout(120)


def _run(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    out = capsys.readouterr().out.strip().replace("\n", " ")  # rich may wrap a long line
    return rc, out


def _ray_started() -> bool:
    import ray

    return ray.is_initialized()


def _spec_file(tmp_path, shards) -> str:
    raw = {"name": "cli", "seed": 7, "run_dir": str(tmp_path / "run"),
           "data": {"shards": str(shards), "num_classes": 10},
           "decode": {"size": [24, 24]}, "mix": {"method": "mixup"},
           "trainer": {"ranks": 2, "epochs": 1, "batch_size": 32, "model": "none"}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_shards_from_a_missing_folder_and_a_bad_size_are_one_line(capsys, tmp_path):
    rc, out = _run(capsys, "shards", "--from-folder", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert (rc, out) == (2, f"error: image folder {tmp_path / 'nope'} does not exist")
    rc, out = _run(capsys, "shards", "--from-folder", str(tmp_path), "--out", str(tmp_path / "o"),
                   "--shard-size", "lots")
    assert (rc, out) == (2, "error: --shard-size: expected a byte size such as 64MiB or 1GB, got 'lots'")


def test_version_comes_from_the_package_metadata(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"mixflow {version('mixflow')}"


def test_run_checks_shards_and_the_resume_state_before_starting_ray(capsys, tmp_path, digits_shards):
    started = _ray_started()
    missing = tmp_path / "no-shards"
    spec = _spec_file(tmp_path, missing)
    rc, out = _run(capsys, "run", spec, "--no-progress")
    assert (rc, out) == (2, f"error: data.shards: shard directory {missing} does not exist (write shards with "
                            "`mixflow shards`, or set data.demo)")
    (tmp_path / "empty").mkdir()
    rc, out = _run(capsys, "run", _spec_file(tmp_path, tmp_path / "empty"), "--no-progress")
    assert (rc, out) == (2, f"error: data.shards: no *.tar shards in {tmp_path / 'empty'}")
    spec = _spec_file(tmp_path, digits_shards)
    rc, out = _run(capsys, "run", spec, "--resume", "missing.json")
    assert (rc, out) == (2, "error: --resume: no such pipeline state file: missing.json")
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"format": "mixflow.image-pipeline-state/1"}))
    rc, out = _run(capsys, "run", spec, "--resume", str(state))
    assert rc == 2
    assert out.replace("\n", " ").startswith(f"error: --resume {state}: the state lacks field(s) stream, epoch")
    assert _ray_started() == started  # nothing above started Ray


def test_run_with_num_classes_smaller_than_the_labels_is_a_spec_error(capsys, tmp_path, digits_shards):
    started = _ray_started()
    raw = yaml.safe_load(open(_spec_file(tmp_path, digits_shards)))
    raw["data"]["num_classes"] = 9
    raw["on_error"] = "skip"
    (tmp_path / "nine.yaml").write_text(yaml.safe_dump(raw))
    rc, out = _run(capsys, "run", str(tmp_path / "nine.yaml"), "--no-progress")
    assert rc == 2
    assert out == (f"error: invalid pipeline spec:   data.num_classes: 9, but {digits_shards / 'classes.json'} "
                   "says the shards hold 10 classes; set data.num_classes: 10")
    assert _ray_started() == started

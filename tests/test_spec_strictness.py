"""The spec refuses what pydantic's lax mode or PyYAML would quietly accept, naming the field (pure)."""

from __future__ import annotations

import pytest

from mixflow.config import load_spec, validate_spec
from mixflow.errors import ConfigError

pytestmark = pytest.mark.timeout(60)


def _raw(**trainer) -> dict:
    return {"name": "x", "data": {"shards": "/tmp", "num_classes": 10}, "trainer": {"model": "none", **trainer}}


def _problems(raw: dict) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as err:
        validate_spec(raw)
    return err.value.problems


def test_numbers_and_flags_must_have_their_type():
    assert _problems(_raw(batch_size=True)) == [("trainer.batch_size", "must be an integer, got True (bool)")]
    assert _problems(_raw(epochs="2")) == [("trainer.epochs", "must be an integer, got '2' (str)")]
    assert _problems(_raw(epochs=2.0)) == [("trainer.epochs", "must be an integer, got 2.0 (float)")]
    assert _problems(_raw(lr="0.1")) == [("trainer.lr", "must be a number, got '0.1' (str)")]
    assert _problems({**_raw(), "decode": {"antialias": "yes"}}) == [
        ("decode.antialias", "must be true or false, got 'yes' (str)")]
    choice = {"method": "choice", "choices": [{"weight": "1", "mix": {"method": "mixup", "alpha": True}}]}
    assert _problems({**_raw(), "mix": choice}) == [
        ("mix.choices.0.weight", "must be a number, got '1' (str)"),
        ("mix.choices.0.mix.alpha", "must be a number, got True (bool)")]
    # What stays accepted: ints for floats, byte sizes as strings, YAML-typed --set values.
    spec = validate_spec({**_raw(lr=1, batch_size=8), "channel": {"max_bytes": "1MiB"}})
    assert (spec.trainer.lr, spec.trainer.batch_size, spec.channel.max_bytes) == (1.0, 8, 2**20)


def test_set_overrides_are_parsed_as_yaml_and_bad_yaml_names_the_set(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: x\ndata:\n  shards: /tmp\n  num_classes: 10\ntrainer:\n  model: none\n")
    spec = load_spec(path, ["trainer.epochs=3", "decode.size=[64,64]", "decode.antialias=true"])
    assert (spec.trainer.epochs, spec.decode.size, spec.decode.antialias) == (3, (64, 64), True)
    with pytest.raises(ConfigError) as err:
        load_spec(path, ["decode.size=[64,"])
    assert err.value.problems == [("--set decode.size=[64,", "the value '[64,' is not valid YAML (expected the "
                                                              "node content, but found '<stream end>' at column 5)")]
    with pytest.raises(ConfigError) as err:
        load_spec(path, ["trainer.epochs='2'"])
    assert err.value.problems == [("trainer.epochs", "must be an integer, got '2' (str)")]


def test_duplicate_yaml_keys_are_refused_naming_key_and_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: x\ndata:\n  shards: /tmp\n  num_classes: 10\ntrainer:\n  epochs: 1\n  epochs: 3\n")
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    assert err.value.problems == [("<file>", "duplicate key 'epochs' at line 7 (first given at line 6)")]
    assert str(err.value).startswith(f"invalid pipeline spec in {path}")


def test_throttle_seconds_and_ranks_are_checked():
    assert _problems(_raw(throttle={0: -5})) == [
        ("trainer.throttle", "rank 0: seconds per step must be >= 0 and finite, got -5.0")]
    assert _problems(_raw(ranks=2, throttle={2: 0.1})) == [
        ("trainer.throttle", "rank 2 is outside 0..1 (trainer.ranks is 2)")]
    assert validate_spec(_raw(ranks=2, throttle={1: 0.5})).trainer.throttle == {1: 0.5}

"""Unit tests for the typed pipeline spec (``mixflow.config``)."""

from __future__ import annotations

import inspect

import pytest
import yaml

from mixflow.config import MIX_SPECS, PipelineSpec, apply_override, load_spec, parse_bytes, validate_spec
from mixflow.errors import ConfigError
from mixflow.mix.registry import METHODS

MINIMAL = {"name": "demo", "data": {"shards": "data/digits", "num_classes": 10}}


def spec(**sections):
    raw = {"name": "demo", "data": {"shards": "data/digits", "num_classes": 10}}
    raw.update(sections)
    return raw


def problems_of(raw) -> tuple[str, dict[str, str]]:
    with pytest.raises(ConfigError) as exc:
        validate_spec(raw)
    return str(exc.value), dict(exc.value.problems)


def write_yaml(tmp_path, raw, name="pipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


# --------------------------------------------------------------------------- valid specs


def test_minimal_spec_defaults():
    s = validate_spec(MINIMAL)
    assert isinstance(s, PipelineSpec)
    assert s.name == "demo" and s.seed == 0 and s.on_error == "raise"
    assert s.data.shards == "data/digits" and s.data.num_classes == 10
    assert s.data.shard_size == 2**20 and s.data.shuffle_window == 4 and s.data.demo is None
    assert s.decode.device == "auto"
    assert s.decode.size == (224, 224)
    assert s.decode.scale == (0.08, 1.0)
    assert s.decode.ratio == pytest.approx((3 / 4, 4 / 3))
    assert s.decode.flip_prob == 0.5 and s.decode.normalize is False and s.decode.antialias is False
    assert s.mix.method == "none" and s.mix.label_smoothing == 0.0
    assert s.channel.max_items == 4 and s.channel.max_bytes == 64 * 2**20
    assert s.runtime.readers_per_rank == 1 and s.runtime.prefetch == 2 and s.runtime.address is None
    assert s.trainer.ranks == 2 and s.trainer.epochs == 2 and s.trainer.batch_size == 64
    assert str(s.run_path) == "runs/demo"


def test_mix_section_defaults_per_method():
    s = validate_spec(spec(mix={"method": "mixup_cutmix"}))
    assert (s.mix.mixup_alpha, s.mix.cutmix_alpha, s.mix.switch_prob) == (0.8, 1.0, 0.5)
    assert s.mix.mode == "batch" and s.mix.pairing == "derangement" and s.mix.prob == 1.0
    s = validate_spec(spec(mix={"method": "cutmix", "minmax": [0.2, 0.8]}))
    assert s.mix.alpha == 1.0 and s.mix.minmax == (0.2, 0.8) and s.mix.correct_lam is True
    s = validate_spec(spec(mix={"method": "mixup", "alpha": 0.4, "mode": "elem"}))
    assert s.mix.alpha == 0.4 and s.mix.mode == "elem"


def test_spec_is_frozen():
    s = validate_spec(MINIMAL)
    with pytest.raises(Exception):
        s.trainer.ranks = 5  # type: ignore[misc]


# --------------------------------------------------------------------------- errors


def test_invalid_decode_device():
    msg, problems = problems_of(spec(decode={"device": "tpu"}))
    assert "decode.device" in problems
    for allowed in ("'auto'", "'cpu'", "'gpu'"):
        assert allowed in problems["decode.device"]
    assert "decode.device" in msg and "'tpu'" in msg
    assert msg.startswith("invalid pipeline spec")


def test_unknown_mix_field():
    msg, problems = problems_of(spec(mix={"method": "mixup", "alfa": 0.2}))
    assert list(problems) == ["mix.alfa"]
    assert "unknown field" in problems["mix.alfa"]
    allowed = problems["mix.alfa"].split("allowed fields:")[1]
    assert [f.strip() for f in allowed.split(",")] == sorted(
        ["alpha", "label_smoothing", "method", "mode", "pairing", "prob"])
    assert "mix.alfa" in msg


def test_unknown_top_level_and_nested_fields():
    msg, problems = problems_of(spec(trainer={"rank": 2}, extra=1))
    assert "trainer.rank" in problems and "ranks" in problems["trainer.rank"]
    assert "extra" in problems and "trainer" in problems["extra"] and "decode" in problems["extra"]


def test_unknown_mix_method_lists_tags():
    msg, problems = problems_of(spec(mix={"method": "augmix"}))
    assert "mix" in problems
    for tag in ("'none'", "'mixup'", "'cutmix'", "'mixup_cutmix'"):
        assert tag in problems["mix"]
    assert "augmix" in msg


@pytest.mark.parametrize("value,expected", [
    ("64MiB", 67108864), ("1KiB", 1024), ("1.5GB", 1_500_000_000), ("4096", 4096),
    (4096, 4096), ("2 kb", 2000), ("10B", 10), ("1TiB", 2**40)])
def test_parse_bytes(value, expected):
    assert parse_bytes(value) == expected


def test_channel_max_bytes_parsed():
    s = validate_spec(spec(channel={"max_bytes": "64MiB"}))
    assert s.channel.max_bytes == 67108864
    s = validate_spec(spec(data={"shards": "d", "num_classes": 3, "shard_size": "256KiB"}))
    assert s.data.shard_size == 256 * 1024


def test_channel_max_bytes_invalid():
    msg, problems = problems_of(spec(channel={"max_bytes": "12XB"}))
    assert list(problems) == ["channel.max_bytes"]
    assert "12XB" in problems["channel.max_bytes"]
    assert "channel.max_bytes" in msg
    with pytest.raises(ValueError):
        parse_bytes(True)


def test_missing_num_classes():
    msg, problems = problems_of({"name": "demo", "data": {"shards": "d"}})
    assert problems == {"data.num_classes": "required field is missing"}
    assert "data.num_classes" in msg


def test_several_problems_reported_together():
    msg, problems = problems_of(spec(decode={"device": "tpu", "flip_prob": 2},
                                     trainer={"ranks": 0}))
    assert {"decode.device", "decode.flip_prob", "trainer.ranks"} <= set(problems)


@pytest.mark.parametrize("section,fields,needle", [
    ("decode", {"scale": [0.5, 0.2]}, "scale"),
    ("decode", {"ratio": [2.0, 1.0]}, "ratio"),
    ("mix", {"method": "mixup_cutmix", "mixup_alpha": 0, "cutmix_alpha": 0}, "at least one"),
    ("mix", {"method": "mixup", "label_smoothing": 1.0}, "label_smoothing"),
])
def test_range_checks(section, fields, needle):
    msg, problems = problems_of(spec(**{section: fields}))
    assert needle in msg


def test_not_a_mapping():
    with pytest.raises(ConfigError) as exc:
        validate_spec(["a", "b"])  # type: ignore[arg-type]
    assert exc.value.problems == [("<root>", "expected a mapping, got list")]


# --------------------------------------------------------------------------- loading


def test_load_spec_with_overrides(tmp_path):
    path = write_yaml(tmp_path, spec(trainer={"epochs": 5}))
    s = load_spec(path)
    assert s.trainer.ranks == 2 and s.trainer.epochs == 5
    s = load_spec(path, ["trainer.ranks=3"])
    assert s.trainer.ranks == 3 and s.trainer.epochs == 5
    s = load_spec(path, ["mix.method=mixup", "mix.alpha=0.3", "decode.size=[32, 48]", "runtime.address=null"])
    assert s.mix.method == "mixup" and s.mix.alpha == 0.3
    assert s.decode.size == (32, 48) and s.runtime.address is None
    # the file itself is not changed
    assert yaml.safe_load(path.read_text())["trainer"] == {"epochs": 5}


def test_load_spec_error_names_the_file(tmp_path):
    path = write_yaml(tmp_path, spec(decode={"device": "tpu"}))
    with pytest.raises(ConfigError) as exc:
        load_spec(path)
    assert str(path) in str(exc.value) and exc.value.source == str(path)
    with pytest.raises(ConfigError) as exc:
        load_spec(path, ["decode.device=cpu", "trainer.ranks=0"])
    assert list(dict(exc.value.problems)) == ["trainer.ranks"]


def test_load_spec_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as exc:
        load_spec(missing)
    assert "no such pipeline spec" in str(exc.value)
    assert str(missing) in str(exc.value)


def test_load_spec_bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(path)


def test_bad_overrides():
    with pytest.raises(ConfigError, match="field.path=value"):
        apply_override({}, "trainer.ranks")
    with pytest.raises(ConfigError, match="name is not a section"):
        apply_override({"name": "x"}, "name.sub=1")
    raw = {}
    apply_override(raw, "a.b.c= 7 ")
    assert raw == {"a": {"b": {"c": 7}}}


# --------------------------------------------------------------------------- drift: spec <-> mixer


@pytest.mark.parametrize("method", sorted(m for m in MIX_SPECS if m != "none"))
def test_mix_spec_fields_are_mixer_keywords(method):
    assert method in METHODS
    params = inspect.signature(METHODS[method]).parameters
    keyword = {name for name, p in params.items()
               if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)}
    fields = set(MIX_SPECS[method].model_fields) - {"method"}
    missing = fields - keyword
    assert not missing, f"{method}: spec fields {sorted(missing)} are not parameters of the mixer"


def test_mix_spec_methods_match_registry():
    assert set(MIX_SPECS) == set(METHODS)


def test_spec_mix_section_builds_a_mixer():
    """Every field of a validated mix section can be passed to build_mixer as is."""
    import numpy as np
    import torch

    from mixflow.mix import build_mixer

    for raw in ({"method": "mixup", "alpha": 0.3, "mode": "pair"},
                {"method": "cutmix", "minmax": [0.2, 0.6], "correct_lam": False},
                {"method": "mixup_cutmix", "switch_prob": 0.3, "label_smoothing": 0.1}):
        s = validate_spec(spec(mix=raw))
        params = s.mix.model_dump()
        method = params.pop("method")
        mb = build_mixer(method, 10, **params)(torch.rand(4, 3, 16, 16), torch.arange(4), np.random.default_rng(0))
        # batch-mode mixup_cutmix reports the method it picked for the batch
        assert mb.method in ({method} if method != "mixup_cutmix" else {"mixup", "cutmix"})
        torch.testing.assert_close(mb.targets.sum(1), torch.ones(4))


def test_config_error_pickles_with_its_problems():
    """Raised inside an actor (a pipeline host validating its spec), it must reach the driver whole:
    Ray pickles it; a custom __init__ without __reduce__ comes back as UnserializableException."""
    import pickle

    from mixflow.errors import ConfigError

    error = pickle.loads(pickle.dumps(ConfigError([("decode.size", "must be positive")], "spec.yaml")))
    assert error.problems == [("decode.size", "must be positive")] and error.source == "spec.yaml"
    assert str(error) == "invalid pipeline spec in spec.yaml:\n  decode.size: must be positive"

"""Mixing methods from the library, run through the image pipeline's mixing stage and trainers."""

from __future__ import annotations

import math

import pytest

from mixflow.config import validate_spec
from mixflow.errors import ConfigError
from mixflow.runtime.image_pipeline import ImagePipeline
from tests.conftest import make_spec


def test_library_methods_run_through_the_pipeline_exactly_once(ray_session, digits_shards, tmp_path):
    mix = {"method": "choice", "choices": [{"weight": 1, "mix": {"method": "fmix", "alpha": 1.0}},
                                           {"weight": 1, "mix": {"method": "resizemix"}}]}
    spec = make_spec(digits_shards, tmp_path, mix=mix, trainer={"epochs": 1})
    summary = ImagePipeline(spec, show_progress=False).run()
    assert summary.exactly_once and summary.samples == 1797


def test_manifold_mixup_mixes_inside_the_model_and_trains(ray_session, digits_shards, tmp_path):
    spec = make_spec(digits_shards, tmp_path, mix={"method": "manifold_mixup", "layers": [0, 4]},
                     trainer={"epochs": 1, "model": "digits_cnn"})
    summary = ImagePipeline(spec, show_progress=False).run()
    assert summary.exactly_once
    assert all(math.isfinite(r.epoch_loss[0]) for r in summary.ranks)


@pytest.mark.parametrize("mix, trainer, message", [
    ({"method": "mix3d"}, {}, "mix.method 'mix3d' mixes point-cloud scenes, not images"),
    ({"method": "c_mixup"}, {}, "mix.method 'c_mixup' mixes regression targets, not images"),
    ({"method": "smmix"}, {"model": "digits_cnn"}, "mix.method 'smmix' needs the model's attention map"),
    ({"method": "manifold_mixup"}, {"model": "none"}, "finishes its mixing inside the model"),
    ({"method": "choice", "choices": [{"weight": 1, "mix": {"method": "beat_sync_mixup"}}]}, {},
     "mix.choices.0.mix: Input tag 'beat_sync_mixup' .* does not match any of the expected tags"),
])
def test_image_pipeline_rejects_methods_it_cannot_finish(digits_shards, tmp_path, mix, trainer, message):
    raw = {"name": "t", "data": {"shards": str(digits_shards), "num_classes": 10}, "mix": mix,
           "trainer": trainer}
    with pytest.raises(ConfigError, match=message):
        validate_spec(raw)

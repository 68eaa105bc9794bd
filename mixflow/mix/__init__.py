"""Batch mixing methods: pure torch, no Ray. ``f(x, y, rng, **params) -> MixedBatch``."""

from mixflow.mix.cutmix import cutmix
from mixflow.mix.mixed_batch import MixedBatch
from mixflow.mix.mixup import mixup
from mixflow.mix.mixup_cutmix import mixup_cutmix
from mixflow.mix.registry import METHODS, build_mixer

__all__ = ["MixedBatch", "mixup", "cutmix", "mixup_cutmix", "METHODS", "build_mixer"]

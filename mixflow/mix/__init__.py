"""Batch mixing methods: pure torch, no Ray. ``f(x, y, rng, **params) -> MixedBatch``.

``Mixup`` and ``FastCollateMixup`` are drop-ins for timm's classes of those names (same
signature, defaults and draws), built on the same kernels."""

from mixflow.mix.beat_sync_mixup import beat_sync_mixup
from mixflow.mix.c_mixup import c_mixup, c_mixup_probs, draw_partners
from mixflow.mix.cutmix import cutmix
from mixflow.mix.fmix import fmix
from mixflow.mix.fmix_masks import sample_fmix_masks
from mixflow.mix.manifold_mixup import manifold_mixup
from mixflow.mix.maskmix import maskmix
from mixflow.mix.method_choice import method_choice
from mixflow.mix.mix3d import mix3d
from mixflow.mix.mixed_batch import MixedBatch
from mixflow.mix.mixup import mixup
from mixflow.mix.mixup_cutmix import mixup_cutmix
from mixflow.mix.patch_mixing import patch_mixing
from mixflow.mix.plans import BoxPlan, LayerPlan, PatchMaskPlan, SideLengthPlan
from mixflow.mix.point_scenes import MixedScenes, PointScenes, pack_scenes
from mixflow.mix.registry import METHODS, build_mixer
from mixflow.mix.regression_batch import RegressionMixedBatch
from mixflow.mix.resizemix import resizemix
from mixflow.mix.smmix import smmix
from mixflow.mix.timm_collate import FastCollateMixup
from mixflow.mix.timm_mixup import Mixup
from mixflow.mix.transmix import transmix

__all__ = ["MixedBatch", "mixup", "cutmix", "mixup_cutmix", "resizemix", "fmix", "sample_fmix_masks", "maskmix",
           "patch_mixing", "method_choice", "METHODS", "build_mixer",
           "transmix", "smmix", "manifold_mixup", "BoxPlan", "SideLengthPlan", "PatchMaskPlan", "LayerPlan",
           "c_mixup", "c_mixup_probs", "draw_partners", "RegressionMixedBatch",
           "mix3d", "PointScenes", "MixedScenes", "pack_scenes", "beat_sync_mixup",
           "Mixup", "FastCollateMixup"]

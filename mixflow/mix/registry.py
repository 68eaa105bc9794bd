"""Config names -> mixing methods, so a pipeline spec can pick one (``mix.method``).

Every entry is called ``f(x, y, rng, **params)``. Methods whose data are not labelled
images keep that shape with their own ``x`` / ``y`` and return their own batch type:
``c_mixup`` (regression: float targets ``y``, returns a ``RegressionMixedBatch``),
``mix3d`` (``x`` a ``PointScenes``, ``y`` per-point labels, returns ``MixedScenes``) and
``beat_sync_mixup`` (audio; the per-batch beat metadata ``beats``/``beat_counts`` or
``tempo``/``first_beat`` are passed as keywords at call time).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mixflow.mix.beat_sync_mixup import beat_sync_mixup
from mixflow.mix.c_mixup import c_mixup
from mixflow.mix.checks import check_mix_call
from mixflow.mix.cutmix import cutmix
from mixflow.mix.fmix import fmix
from mixflow.mix.manifold_mixup import manifold_mixup
from mixflow.mix.maskmix import maskmix
from mixflow.mix.method_choice import method_choice
from mixflow.mix.mix3d import mix3d
from mixflow.mix.mixed_batch import MixedBatch, unmixed
from mixflow.mix.mixup import mixup
from mixflow.mix.mixup_cutmix import mixup_cutmix
from mixflow.mix.patch_mixing import patch_mixing
from mixflow.mix.resizemix import resizemix
from mixflow.mix.smmix import smmix
from mixflow.mix.transmix import transmix

MixFn = Callable[[torch.Tensor, torch.Tensor, np.random.Generator], MixedBatch]


def _none(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, *, num_classes: int,
          label_smoothing: float = 0.0) -> MixedBatch:
    check_mix_call(x, y, num_classes, label_smoothing=label_smoothing)
    return unmixed(x, y, num_classes, label_smoothing)


METHODS: dict[str, Callable[..., Any]] = {
    "none": _none,
    "mixup": mixup,
    "cutmix": cutmix,
    "mixup_cutmix": mixup_cutmix,
    "resizemix": resizemix,
    "fmix": fmix,
    "maskmix": maskmix,
    "patch_mixing": patch_mixing,
    "transmix": transmix,
    "smmix": smmix,
    "manifold_mixup": manifold_mixup,
    "c_mixup": c_mixup,
    "mix3d": mix3d,
    "beat_sync_mixup": beat_sync_mixup,
}
# Per-batch choice among the methods above (DeiT: MixUp or CutMix); it looks names up in METHODS.
METHODS["choice"] = functools.partial(method_choice, methods=METHODS)


def build_mixer(method: str, num_classes: int, **params: Any) -> MixFn:
    """Bind a method's parameters: the result is ``f(x, y, rng) -> MixedBatch``.

    ``num_classes`` is bound only for methods that take it (not regression or point clouds).
    """
    if method not in METHODS:
        raise ValueError(f"unknown mixing method {method!r}; choose one of {', '.join(METHODS)}")
    fn = METHODS[method]
    if "num_classes" in inspect.signature(fn).parameters:
        params = {"num_classes": num_classes, **params}
    return functools.partial(fn, **params)

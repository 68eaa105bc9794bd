"""Config names -> mixing methods, so a pipeline spec can pick one (``mix.method``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mixflow.mix.cutmix import cutmix
from mixflow.mix.mixed_batch import MixedBatch, unmixed
from mixflow.mix.mixup import mixup
from mixflow.mix.mixup_cutmix import mixup_cutmix

MixFn = Callable[[torch.Tensor, torch.Tensor, np.random.Generator], MixedBatch]


def _none(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, *, num_classes: int,
          label_smoothing: float = 0.0) -> MixedBatch:
    return unmixed(x, y, num_classes, label_smoothing)


METHODS: dict[str, Callable[..., MixedBatch]] = {
    "none": _none,
    "mixup": mixup,
    "cutmix": cutmix,
    "mixup_cutmix": mixup_cutmix,
}


def build_mixer(method: str, num_classes: int, **params: Any) -> MixFn:
    """Bind a method's parameters: the result is ``f(x, y, rng) -> MixedBatch``."""
    if method not in METHODS:
        raise ValueError(f"unknown mixing method {method!r}; choose one of {', '.join(METHODS)}")
    return functools.partial(METHODS[method], num_classes=num_classes, **params)

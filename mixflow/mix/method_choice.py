"""Per-batch choice among several mixing methods with given probabilities.

DeiT (Touvron et al., "Training data-efficient image transformers & distillation through
attention", ICML 2021) alternates MixUp (alpha 0.8) and CutMix (alpha 1.0) with switch
probability 0.5 and label smoothing 0.1; here that recipe reads
``choices=[{"weight": 0.5, "mix": {"method": "mixup", "alpha": 0.8}},
{"weight": 0.5, "mix": {"method": "cutmix", "alpha": 1.0}}]``, and any of the registered
methods (FMix, ResizeMix, MaskMix, ...) can join. With probability ``1 - prob`` the batch
is left unmixed; otherwise choice ``j`` is drawn with probability ``weight_j / sum(weight)``
from the same ``rng`` that then drives the chosen method, so the stream is reproducible.
Label smoothing is set once here and applies to whichever method is drawn.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mixflow.mix.checks import check_mix_call
from mixflow.mix.mixed_batch import MixedBatch, unmixed


@functools.lru_cache(maxsize=256)
def _parameters(fn: Callable[..., MixedBatch]) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def _prepare(choices: Sequence[Mapping[str, Any]], methods: Mapping[str, Callable[..., MixedBatch]],
             label_smoothing: float, seg: torch.Tensor | None) -> tuple[np.ndarray, list[tuple[Callable, dict]]]:
    if not choices:
        raise ValueError("choices must name at least one method")
    weights, calls = [], []
    for j, choice in enumerate(choices):
        if set(choice) != {"weight", "mix"}:
            raise ValueError(f"choices[{j}] must have exactly the keys 'weight' and 'mix', got {sorted(choice)}")
        weight = float(choice["weight"])
        if not np.isfinite(weight) or weight <= 0:
            raise ValueError(f"choices[{j}].weight must be a finite number > 0, got {choice['weight']!r}")
        params = dict(choice["mix"])
        name = params.pop("method", None)
        if name not in methods:
            raise ValueError(f"choices[{j}].mix.method {name!r} is unknown; choose one of {', '.join(methods)}")
        fn = methods[name]
        accepted = _parameters(fn)
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise ValueError(f"choices[{j}].mix: {name} has no parameters {unknown}")
        own = params.pop("label_smoothing", 0.0)
        if own not in (0.0, label_smoothing):
            raise ValueError(f"choices[{j}].mix.label_smoothing: set label_smoothing once on the choice, "
                             f"not per method (got {own} here, {label_smoothing} on the choice)")
        if seg is not None and "seg" not in accepted:
            raise ValueError(f"choices[{j}].mix.method {name!r} cannot mix segmentation masks (seg was given)")
        weights.append(weight)
        calls.append((fn, params))
    return np.asarray(weights) / np.sum(weights), calls


def method_choice(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, *, num_classes: int,
                  choices: Sequence[Mapping[str, Any]], methods: Mapping[str, Callable[..., MixedBatch]],
                  prob: float = 1.0, label_smoothing: float = 0.0, seg: torch.Tensor | None = None,
                  layout: str = "auto") -> MixedBatch:
    """Mix the batch with one method drawn from ``choices``; ``methods`` maps names to mixing functions."""
    check_mix_call(x, y, num_classes, prob=prob, label_smoothing=label_smoothing)
    probs, calls = _prepare(choices, methods, label_smoothing, seg)
    if prob < 1.0 and rng.random() >= prob:
        batch = unmixed(x, y, num_classes, label_smoothing)
        batch.seg = seg
        return batch
    fn, params = calls[int(rng.choice(len(calls), p=probs))]
    if "layout" in _parameters(fn):
        params["layout"] = layout
    if seg is not None:
        params["seg"] = seg
    return fn(x, y, rng, num_classes=num_classes, label_smoothing=label_smoothing, **params)

"""Argument checks shared by the mixing methods' public entry points.

Each check raises ``ValueError`` (``TypeError`` for a wrong kind of object) naming the
argument and what was expected, at the call, instead of letting a bad input turn into
silently wrong output (NaN lam and pixels, a channels-first batch mixed as channels-last,
every C-Mixup sample paired with one partner) or an error far from its cause (a label
outside ``num_classes`` found only when ``MixedBatch.targets`` is read).
"""

from __future__ import annotations

import math

import torch

# Channel counts a channels-last image / audio / volume batch has in its last dim.
CHANNEL_COUNTS = (1, 3, 4)
CHANNELS_LAST = {3: "NLC", 4: "NHWC", 5: "NDHWC"}
CHANNELS_FIRST = {3: "NCL", 4: "NCHW", 5: "NCDHW"}


def _number(value, name: str) -> float:
    if isinstance(value, (bool, str)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None


def check_alpha(value, name: str = "alpha", allow_zero: bool = False) -> None:
    """A Beta(alpha, alpha) parameter: a finite number > 0 (``allow_zero``: >= 0, 0 turning the method off)."""
    v = _number(value, name)
    if allow_zero:
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be >= 0 and finite (0 turns it off), got {value}")
    elif not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be > 0 and finite, got {value}")


def check_fraction(value, name: str, upper_open: bool = False) -> None:
    """A probability-like number in ``[0, 1]`` (``upper_open``: ``[0, 1)``)."""
    v = _number(value, name)
    if not (0.0 <= v < 1.0 if upper_open else 0.0 <= v <= 1.0):
        raise ValueError(f"{name} must be in [0, 1{')' if upper_open else ']'}, got {value}")


def check_labels(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
    """``y``: one integer class id in ``0..num_classes-1`` per sample of ``x``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor batch, got {type(x).__name__}")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor of class ids, got {type(y).__name__}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if y.dim() == 0 or len(y) != len(x) or y.numel() != len(x):
        raise ValueError(f"x has {len(x)} samples but y has {len(y) if y.dim() else 0} labels "
                         f"(shape {tuple(y.shape)}); y must hold one class id per sample")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer class ids, got dtype {y.dtype}")
    if y.numel():
        flat = y.reshape(-1)
        lo, hi = torch.aminmax(flat)
        if int(lo) < 0 or int(hi) >= num_classes:
            i = int(torch.nonzero((flat < 0) | (flat >= num_classes))[0, 0])
            raise ValueError(f"y holds label {int(flat[i])} at sample {i}, outside 0..{num_classes - 1} "
                             f"(num_classes={num_classes})")


def check_mix_call(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, prob: float = 1.0,
                   label_smoothing: float = 0.0, **alphas: float) -> None:
    """The arguments every labelled-image mixing method shares: ``x``/``y``/``num_classes`` as
    :func:`check_labels`, ``prob`` in [0, 1], ``label_smoothing`` in [0, 1), and each Beta
    parameter given by name: ``alpha`` must be > 0, others (``mixup_alpha``, ``cutmix_alpha``)
    >= 0 since 0 switches that method off."""
    check_labels(x, y, num_classes)
    check_fraction(prob, "prob")
    check_fraction(label_smoothing, "label_smoothing", upper_open=True)
    for name, value in alphas.items():
        check_alpha(value, name, allow_zero=name != "alpha")


def check_regression_targets(x: torch.Tensor, y: torch.Tensor) -> None:
    """C-Mixup: ``y [B]`` or ``[B, D]`` finite targets, one row per sample of ``x``."""
    if len(y) != len(x):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    check_finite_labels(y)


def check_finite_labels(y: torch.Tensor, name: str = "y") -> None:
    """Labels that a distance is computed on must be finite: one NaN makes every distance NaN."""
    if y.is_floating_point() and y.numel():
        rows = y.reshape(len(y), -1)
        bad = ~torch.isfinite(rows)
        if bool(bad.any()):
            i = int(torch.nonzero(bad.any(dim=1))[0, 0])
            value = rows[i][bad[i]][0].item()
            raise ValueError(f"{name} holds {value} at sample {i}; C-Mixup pairs samples by label distance, "
                             f"so every label must be finite")


def check_auto_layout(x: torch.Tensor) -> None:
    """``layout="auto"`` takes uint8 batches as channels-last (what decoders emit): refuse a uint8
    batch that looks channels-first (dim 1 a channel count 1/3/4, the last dim not), which would
    otherwise be mixed with its width taken for channels."""
    if (x.dtype == torch.uint8 and x.dim() in CHANNELS_LAST and x.shape[1] in CHANNEL_COUNTS
            and x.shape[-1] not in CHANNEL_COUNTS):
        last, first = CHANNELS_LAST[x.dim()], CHANNELS_FIRST[x.dim()]
        raise ValueError(f"x is a uint8 batch of shape {tuple(x.shape)} that looks {first} (channels first), "
                         f"but layout='auto' takes uint8 as {last} (channels last); pass layout='{first}' "
                         f"(or layout='{last}' if its last dim really is channels)")

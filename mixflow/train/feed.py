"""The trainer-side feed: turns delivered batches into torch tensors on the rank's device."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from mixflow.mix.buffer_pool import POOL


class BatchSource(Protocol):
    def get(self) -> dict | None: ...


@dataclass
class TorchBatch:
    """A mixed batch as the model wants it: float ``x [B, C, H, W]`` plus both label forms."""

    x: torch.Tensor
    targets: torch.Tensor
    y_a: torch.Tensor
    y_b: torch.Tensor
    lam: torch.Tensor
    keys: list[str]
    step: int
    perm: torch.Tensor | None = None
    plan: object = None
    method: str = "none"


class ReceivingFeed:
    """What every feed does with its source: take one epoch's batch dicts, timing the wait for
    each (``wait_s``) and recording the keys delivered (``keys``)."""

    def __init__(self, source: BatchSource):
        self.source = source
        self.keys: list[str] = []
        self.wait_s = 0.0

    def _received(self) -> Iterator[dict]:
        while True:
            start = time.perf_counter()
            batch = self.source.get()
            self.wait_s += time.perf_counter() - start
            if batch is None:
                return
            self.keys.extend(batch["keys"])
            yield batch


class Feed(ReceivingFeed):
    """Iterate one epoch of a rank's batches; records the keys delivered and the time spent waiting.

    With ``to_float`` (default) uint8 ``[B, H, W, C]`` images are converted to float
    ``[B, C, H, W]`` scaled to [0, 1] and normalised by ``mean``/``std`` here, on the
    rank's device, so the channels carry a quarter of the bytes. ``to_float=False``
    (and a batch that arrives as float already) hands over the delivered tensor as it is:
    on CPU, for a batch read from the mixer's shared-memory ring, it is a view of the
    slot and valid only until the next batch is fetched (clone it to keep it longer).
    """

    def __init__(self, source: BatchSource, device: str | torch.device = "cpu",
                 mean: tuple[float, ...] = (0.485, 0.456, 0.406), std: tuple[float, ...] = (0.229, 0.224, 0.225),
                 to_float: bool = True):
        super().__init__(source)
        self.to_float = to_float
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)
        # (x / 255 - mean) / std as x * scale + bias, per channel
        self._scale = [1.0 / (255.0 * s) for s in std]
        self._bias = [-m / s for m, s in zip(mean, std)]
        self.samples = 0

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, H, W, C]`` -> normalised float ``[B, C, H, W]`` (contiguous). On CPU one pass per
        channel into a recycled buffer (:data:`mixflow.mix.buffer_pool.POOL`: handed out again only
        once nothing refers to it), instead of four passes and two fresh, page-faulted batch-sized
        allocations (``permute().float()`` keeps the channels-last strides, ``contiguous()`` copies)."""
        if x.device.type != "cpu" or x.shape[-1] != len(self._scale):
            return x.permute(0, 3, 1, 2).float().div_(255.0).sub_(self.mean).div_(self.std).contiguous()
        b, h, w, c = x.shape
        out = POOL.take(torch.zeros((), dtype=torch.float32).expand(b, c, h, w))
        src = x.permute(0, 3, 1, 2)
        for k in range(c):
            torch.mul(src[:, k], self._scale[k], out=out[:, k]).add_(self._bias[k])
        return out

    def _to_torch(self, batch: dict) -> TorchBatch:
        with warnings.catch_warnings():  # object-store arrays are read-only; we never write into them
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(batch["x"]).to(self.device, non_blocking=True)
            as_t = lambda k: torch.from_numpy(np.asarray(batch[k])).to(self.device)  # noqa: E731
            labels = [as_t(k) for k in ("targets", "y_a", "y_b", "lam")]
            perm = as_t("perm") if "perm" in batch else None
        if self.to_float and x.dtype == torch.uint8:
            x = self._normalise(x)
        return TorchBatch(x.contiguous(), *labels, list(batch["keys"]), int(batch["step"]), perm,
                          batch.get("plan"), batch.get("method", "none"))

    def __iter__(self) -> Iterator[TorchBatch]:
        for batch in self._received():
            self.samples += len(batch["keys"])
            yield self._to_torch(batch)

"""One reader's decode stage: source -> checked samples -> crop windows -> DALI -> batch.

Pure (no Ray): the decoder actor wraps it, the benchmark's DALI-only baseline can
use the same pieces. Every payload is checked before it reaches DALI, and if DALI
still fails on a batch, the pipeline is rebuilt and the batch is decoded sample by
sample so one corrupt payload never takes its neighbours down.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mixflow.config import DecodeSpec
from mixflow.data.bad_samples import BadSamplePolicy
from mixflow.data.jpeg_header import JpegError, jpeg_info
from mixflow.data.listing import ShardInfo
from mixflow.data.webdataset_source import RawSample, WebDatasetSource
from mixflow.decode.crop_windows import random_resized_crop_windows
from mixflow.decode.dali_image_decoder import DaliImageDecoder
from mixflow.errors import DataError
from mixflow.seeding import numpy_rng

IMAGE_EXTS = ("jpg", "jpeg")
LABEL_EXT = "cls"


@dataclass(frozen=True)
class CheckedSample:
    key: str
    shard: str
    jpeg: np.ndarray
    label: int
    height: int
    width: int


def check_sample(raw: RawSample, num_classes: int) -> CheckedSample:
    """Raise :class:`DataError` (naming shard and key) unless the sample is decodable and labelled."""
    image = next((raw.components[e] for e in IMAGE_EXTS if e in raw.components), None)
    if image is None:
        raise DataError(f"missing image component (.jpg); has {sorted(raw.components)}", raw.shard, raw.key)
    if LABEL_EXT not in raw.components:
        raise DataError(f"missing label component (.{LABEL_EXT}); has {sorted(raw.components)}", raw.shard, raw.key)
    text = raw.components[LABEL_EXT].strip()
    try:
        label = int(text)
    except ValueError:
        raise DataError(f"label {text[:20]!r} is not an integer", raw.shard, raw.key) from None
    if not 0 <= label < num_classes:
        raise DataError(f"label {label} outside 0..{num_classes - 1} (data.num_classes={num_classes})",
                        raw.shard, raw.key)
    try:
        info = jpeg_info(image)
    except JpegError as exc:
        raise DataError(str(exc), raw.shard, raw.key) from None
    return CheckedSample(raw.key, raw.shard, np.frombuffer(image, dtype=np.uint8), label, info.height, info.width)


def dali_failure(exc: BaseException) -> str:
    """The line of a DALI error that says what failed (DALI wraps it in "Critical error in pipeline" lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "encountered:" in lines[:-1]:
        return lines[lines.index("encountered:") + 1]
    return lines[0] if lines else type(exc).__name__


class DecodeStage:
    """Produces decoded batches ``{keys, labels, images}`` for one reader, one epoch at a time."""

    def __init__(self, shards: list[ShardInfo], reader: int, num_readers: int, spec: DecodeSpec,
                 batch_size: int, num_classes: int, seed: int = 0, shuffle_window: int = 4,
                 on_error: str = "raise", device: str = "cpu"):
        self.source = WebDatasetSource(shards, reader, num_readers, seed, shuffle_window)
        self.spec = spec
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.seed = seed
        self.reader = reader
        self.device = device
        self.policy = BadSamplePolicy(on_error)
        self.batch_index = 0
        self.decoder = self._new_decoder()

    def _new_decoder(self) -> DaliImageDecoder:
        s = self.spec
        return DaliImageDecoder(s.size, self.batch_size, self.device, s.threads, s.antialias, s.normalize,
                                s.mean, s.std)

    def warm_up(self) -> None:
        """Decode the first batch once and rewind, so DALI's first-run allocations happen at start-up."""
        state = self.state_dict()
        self.next_batch()
        self.policy.drain()
        self.load_state_dict(state)

    def start_epoch(self, epoch: int) -> None:
        self.source.set_epoch(epoch)
        self.batch_index = 0

    def state_dict(self) -> dict[str, int]:
        return {**self.source.state_dict(), "batch_index": self.batch_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.source.load_state_dict(state)
        self.batch_index = int(state["batch_index"])

    def _collect(self) -> list[CheckedSample]:
        good: list[CheckedSample] = []
        while len(good) < self.batch_size and self.source.remaining:
            for shard, row in self.source.take(self.batch_size - len(good)):
                try:
                    good.append(check_sample(self.source.read(shard, row), self.num_classes))
                except DataError as err:
                    self.policy.handle(err, self.source.epoch)
        return good

    def next_batch(self) -> dict | None:
        """The next decoded batch of this epoch, or ``None`` when the epoch is done."""
        while samples := self._collect():
            rng = numpy_rng(self.seed, self.source.epoch, "crop", self.reader, self.batch_index)
            anchors, shapes = random_resized_crop_windows(
                np.array([s.height for s in samples]), np.array([s.width for s in samples]),
                self.spec.scale, self.spec.ratio, rng)
            flips = (rng.random(len(samples)) < self.spec.flip_prob).astype(np.int32)
            images, samples = self._decode(samples, anchors, shapes, flips)
            self.batch_index += 1
            if samples:  # else DALI rejected every sample (each recorded): try the next batch
                return {"keys": [s.key for s in samples], "labels": np.array([s.label for s in samples], np.int64),
                        "images": images, "epoch": self.source.epoch, "reader": self.reader,
                        "index": self.batch_index - 1}
        return None

    def _decode(self, samples, anchors, shapes, flips):
        try:
            return self.decoder.decode([s.jpeg for s in samples], anchors, shapes, flips), samples
        except Exception:  # noqa: BLE001 - DALI raises plain RuntimeErrors; isolate the culprit below
            self.decoder = self._new_decoder()
        kept, images = [], []
        for i, s in enumerate(samples):
            try:
                images.append(self.decoder.decode([s.jpeg], anchors[i:i + 1], shapes[i:i + 1], flips[i:i + 1])[0])
                kept.append(s)
            except Exception as exc:  # noqa: BLE001
                self.decoder = self._new_decoder()
                self.policy.handle(DataError(f"DALI could not decode the image: {dali_failure(exc)}",
                                             s.shard, s.key), self.source.epoch)
        return (np.stack(images) if images else None), kept

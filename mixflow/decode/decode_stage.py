"""One reader's decode stage: source -> checked samples -> crop windows -> DALI -> batch.

Pure (no Ray): the decoder actor wraps it, the benchmark's DALI-only baseline can
use the same pieces. Every payload is checked before it reaches DALI, and if DALI
still fails on a batch, the pipeline is rebuilt and the batch is decoded sample by
sample so one corrupt payload never takes its neighbours down. A payload whose
entropy-coded data is corrupt in a way libjpeg only warns about
(:mod:`mixflow.data.jpeg_entropy`) is decoded and delivered, and listed as *suspect*.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mixflow.config import DecodeSpec
from mixflow.data.bad_samples import BadSamplePolicy, SkipRecord
from mixflow.data.jpeg_entropy import entropy_walk
from mixflow.data.jpeg_header import JpegError, jpeg_header
from mixflow.data.listing import ShardInfo
from mixflow.data.webdataset_source import RawSample, WebDatasetSource
from mixflow.decode.crop_windows import random_resized_crop_windows
from mixflow.decode.dali_image_decoder import DaliImageDecoder
from mixflow.errors import DataError
from mixflow.seeding import numpy_rng

IMAGE_EXTS = ("jpg", "jpeg")
LABEL_EXT = "cls"
# PIL's ``Image.MAX_IMAGE_PIXELS``: a header claiming more is refused before DALI allocates for it.
DEFAULT_MAX_PIXELS = 89_478_485


@dataclass(frozen=True)
class CheckedSample:
    key: str
    shard: str
    jpeg: np.ndarray
    label: int
    height: int  # as decoded: the EXIF orientation applied (DALI draws crop windows in that frame)
    width: int
    suspect: str | None = None  # what libjpeg would warn about in the scan data (decoded all the same)


def check_sample(raw: RawSample, num_classes: int, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 check_scans: bool = True) -> CheckedSample:
    """Raise :class:`DataError` (naming shard and key) unless the sample is decodable and labelled.

    The size is the oriented one (EXIF orientations 5-8 swap width and height), and a header
    announcing more than ``max_pixels`` pixels (None: no limit) is refused before decoding.
    Scan data that libjpeg decodes with a "corrupt JPEG data" warning (garbage behind a valid
    header, a scan cut short) passes, with that warning in ``suspect``; scan headers or tables
    it cannot decode at all are refused (:func:`~mixflow.data.jpeg_entropy.entropy_walk`; skipped
    when ``check_scans`` is false)."""
    image = next((raw.components[e] for e in IMAGE_EXTS if e in raw.components), None)
    if image is None:
        raise DataError(f"missing image component (.jpg); has {sorted(raw.components)}", raw.shard, raw.key)
    if not image:
        raise DataError("image component is empty (0 bytes)", raw.shard, raw.key)
    if LABEL_EXT not in raw.components:
        raise DataError(f"missing label component (.{LABEL_EXT}); has {sorted(raw.components)}", raw.shard, raw.key)
    text = raw.components[LABEL_EXT].strip()
    try:
        label = int(text)
    except ValueError:
        raise DataError(f"label {text[:20].decode(errors='replace')!r} is not an integer", raw.shard,
                        raw.key) from None
    if not 0 <= label < num_classes:
        raise DataError(f"label {label} outside 0..{num_classes - 1} (data.num_classes={num_classes})",
                        raw.shard, raw.key)
    try:
        info = jpeg_header(image)
    except JpegError as exc:
        raise DataError(str(exc), raw.shard, raw.key) from None
    if max_pixels is not None and info.height * info.width > max_pixels:
        raise DataError(f"image too large: the header announces {info.width}x{info.height} = "
                        f"{info.height * info.width} pixels, over decode.max_pixels={max_pixels} "
                        f"({len(image)} bytes of data)", raw.shard, raw.key)
    jpeg = np.frombuffer(image, dtype=np.uint8)
    suspect = None
    if check_scans:
        try:
            _, suspect = entropy_walk(jpeg)
        except JpegError as exc:
            raise DataError(str(exc), raw.shard, raw.key) from None
    height, width = info.oriented_size
    return CheckedSample(raw.key, raw.shard, jpeg, label, height, width, suspect)


def dali_failure(exc: BaseException) -> str:
    """The line of a DALI error that says what failed (DALI wraps it in "Critical error in pipeline" lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "encountered:" in lines[:-1]:
        return lines[lines.index("encountered:") + 1]
    return lines[0] if lines else type(exc).__name__


class DecodeStage:
    """Decoded batches ``{keys, labels, images, ...}`` of one reader, addressed by ``(epoch, index)``.

    ``batch(epoch, index)`` is a pure function of the seed, the reader and the shards
    (the crop windows and flips come from ``(seed, epoch, "crop", reader, index)``), so a
    retried, replayed or resumed request returns the same batch, and a restarted reader
    is positioned at any batch without decoding the ones before it. Batch ``index``
    starts where batch ``index - 1`` ended in the reader's epoch sequence: at
    ``index * batch_size`` unless bad samples were skipped (``on_error: skip``), in which
    case the boundaries are found by checking sample headers (no decoding). The
    sequential ``start_epoch`` / ``next_batch`` walk the same batches in order.
    """

    def __init__(self, shards: list[ShardInfo], reader: int, num_readers: int, spec: DecodeSpec,
                 batch_size: int, num_classes: int, seed: int = 0, shuffle_window: int = 4,
                 on_error: str = "raise", device: str = "cpu", epoch_orders: dict[int, np.ndarray] | None = None):
        self.source = WebDatasetSource(shards, reader, num_readers, seed, shuffle_window)
        self._skip_rows = [frozenset(s.skip_rows) for s in shards]
        self.spec = spec
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.seed = seed
        self.reader = reader
        self.device = device
        self.policy = BadSamplePolicy(on_error)
        self.epoch_orders = dict(epoch_orders or {})  # epoch -> rows (shard, sample) replacing the seeded order
        self._epoch: int | None = None
        self._starts: dict[int, int] = {}  # batch index -> start position, for the current epoch
        self._walk = (0, 0)  # (epoch, next index) of the sequential walk
        self.decoder = self._new_decoder()

    def _new_decoder(self) -> DaliImageDecoder:
        s = self.spec
        return DaliImageDecoder(s.size, self.batch_size, self.device, s.threads, s.antialias, s.normalize,
                                s.mean, s.std, host_resize=s.host_resize(self.device))

    def warm_up(self, epoch: int = 0) -> None:
        """Decode the first batch of ``epoch`` once, so DALI's first-run allocations happen at start-up.

        A bad sample met here is left for the real request to report (it names the stage).
        """
        try:
            self.batch(epoch, 0)
        except DataError:
            pass
        self.policy.drain()

    def _use_epoch(self, epoch: int) -> None:
        if self._epoch != epoch:
            self.source.set_epoch(epoch, order=self.epoch_orders.get(epoch))
            self._epoch = epoch
            self._starts = {0: 0}

    def _collect(self, start: int) -> tuple[list[CheckedSample], list[DataError], int]:
        """Up to ``batch_size`` samples that pass :func:`check_sample`, read from ``start`` on; the
        rejected ones; the position after the last sample read."""
        self.source.position = start
        good: list[CheckedSample] = []
        rejected: list[DataError] = []
        while len(good) < self.batch_size and self.source.remaining:
            for shard, row in self.source.take(self.batch_size - len(good)):
                if row in self._skip_rows[shard]:  # a duplicate copy: quarantined once, by the listing
                    continue
                try:
                    good.append(check_sample(self.source.read(shard, row), self.num_classes,
                                             self.spec.max_pixels, self.spec.check_scans))
                except DataError as err:
                    rejected.append(err)
        return good, rejected, self.source.position

    def _start(self, index: int, hint: int | None) -> int:
        """Where batch ``index`` starts in this epoch's sequence (``len(source)`` when past the end)."""
        if index in self._starts:
            return self._starts[index]
        if hint is not None:
            return hint
        if self.policy.on_error == "raise":  # every earlier sample was good, or the run stopped
            return min(index * self.batch_size, len(self.source))
        known = max(i for i in self._starts if i < index)
        pos = self._starts[known]
        for i in range(known, index):  # headers only: which samples each earlier batch held
            if pos >= len(self.source):
                return pos
            pos = self._collect(pos)[2]
            self._starts[i + 1] = pos
        return pos

    def batch(self, epoch: int, index: int, start: int | None = None) -> dict | None:
        """Batch ``index`` of ``epoch``, or ``None`` past the epoch's end.

        ``start`` (optional) is where the batch starts, when the caller knows it from the
        previous batch's ``end``. The result has ``start``/``end`` (positions in the
        reader's epoch sequence), ``skipped`` (quarantine records of the samples in that
        range that could not be used) and ``suspect`` (records of the same shape for samples
        of the batch whose scan data libjpeg decodes with a warning: delivered, but listed).
        When every sample was bad, ``keys`` is empty and ``images`` is ``None``: the batch
        still counts, so the next index follows it.
        """
        if index < 0:
            raise ValueError(f"batch index must be >= 0, got {index}")
        self._use_epoch(epoch)
        start = self._start(index, start)
        if start >= len(self.source):
            return None
        samples, rejected, end = self._collect(start)
        for err in rejected:
            self.policy.handle(err, epoch)
        self._starts[index + 1] = end
        images = None
        if samples:
            rng = numpy_rng(self.seed, epoch, "crop", self.reader, index)
            anchors, shapes = random_resized_crop_windows(
                np.array([s.height for s in samples]), np.array([s.width for s in samples]),
                self.spec.scale, self.spec.ratio, rng)
            flips = (rng.random(len(samples)) < self.spec.flip_prob).astype(np.int32)
            images, samples = self._decode(samples, anchors, shapes, flips)
        suspect = [SkipRecord(s.shard, s.key, s.suspect, None, epoch) for s in samples if s.suspect]
        return {"keys": [s.key for s in samples], "labels": np.array([s.label for s in samples], np.int64),
                "images": images, "epoch": epoch, "reader": self.reader, "index": index, "start": start,
                "end": end, "skipped": self.policy.drain(), "suspect": suspect}

    def start_epoch(self, epoch: int) -> None:
        """Begin the sequential walk of ``epoch`` (see :meth:`next_batch`)."""
        self._walk = (epoch, 0)

    def next_batch(self) -> dict | None:
        """The next non-empty batch of the walk, or ``None`` at the epoch's end; the quarantine
        records of any all-bad batch passed over are added to the returned batch's ``skipped``
        (at the epoch's end, with no batch left to carry them, they stay in ``policy.records``)."""
        epoch, index = self._walk
        carried = []
        while (out := self.batch(epoch, index)) is not None:
            index += 1
            self._walk = (epoch, index)
            carried += out["skipped"]
            if out["keys"]:
                return {**out, "skipped": carried}
        self.policy.records = carried + self.policy.records
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

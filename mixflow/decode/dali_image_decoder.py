"""DALI pipeline: ROI JPEG decode + resize + flip (+ normalize), fed with our crop windows.

The encoded bytes, crop windows and flip flags come in through ``external_source``
so every random choice is made (and checkpointed) by mixflow, not by DALI's RNG.
On CPU the pipeline is built with ``device_id=None``; on GPU decoding is ``mixed``
(nvJPEG) and resizing runs on the device. Outputs come back as numpy on the host.

Host resize (``host_resize=True``, CPU only): DALI decodes just the crop window
(``decoders.image_slice``, ROI decode) and OpenCV's bilinear ``resize`` scales it,
writing straight into the output batch, then mirrors flipped samples in place. On
this project's 2-core machine DALI's CPU ``resize`` of a typical crop costs about as
much as decoding it (~1 ms), OpenCV's a tenth of that; both sample at pixel centres
without antialiasing, so their outputs differ by rounding only.
"""

from __future__ import annotations

import cv2
import numpy as np
from nvidia.dali import fn, pipeline_def, types


class DaliImageDecoder:
    """Decode batches of JPEG bytes into ``[B, H, W, 3]`` uint8 (or ``[B, 3, H, W]`` float32)."""

    def __init__(self, size: tuple[int, int], max_batch: int, device: str = "cpu", threads: int = 1,
                 antialias: bool = False, normalize: bool = False,
                 mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
                 std: tuple[float, float, float] = (0.229, 0.224, 0.225), device_id: int = 0,
                 host_resize: bool = False):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if host_resize and (device != "cpu" or antialias):
            raise ValueError(f"host_resize is the CPU path without antialias; got device={device!r}, "
                             f"antialias={antialias}")
        self.size = tuple(size)
        self.max_batch = max_batch
        self.device = device
        self.normalize = normalize
        self.host_resize = host_resize
        self.mean = np.asarray(mean, np.float32).reshape(1, 3, 1, 1) * 255
        self.std = np.asarray(std, np.float32).reshape(1, 3, 1, 1) * 255
        if host_resize:
            cv2.setNumThreads(1)  # one small image per call: threads would only contend with DALI's
        self._pipe = self._build(threads, antialias, mean, std, None if device == "cpu" else device_id)
        self._pipe.build()

    def _build(self, threads, antialias, mean, std, device_id):
        height, width = self.size
        decode_device = "cpu" if self.device == "cpu" else "mixed"
        normalize = self.normalize
        host_resize = self.host_resize

        @pipeline_def(batch_size=self.max_batch, num_threads=threads, device_id=device_id,
                      prefetch_queue_depth=1, exec_dynamic=True)
        def pipe():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
            anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)
            shape = fn.external_source(name="shape", dtype=types.FLOAT, ndim=1)
            img = fn.decoders.image_slice(jpegs, anchor, shape, device=decode_device, output_type=types.RGB,
                                          normalized_anchor=False, normalized_shape=False, axis_names="WH")
            if host_resize:
                return img
            flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
            img = fn.resize(img, resize_x=width, resize_y=height, antialias=antialias)
            if normalize:
                return fn.crop_mirror_normalize(img, mirror=flip, dtype=types.FLOAT, output_layout="CHW",
                                                mean=[m * 255 for m in mean], std=[s * 255 for s in std])
            return fn.flip(img, horizontal=flip)

        return pipe()

    def decode(self, jpegs: list[np.ndarray], anchors: np.ndarray, shapes: np.ndarray,
               flips: np.ndarray) -> np.ndarray:
        """Decode one batch (``len(jpegs) <= max_batch``); windows in pixels as (x, y) / (w, h)."""
        n = len(jpegs)
        if not 0 < n <= self.max_batch:
            raise ValueError(f"batch of {n} samples; expected 1..{self.max_batch}")
        self._pipe.feed_input("jpegs", jpegs)
        self._pipe.feed_input("anchor", list(np.ascontiguousarray(anchors, np.float32)))
        self._pipe.feed_input("shape", list(np.ascontiguousarray(shapes, np.float32)))
        if not self.host_resize:  # the host flips: DALI's graph has no flip input then
            self._pipe.feed_input("flip", list(np.asarray(flips, np.int32)))
        (out,) = self._pipe.run()
        if self.host_resize:
            return self._resize_on_host(out, flips)
        if self.device == "gpu":
            out = out.as_cpu()
        return out.as_array()

    def _resize_on_host(self, crops, flips: np.ndarray) -> np.ndarray:
        """OpenCV bilinear resize of each decoded crop into the batch, flipped ones mirrored in place
        (then normalized to float CHW when asked)."""
        height, width = self.size
        batch = np.empty((len(crops), height, width, 3), np.uint8)
        for i in range(len(crops)):
            cv2.resize(np.asarray(crops[i]), (width, height), dst=batch[i], interpolation=cv2.INTER_LINEAR)
            if flips[i]:
                cv2.flip(batch[i], 1, dst=batch[i])
        if not self.normalize:
            return batch
        chw = batch.transpose(0, 3, 1, 2).astype(np.float32)
        return np.ascontiguousarray((chw - self.mean) / self.std)

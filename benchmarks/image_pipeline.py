#!/usr/bin/env python
"""Image pipeline benchmark: mixflow vs DALI alone vs torch DataLoader vs Ray Data.

Builds the ``photos`` demo shard set once (real ~500x375 JPEG photographs, 3 classes)
and runs each variant on the same shards in this one process. Every variant
delivers ``--epochs`` epochs (every sample once per epoch) of ``--size`` x ``--size``
RandomResizedCrop + flip images to TWO consumers, which only touch the data (one
byte per batch) and do no training:

  (a) mixflow end to end (:func:`run_mixflow`): decoder, mixer and trainer-rank actors,
      MixUp/CutMix, credit-based channels; timed over its streaming phase.
  (b) the same DALI ROI-decode pipeline alone: mixflow's ``DecodeStage`` (one reader:
      source, sample checks, crop windows, ``DaliImageDecoder`` on CPU), no Ray and no
      mixing; batches alternate between the two consumers. The ceiling.
  (c) torch ``DataLoader`` (2 workers) over a map-style dataset that ``pread``s the
      bytes through the tar index, PIL decode + RandomResizedCrop + flip, and a
      timm-style ``FastCollateMixup`` collate (written here, modelled on timm).
  (d) Ray Data: ``read_webdataset`` + ``map_batches`` (PIL decode + crop + flip +
      timm-style mixup/cutmix) + ``streaming_split(2, equal=False)`` consumed by
      two zero-CPU Ray actors.

Timing: ``seconds`` is wall time from building the variant's pipeline to the last
batch reaching both consumers (pipeline construction, DataLoader worker fork, DALI
pipeline build, Ray Data planning and its SplitCoordinator actor all included).
Not timed: heavy imports (torch, nvidia.dali, ray.data), ``ray.init`` plus a
warm-up of Ray's two pooled workers (done once, before the first Ray variant), and
the start of (d)'s two consumer actors (they stand for trainer ranks, which exist
before any data pipeline). ``1st batch s`` is the latency to the first delivered
batch. (c) runs first, all its rounds, so that its torch workers are forked
before Ray starts. Then Ray starts and (b), (a), (d) run round after round, so that
every (a) round has a (b) round right before it: the host's speed drifts over minutes
(other tenants' load, shown as ``steal %``, the share of CPU time the hypervisor
took), and (a)/(b) compares rounds run under about the same conditions. Ray's idle
daemons run beside (b) (a few % of one core). Every round starts once the machine is
idle (at most 15% busy over half a second; :func:`wait_for_quiet`), not while the
previous round's processes still exit or Ray starts workers to replace them. The table reports the round with the
median rate and lists every round's. Timings on a 2-core machine are noisy (single
runs varied by +-20%): targets are compared on the medians, reported as PASS/MISS,
never asserted.

Usage::

    python benchmarks/image_pipeline.py [--samples 1024] [--batch-size 64] [--size 224]
        [--epochs 1] [--rounds 5] [--only a,b,c,d] [--out DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# Run from a checkout (``python benchmarks/image_pipeline.py``): import this tree's mixflow.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from benchmarks.timm_style import fast_collate_output, fast_collate_sample  # noqa: E402

# The recipe every variant follows (DeiT / timm defaults).
SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
MIXUP_ALPHA = 0.8
CUTMIX_ALPHA = 1.0
SWITCH_PROB = 0.5
LABEL_SMOOTHING = 0.1
NUM_CONSUMERS = 2
CPUS = 2

# (a) must reach this many times (b)/(c)/(d) samples/s.
TARGETS = (("b", 0.85), ("c", 1.3), ("d", 1.5))
VARIANTS = {
    "a": "mixflow (Ray + DALI + mix)",
    "b": "DALI alone (no Ray, no mix)",
    "c": "torch DataLoader + PIL + timm collate",
    "d": "Ray Data + PIL + timm mix",
}
RAY_VARIANTS = ("a", "d")
FORKING_VARIANTS = ("c",)  # run before Ray starts (see module docstring)
RUN_ORDER = ("c", "b", "a", "d")


# --------------------------------------------------------------------------------------
# (a) mixflow: the adapter
# --------------------------------------------------------------------------------------

def run_mixflow(shard_dir, batch_size, size, num_classes, epochs=1, decode_threads=1):
    """Run mixflow end to end over ``shard_dir``: returns its :class:`RunSummary`.

    ``epochs`` epochs of ``size`` x ``size`` RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3)
    + flip, MixUp 0.8 / CutMix 1.0 / switch 0.5 / label smoothing 0.1, batches of
    ``batch_size`` delivered to TWO trainer ranks that touch each batch (model "none").
    The summary's ``wall_s`` is the streaming time (first epoch start to last batch
    delivered); actor start-up is reported apart as ``startup_s``, just as (d)'s
    consumer actors are started before its timer.
    """
    from mixflow.config import validate_spec
    from mixflow.runtime.image_pipeline import ImagePipeline

    spec = validate_spec({
        "name": "bench_image_pipeline",
        "run_dir": os.path.join(tempfile.gettempdir(), "mixflow-bench-run"),
        "data": {"shards": str(shard_dir), "num_classes": num_classes},
        "decode": {"device": "cpu", "size": [size, size], "threads": decode_threads},
        "mix": {"method": "mixup_cutmix", "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "switch_prob": 0.5,
                "label_smoothing": 0.1},
        "channel": {"max_items": 4, "max_bytes": "128MiB"},
        "trainer": {"ranks": NUM_CONSUMERS, "epochs": epochs, "batch_size": batch_size, "model": "none"},
    })
    return ImagePipeline(spec, show_progress=False).run()


# --------------------------------------------------------------------------------------
# Shared helpers: PIL RandomResizedCrop and a timm-style FastCollateMixup
# --------------------------------------------------------------------------------------

def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = SCALE,
                            ratio: tuple[float, float] = RATIO) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` as a PIL box ``(left, top, right, bottom)``.

    Up to 10 attempts of area ``U(scale) * W * H`` and log-uniform aspect ratio; if
    none fits, a centre crop with the aspect ratio clamped to ``ratio``.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def pil_random_resized_crop(data: bytes, size: int, rng: np.random.Generator) -> np.ndarray:
    """Decode JPEG bytes with PIL, RandomResizedCrop to ``size`` x ``size`` (bilinear), random
    horizontal flip (p=0.5); returns ``uint8 [size, size, 3]`` (HWC), like torchvision + ToNumpy."""
    img = Image.open(io.BytesIO(data))
    img = img.convert("RGB")
    box = random_resized_crop_box(img.width, img.height, rng)
    img = img.resize((size, size), Image.BILINEAR, box=box)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img)


def timm_mix_params(rng: np.random.Generator, mixup_alpha: float = MIXUP_ALPHA,
                    cutmix_alpha: float = CUTMIX_ALPHA, switch_prob: float = SWITCH_PROB,
                    prob: float = 1.0) -> tuple[float, bool]:
    """timm ``Mixup._params_per_batch``: one ``(lam, use_cutmix)`` per batch."""
    if rng.random() >= prob:
        return 1.0, False
    use_cutmix = bool(rng.random() < switch_prob)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    return float(rng.beta(alpha, alpha)), use_cutmix


def timm_rand_bbox(h: int, w: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """timm (>= 1.0.29) ``rand_bbox``: cut ratio ``sqrt(1-lam)``, uniform centre, rows
    ``[cy - cut_h//2, cy + (cut_h+1)//2)`` and columns likewise, clipped; ``(yl, yh, xl, xh)``."""
    r = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * r), int(w * r)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    yl, yh = int(np.clip(cy - cut_h // 2, 0, h)), int(np.clip(cy + (cut_h + 1) // 2, 0, h))
    xl, xh = int(np.clip(cx - cut_w // 2, 0, w)), int(np.clip(cx + (cut_w + 1) // 2, 0, w))
    return yl, yh, xl, xh


def timm_mixup_target(labels: np.ndarray, num_classes: int, lam: float,
                      smoothing: float = LABEL_SMOOTHING) -> np.ndarray:
    """timm ``mixup_target`` with flip pairing: ``lam*onehot(y) + (1-lam)*onehot(y[::-1])``,
    label smoothing ``off = s/C``, ``on = 1 - s + off``; ``float32 [B, C]``."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    y1 = np.full((len(labels), num_classes), off, np.float32)
    y1[np.arange(len(labels)), labels] = on
    y2 = y1[::-1]
    return (y1 * lam + y2 * (1.0 - lam)).astype(np.float32)


def timm_mix_uint8(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                   num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """timm ``FastCollateMixup`` (batch mode) on a ``uint8 [B, H, W, C]`` batch.

    Partner of sample ``i`` is ``B-1-i`` (flip pairing). MixUp blends each sample in
    float32 and rounds back with ``np.rint``; CutMix pastes the partner's box and
    corrects lam to the pasted area. Returns the mixed uint8 batch and soft targets.
    Like timm, it loops over the samples (one image-sized float temporary at a time).
    """
    n, h, w = images.shape[:3]
    lam, use_cutmix = timm_mix_params(rng)
    out = fast_collate_output(images)
    if use_cutmix:
        yl, yh, xl, xh = timm_rand_bbox(h, w, lam, rng)
        lam = 1.0 - (yh - yl) * (xh - xl) / float(h * w)  # correct_lam
    box = (yl, yh, xl, xh) if use_cutmix else None
    for i in range(n):
        fast_collate_sample(out, images, i, n - 1 - i, lam, box)
    return out.numpy(), timm_mixup_target(np.asarray(labels, np.int64), num_classes, lam)


def touch(batch) -> int:
    """What a consumer does with a batch: read one byte (numpy array or torch tensor)."""
    return int(np.asarray(batch).reshape(-1)[0])


@dataclass
class Consumer:
    """A stand-in trainer rank: counts samples, touches one byte a batch, remembers keys."""

    samples: int = 0
    batches: int = 0
    checksum: int = 0
    first_batch_at: float | None = None  # time.time()
    keys: list[str] = field(default_factory=list)

    def consume(self, images, keys: Iterable[str]) -> None:
        if self.first_batch_at is None:
            self.first_batch_at = time.time()
        self.samples += len(images)
        self.batches += 1
        self.checksum += touch(images)
        self.keys.extend(keys)


# --------------------------------------------------------------------------------------
# Data set
# --------------------------------------------------------------------------------------

def prepare_shards(out_root: str | Path, num_samples: int) -> Path:
    """Build (once) the photos demo set under ``<out_root>/photos-<N>``; reuse it when complete."""
    from mixflow.data.demo_sets import build_demo
    from mixflow.data.listing import list_shards

    shard_dir = Path(out_root) / f"photos-{num_samples}"
    marker = shard_dir / ".complete"
    if marker.exists():
        try:
            if sum(s.num_samples for s in list_shards(shard_dir)) == num_samples:
                print(f"reusing {num_samples} samples in {shard_dir}")
                return shard_dir
        except Exception:  # noqa: BLE001 - anything odd: rebuild
            pass
    shard_dir.mkdir(parents=True, exist_ok=True)
    for old in list(shard_dir.glob("photos-*.tar")) + list(shard_dir.glob("photos-*.idx")):
        old.unlink()
    t0 = time.perf_counter()
    build_demo("photos", shard_dir, num_samples=num_samples)
    marker.write_text(str(num_samples))
    print(f"built {num_samples} samples in {shard_dir} ({time.perf_counter() - t0:.1f}s)")
    return shard_dir


def num_classes_of(shard_dir: Path) -> int:
    return int(json.loads((shard_dir / "classes.json").read_text())["num_classes"])


# --------------------------------------------------------------------------------------
# (b) DALI alone
# --------------------------------------------------------------------------------------

def run_dali(shard_dir: Path, batch_size: int, size: int, num_classes: int, epochs: int,
             consumers: list[Consumer]) -> int:
    """mixflow's decode stage (source + checks + crop windows + DALI CPU decoder), one process,
    one reader, no Ray, no mixing. Batches alternate between the consumers (batch ``k`` to ``k % 2``).
    """
    from mixflow.config import DecodeSpec
    from mixflow.data.listing import list_shards
    from mixflow.decode.decode_stage import DecodeStage

    spec = DecodeSpec(device="cpu", size=(size, size), scale=SCALE, ratio=RATIO, threads=CPUS)
    stage = DecodeStage(list_shards(shard_dir), reader=0, num_readers=1, spec=spec, batch_size=batch_size,
                        num_classes=num_classes)
    step = delivered = 0
    try:
        for epoch in range(epochs):
            stage.start_epoch(epoch)
            while (batch := stage.next_batch()) is not None:
                consumers[step % NUM_CONSUMERS].consume(batch["images"], batch["keys"])
                delivered += len(batch["keys"])
                step += 1
    finally:
        stage.source.close()
    return delivered


# --------------------------------------------------------------------------------------
# (c) torch DataLoader
# --------------------------------------------------------------------------------------

def _index_entries(shard_dir: Path) -> list[tuple[str, int, int, int, int, str]]:
    """``(tar, jpg_offset, jpg_size, cls_offset, cls_size, key)`` for every sample, from the .idx files."""
    from mixflow.data.listing import list_shards
    from mixflow.data.tar_index import read_index

    entries = []
    for shard in list_shards(shard_dir):
        for s in read_index(shard.index_path, shard=shard.path):
            jpg, cls = s.components["jpg"], s.components["cls"]
            entries.append((shard.path, jpg.offset, jpg.size, cls.offset, cls.size, s.key))
    return entries


def _process_rng(tag: str) -> np.random.Generator:
    """A generator for this process (DataLoader worker or main), seeded from torch's per-worker seed."""
    import torch

    return np.random.default_rng([torch.initial_seed() % 2**63, zlib.crc32(tag.encode())])


class TarJpegDataset:
    """Map-style dataset: ``pread`` a sample's bytes via the tar index, PIL RandomResizedCrop + flip.

    Returns ``(uint8 [S, S, 3], label, key)``. File descriptors and the RNG are created
    lazily in each worker process (after the fork).
    """

    def __init__(self, shard_dir: Path, size: int):
        self.entries = _index_entries(shard_dir)
        self.size = size
        self._fds: dict[str, int] = {}
        self._rng: np.random.Generator | None = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        if self._pid != os.getpid():  # fresh process: own fds and RNG
            self._pid, self._fds, self._rng = os.getpid(), {}, _process_rng("dataset")
        path, joff, jsize, coff, csize, key = self.entries[i]
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        jpg = os.pread(fd, jsize, joff)
        label = int(os.pread(fd, csize, coff))
        return pil_random_resized_crop(jpg, self.size, self._rng), label, key


class FastCollateMixup:
    """timm-style ``FastCollateMixup`` collate: stack uint8, MixUp/CutMix per batch (flip pairing,
    ``np.rint`` rounding, box paste), soft targets with label smoothing.

    Returns ``(uint8 tensor [B, S, S, 3], float32 tensor [B, C], keys)``.
    """

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self._rng: np.random.Generator | None = None
        self._pid = None

    def __call__(self, batch):
        import torch

        if self._pid != os.getpid():
            self._pid, self._rng = os.getpid(), _process_rng("collate")
        imgs, labels, keys = zip(*batch)
        x = np.stack(imgs)
        mixed, targets = timm_mix_uint8(x, np.array(labels, np.int64), self._rng, self.num_classes)
        return torch.from_numpy(mixed), torch.from_numpy(targets), list(keys)


def run_torch(shard_dir: Path, batch_size: int, size: int, num_classes: int, epochs: int,
              consumers: list[Consumer]) -> int:
    """One DataLoader, ``num_workers=2``, shuffled; batches alternate between the two consumers.

    Split choice: a single loader with 2 workers whose batches go to consumer ``k % 2``
    (the per-rank split a DistributedSampler would make, served round-robin) keeps the
    2 workers busy on the whole epoch; two loaders over halves with 1 worker each would
    also use 2 workers but could leave one idle at the end of an uneven split.
    """
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(TarJpegDataset(shard_dir, size), batch_size=batch_size, shuffle=True,
                        num_workers=CPUS, collate_fn=FastCollateMixup(num_classes),
                        generator=torch.Generator().manual_seed(0), persistent_workers=epochs > 1,
                        prefetch_factor=2, drop_last=False)
    step = delivered = 0
    for _ in range(epochs):
        for images, targets, keys in loader:
            consumers[step % NUM_CONSUMERS].consume(images, keys)
            delivered += len(images)
            step += 1
    return delivered


# --------------------------------------------------------------------------------------
# (d) Ray Data
# --------------------------------------------------------------------------------------

def ray_decode_crop_mix(batch: dict, size: int, num_classes: int) -> dict:
    """``map_batches`` UDF: PIL decode + RandomResizedCrop + flip per sample, timm mix per batch.

    Input columns (``read_webdataset(..., decoder=None)``): ``jpg`` and ``cls`` as raw
    bytes, ``__key__``, ``__url__``. Output: ``image`` uint8 [n, S, S, 3], ``target``
    float32 [n, C], ``__key__``.
    """
    keys = batch["__key__"]
    rng = np.random.default_rng(zlib.crc32(str(keys[0]).encode()) if len(keys) else 0)
    imgs = np.stack([pil_random_resized_crop(bytes(b), size, rng) for b in batch["jpg"]])
    labels = np.array([int(c) for c in batch["cls"]], np.int64)
    mixed, targets = timm_mix_uint8(imgs, labels, rng, num_classes)
    return {"image": mixed, "target": targets, "__key__": np.asarray(keys, dtype=object)}


def _ray_consumer_class():
    import ray

    @ray.remote(num_cpus=0)
    class RayDataConsumer:
        """A zero-CPU actor standing in for a trainer rank: iterates its split."""

        def ready(self) -> bool:
            return True

        def consume(self, it, epochs: int, batch_size: int) -> dict:
            c = Consumer()
            for _ in range(epochs):
                for b in it.iter_batches(batch_size=batch_size, batch_format="numpy"):
                    c.consume(b["image"], b["__key__"].tolist())
            return {"samples": c.samples, "batches": c.batches, "checksum": c.checksum,
                    "first_batch_at": c.first_batch_at, "keys": c.keys}

    return RayDataConsumer


def start_ray_data_consumers() -> list:
    """The two consumer actors of (d), started and ready. They stand for trainer ranks that
    exist before the data pipeline does, so the harness starts them outside (d)'s timer."""
    import ray

    actor_cls = _ray_consumer_class()
    actors = [actor_cls.remote() for _ in range(NUM_CONSUMERS)]
    ray.get([a.ready.remote() for a in actors])
    return actors


def run_ray_data(shard_dir: Path, batch_size: int, size: int, num_classes: int, epochs: int,
                 consumers: list[Consumer], actors: list | None = None) -> int:
    """``read_webdataset`` -> ``map_batches`` -> ``streaming_split(2, equal=False)`` -> 2 actors.

    Ray 2.60 notes (checked against the installed version):

    * ``read_webdataset(dir)`` reads EVERY file of the directory as a tar (our ``.idx``
      and ``classes.json`` included, failing with "truncated header"), hence
      ``file_extensions=["tar"]``.
    * ``decoder=False`` does NOT turn decoding off (a non-callable decoder is passed as
      a format hint to the default decoder, which still decodes ``.jpg`` to a full-size
      numpy array in the read task and ``.cls`` to int); ``decoder=None`` keeps raw bytes.
      We keep bytes and decode in ``map_batches``, like (c) does in its workers.
    * Columns are the member extensions: ``jpg``, ``cls``, plus ``__key__`` and ``__url__``.
    * ``streaming_split`` iterators must be consumed concurrently (one coordinator feeds
      both), so each goes to its own actor; ``num_cpus=0`` so they do not take the 2 CPUs
      from the map tasks.
    """
    import ray
    import ray.data

    if __name__ != "__main__":  # imported as a module: ship our UDF / actor code by value
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ds = ray.data.read_webdataset(str(shard_dir), decoder=None, file_extensions=["tar"])
    ds = ds.map_batches(ray_decode_crop_mix, batch_size=batch_size, batch_format="numpy",
                        fn_kwargs={"size": size, "num_classes": num_classes})
    splits = ds.streaming_split(NUM_CONSUMERS, equal=False)
    own_actors = actors is None
    if own_actors:
        actors = start_ray_data_consumers()
    results = ray.get([a.consume.remote(it, epochs, batch_size) for a, it in zip(actors, splits)])
    for c, r in zip(consumers, results):
        c.samples, c.batches, c.checksum = r["samples"], r["batches"], r["checksum"]
        c.first_batch_at, c.keys = r["first_batch_at"], r["keys"]
    if own_actors:
        for a in actors:
            ray.kill(a)
    return sum(r["samples"] for r in results)


# --------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------

@dataclass
class Result:
    variant: str
    status: str = "ok"  # ok | skipped | failed
    samples: int = 0
    seconds: float = 0.0
    first_batch_s: float | None = None
    per_consumer: list[int] | None = None
    note: str = ""
    steal_pct: float | None = None  # CPU time the hypervisor took during the round, % of all CPUs
    round_rates: list[float] = field(default_factory=list)  # samples/s of every round

    @property
    def rate(self) -> float:
        return self.samples / self.seconds if self.status == "ok" and self.seconds > 0 else 0.0


def _cpu_ticks() -> list[int] | None:
    """The aggregate ``cpu`` line of ``/proc/stat``: ticks since boot per state (user, nice,
    system, idle, iowait, irq, softirq, steal, ...), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def _busy_and_total(ticks: list[int]) -> tuple[int, int]:
    total = sum(ticks)
    return total - ticks[3] - (ticks[4] if len(ticks) > 4 else 0), total  # not idle or iowait


def wait_for_quiet(max_busy: float = 0.15, window_s: float = 0.5, timeout_s: float = 20.0) -> float:
    """Wait until the machine's CPUs are at most ``max_busy`` busy over ``window_s`` (at most
    ``timeout_s``): a variant's round must not start while the previous one's processes still
    exit, or Ray starts replacement workers. Returns the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        before = _cpu_ticks()
        time.sleep(window_s)
        after = _cpu_ticks()
        if before is None or after is None:
            break
        (busy0, total0), (busy1, total1) = _busy_and_total(before), _busy_and_total(after)
        if total1 <= total0 or (busy1 - busy0) / (total1 - total0) <= max_busy:
            break
    else:
        print(f"note: the machine stayed busier than {max_busy:.0%} for {timeout_s:.0f}s; round starts anyway")
    return time.perf_counter() - start


def host_steal_s() -> float | None:
    """CPU seconds the hypervisor has taken from this machine since boot (Linux ``/proc/stat``), or None."""
    ticks = _cpu_ticks()
    return ticks[7] / os.sysconf("SC_CLK_TCK") if ticks is not None and len(ticks) > 7 else None


def _init_ray() -> bool:
    """``ray.init(num_cpus=2, include_dashboard=False)`` unless already up; True if we started it."""
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if ray.is_initialized():
        return False
    t0 = time.perf_counter()
    ray.init(num_cpus=CPUS, include_dashboard=False, logging_level=logging.WARNING)
    t1 = time.perf_counter()
    _warm_ray_workers()
    print(f"ray.init {t1 - t0:.1f}s + worker warm-up {time.perf_counter() - t1:.1f}s (not counted in any variant)")
    return True


def _warm_ray_workers() -> None:
    """Start one pooled worker per CPU and import what the Ray variants import, so that
    neither (a) nor (d) pays the cold start for the other (they run one after another)."""
    import ray

    @ray.remote(num_cpus=1)
    def warm() -> int:
        import numpy  # noqa: F401
        import PIL.Image  # noqa: F401
        import ray.data  # noqa: F401

        time.sleep(0.5)  # hold the CPU so the second task gets its own worker
        return os.getpid()

    ray.get([warm.remote() for _ in range(CPUS)])


def preimport(only: Iterable[str]) -> None:
    """Import the heavy modules (torch, nvidia.dali via mixflow.decode, ray.data) before any timer:
    process-wide one-time costs, not the pipelines'."""
    t0 = time.perf_counter()
    import torch  # noqa: F401
    import torch.utils.data  # noqa: F401

    if {"a", "b"} & set(only):
        import mixflow.data.webdataset_source  # noqa: F401
        import mixflow.decode.crop_windows  # noqa: F401
        import mixflow.decode.dali_image_decoder  # noqa: F401
    if set(RAY_VARIANTS) & set(only):
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    print(f"imports {time.perf_counter() - t0:.1f}s (not counted in any variant)")


def _check_keys(result: Result, consumers: list[Consumer], expected_keys: set[str], epochs: int) -> None:
    seen = Counter(k for c in consumers for k in c.keys)
    missing = len(expected_keys - seen.keys())
    extra = len(seen.keys() - expected_keys)
    wrong = sum(1 for k, n in seen.items() if k in expected_keys and n != epochs)
    if missing or extra or wrong:
        result.note = f"keys: {missing} missing, {extra} unknown, {wrong} not seen {epochs}x"


def run_variant(name: str, fn: Callable[..., int] | None, shard_dir: Path, args, num_classes: int,
                expected_keys: set[str]) -> Result:
    result = Result(name)
    consumers = [Consumer() for _ in range(NUM_CONSUMERS)]
    extra: dict = {}
    try:
        if name == "d":
            extra["actors"] = start_ray_data_consumers()  # trainer ranks: outside the timer
        t_wall = time.time()
        t0 = time.perf_counter()
        steal0 = host_steal_s()
        if name == "a":
            summary = run_mixflow(str(shard_dir), args.batch_size, args.size, num_classes, args.epochs,
                                  args.decode_threads)
            result.samples = summary.samples
            result.per_consumer = [r.samples for r in summary.ranks]
            if not summary.exactly_once:
                result.note = "; ".join(ledger.describe() for ledger in summary.ledgers)
            print(f"(a) actor start-up {summary.startup_s:.1f}s (not counted, like (d)'s consumer actors)")
        else:
            result.samples = fn(shard_dir, args.batch_size, args.size, num_classes, args.epochs, consumers,
                                **extra)
        result.seconds = summary.wall_s if name == "a" else time.perf_counter() - t0
        steal1 = host_steal_s()
        if steal0 is not None and steal1 is not None:
            result.steal_pct = 100 * (steal1 - steal0) / ((time.perf_counter() - t0) * (os.cpu_count() or 1))
    except (NotImplementedError, ImportError) as exc:
        result.status, result.note = "skipped", f"{type(exc).__name__}: {exc}"
        print(f"({name}) skipped: {exc}")
        return result
    except Exception as exc:  # noqa: BLE001 - report and keep benchmarking the others
        traceback.print_exc()
        result.status, result.note = "failed", f"{type(exc).__name__}: {exc}"
        print(f"({name}) FAILED: {exc}")
        return result
    finally:
        if extra.get("actors"):
            import ray

            for actor in extra["actors"]:
                ray.kill(actor)
    firsts = [c.first_batch_at for c in consumers if c.first_batch_at is not None]
    if firsts:
        result.first_batch_s = min(firsts) - t_wall
    if name != "a":
        result.per_consumer = [c.samples for c in consumers]
        _check_keys(result, consumers, expected_keys, args.epochs)
    steal = f", host steal {result.steal_pct:.0f}%" if result.steal_pct is not None else ""
    print(f"({name}) {VARIANTS[name]}: {result.samples} samples in {result.seconds:.2f}s{steal}")
    return result


def median_round(rounds: list[Result], expected: int) -> Result:
    """The round with the median rate (the lower one of the middle two for an even count), with
    every round's rate in ``round_rates``; a round that failed, was skipped or lost or repeated
    samples is reported instead, since it makes the variant's figure invalid."""
    for r in rounds:
        if r.status == "ok" and r.samples != expected:
            r.note = "; ".join(filter(None, [f"delivered {r.samples} != {expected}", r.note]))
    bad = [r for r in rounds if r.status != "ok" or r.note]
    for r in bad:
        print(f"WARNING: ({r.variant}) {r.status}: {r.note}")
    ranked = sorted(rounds, key=lambda r: r.rate)
    chosen = bad[0] if bad else ranked[(len(ranked) - 1) // 2]
    chosen.round_rates = [r.rate for r in rounds]
    return chosen


def print_table(results: dict[str, Result], expected: int) -> None:
    base = results.get("b")
    base_rate = base.rate if base else 0.0
    header = ["variant", "samples", "seconds", "samples/s", "vs (b)", "rounds: samples/s", "1st batch s",
              "steal %", "per consumer", "note"]
    rows = []
    for name in VARIANTS:
        r = results.get(name)
        if r is None:
            continue
        label = f"({name}) {VARIANTS[name]}"
        if r.status != "ok":
            rows.append([label, "-", "-", "-", "-", "-", "-", "-", "-", f"{r.status}: {r.note.split(':')[0]}"])
            continue
        ratio = f"{r.rate / base_rate:.2f}x" if base_rate else "-"
        spread = " ".join(f"{v:.0f}" for v in r.round_rates)
        per = "/".join(str(n) for n in r.per_consumer) if r.per_consumer else "-"
        first = f"{r.first_batch_s:.2f}" if r.first_batch_s is not None else "-"
        steal = f"{r.steal_pct:.0f}" if r.steal_pct is not None else "-"
        rows.append([label, str(r.samples), f"{r.seconds:.2f}", f"{r.rate:.1f}", ratio, spread, first, steal, per,
                     r.note])
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"image pipeline: {expected} samples expected per variant; the round with "
                            f"the median rate of each variant")
        for i, h in enumerate(header):
            table.add_column(h, justify="right" if 0 < i < 8 else "left")
        for row in rows:
            table.add_row(*row)
        Console(width=None if sys.stdout.isatty() else 170).print(table)
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        for row in [header, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def check_targets(results: dict[str, Result]) -> None:
    a = results.get("a")
    print("targets:")
    for other, factor in TARGETS:
        o = results.get(other)
        label = f"  (a) >= {factor:.2f}x ({other})"
        if a is None or a.status != "ok":
            print(f"{label}: SKIP ((a) {'not run' if a is None else a.status})")
        elif o is None or o.status != "ok":
            print(f"{label}: SKIP (({other}) {'not run' if o is None else o.status})")
        else:
            got = a.rate / o.rate
            verdict = "PASS" if got >= factor else "MISS"
            bad = [f"({n}) {r.note}" for n, r in (("a", a), (other, o)) if r.note]
            if bad:  # a variant that lost or repeated samples is no valid comparison
                verdict = "INVALID"
            print(f"{label}: {verdict} ({got:.2f}x: {a.rate:.1f} vs {o.rate:.1f} samples/s)"
                  + (f" [{'; '.join(bad)}]" if bad else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1024, help="photos demo set size (default 1024)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=224, help="output image side")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5,
                        help="runs of each variant; the table reports the median round (default 5)")
    parser.add_argument("--decode-threads", type=int, default=1, help="DALI threads per mixflow decoder actor")
    parser.add_argument("--only", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "mixflow-bench"),
                        help="where the shard set lives (<out>/photos-<N>, reused when complete)")
    args = parser.parse_args(argv)
    only = [v.strip() for v in args.only.split(",") if v.strip()]
    bad = [v for v in only if v not in VARIANTS]
    if bad:
        parser.error(f"unknown variant(s) {bad}; choose from a,b,c,d")

    from mixflow.data.listing import dataset_keys, list_shards

    shard_dir = prepare_shards(args.out, args.samples)
    num_classes = num_classes_of(shard_dir)
    expected_keys = set(dataset_keys(list_shards(shard_dir)))
    expected = len(expected_keys) * args.epochs
    print(f"{len(expected_keys)} samples x {args.epochs} epoch(s), batch {args.batch_size}, "
          f"{args.size}x{args.size}, {num_classes} classes, {NUM_CONSUMERS} consumers, {os.cpu_count()} CPUs")

    preimport(only)
    fns = {"a": None, "b": run_dali, "c": run_torch, "d": run_ray_data}
    rounds: dict[str, list[Result]] = {name: [] for name in RUN_ORDER if name in only}
    ray_ready = started_ray = False
    t_all = time.perf_counter()
    try:
        # The forking variants' rounds before Ray starts, then the others round after round (module docstring).
        for group in ([n for n in rounds if n in FORKING_VARIANTS], [n for n in rounds if n not in FORKING_VARIANTS]):
            for r in range(args.rounds):
                for name in group:
                    if not ray_ready and set(group) & set(RAY_VARIANTS):
                        started_ray = _init_ray()  # shut down at the end only if we started it
                        ray_ready = True
                    waited = wait_for_quiet()
                    print(f"round {r + 1}/{args.rounds}: ({name}) after {waited:.1f}s waiting for an idle machine")
                    rounds[name].append(run_variant(name, fns[name], shard_dir, args, num_classes, expected_keys))
    finally:
        if started_ray:
            import ray

            ray.shutdown()

    results = {name: median_round(rs, expected) for name, rs in rounds.items()}
    print_table(results, expected)
    check_targets(results)
    print(f"total benchmark time {time.perf_counter() - t_all:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

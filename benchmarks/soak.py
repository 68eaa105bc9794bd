#!/usr/bin/env python
"""Soak: a slow trainer rank beside a fast one for minutes; memory stays within the configured bounds.

Runs mixflow's image pipeline (demo shards: ``digits`` or ``photos``) for many epochs
with rank ``--slow-rank`` throttled (``trainer.throttle``: a sleep per step) and every
other rank at full speed, model ``none`` (ranks only touch their batches, so no
collective ties the fast rank to the slow one). ``--minutes`` picks the number of
epochs from the throttle: the slow rank needs at least ``steps per epoch x throttle``
per epoch, so the run lasts at least that long.

While it runs, a sampler thread in the driver records every ``--sample-every`` seconds:

* per rank, the bytes and batches queued in its credit-based channel;
* per rank, the memory of its producer processes: its decoder actors, its mixer actor
  and its channel actor (which holds the queued batches). Memory is the process's
  resident set without the pages of Ray's shared-memory object store it has touched
  (``VmRSS - RssShmem`` from ``/proc/<pid>/status``, Linux): those pages are the
  object store's, bounded by the store, and would otherwise look like growth as the
  store reuses different pages; the channel bound covers the batches in the store;
* per rank, the samples its trainer has received.

The table then shows, per rank:

* ``in flight``: the channel's exact peak of bytes queued plus bytes of producers
  waiting for credit (tracked by the channel on every ``put``) against the bound the
  credit scheme promises, ``max_bytes + one batch`` (a producer may hold one batch
  while it waits); ``queued``: the exact peak of bytes queued against ``max_bytes``;
* ``memory``: producer memory at the first sample, after warm-up (the highest value in
  the first ``--warmup`` fraction of the sampling time: DALI and torch allocate their
  buffers during the first batches), at its peak and its growth (peak minus warm-up);
* stalls: the trainer's time waiting for data inside its epochs, the time it sat idle
  at the driver's epoch barrier (streaming time minus its time inside epochs), the
  longest gap without a new batch (sampled), and the producer's time waiting for
  channel credit (``put wait``, summed over the puts).

Verdicts: ``in flight`` PASS when the peak is within ``max_bytes`` plus the largest
batch; ``memory`` PASS when the growth after warm-up is at most ``--growth-mib``.
Speed is never asserted. ``--out FILE`` writes the report (with the sampled timeline)
as JSON.

Usage::

    python benchmarks/soak.py [--minutes 3 | --epochs N] [--demo digits|photos] [--shards DIR] [--num-classes N]
        [--throttle 0.2] [--slow-rank 1] [--ranks 2] [--batch-size 32] [--size 32] [--max-items 64]
        [--max-bytes 256KiB] [--readers-per-rank 1] [--sample-every 0.5] [--warmup 0.2] [--growth-mib 64]
        [--out soak.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Run from a checkout (``python benchmarks/soak.py``): import this tree's mixflow.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import ray  # noqa: E402

from mixflow.config import PipelineSpec, parse_bytes, validate_spec  # noqa: E402
from mixflow.data.listing import dataset_keys  # noqa: E402
from mixflow.runtime.image_pipeline import ImagePipeline, prepare_shards  # noqa: E402

MIB = 2**20


def process_memory(pid: int) -> int | None:
    """Resident bytes of ``pid`` without shared-memory pages (``VmRSS - RssShmem``), or ``None``
    once the process is gone. Reads ``/proc/<pid>/status`` (Linux)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    kib = {k: int(fields[k].split()[0]) for k in ("VmRSS", "RssShmem") if k in fields}
    if "VmRSS" not in kib:
        return None  # a zombie has no memory left
    return (kib["VmRSS"] - kib.get("RssShmem", 0)) * 1024


@dataclass
class Sample:
    t: float  # seconds since the sampler found the pipeline's actors
    queued_bytes: list[int]  # per rank
    queued_items: list[int]
    producer_memory: list[int | None]  # per rank: decoders + mixer + channel, see process_memory
    received: list[int]  # per rank: samples its trainer has received


@dataclass
class RankSoak:
    rank: int
    throttle_s: float
    samples: int
    steps: int
    wall_s: float  # time inside the rank's epochs
    trainer_wait_s: float  # waiting for data inside its epochs
    barrier_idle_s: float  # streaming time outside its epochs (waiting for the slowest rank)
    longest_gap_s: float  # longest sampled interval without a new batch
    put_wait_s: float  # producer time waiting for credit, summed over puts
    max_bytes: int  # the channel's configured byte bound
    max_items: int
    max_batch_bytes: int
    peak_queued_bytes: int
    peak_in_flight_bytes: int
    peak_items: int
    memory_start: int | None
    memory_warm: int | None
    memory_peak: int | None
    memory_end: int | None

    @property
    def in_flight_bound(self) -> int:
        return self.max_bytes + self.max_batch_bytes

    @property
    def in_flight_ratio(self) -> float:
        return self.peak_in_flight_bytes / self.in_flight_bound if self.in_flight_bound else 0.0

    @property
    def in_flight_ok(self) -> bool:
        return self.peak_in_flight_bytes <= self.in_flight_bound

    @property
    def memory_growth(self) -> int | None:
        if self.memory_peak is None or self.memory_warm is None:
            return None
        return self.memory_peak - self.memory_warm


@dataclass
class SoakReport:
    name: str
    epochs: int
    startup_s: float
    streaming_s: float
    exactly_once: bool
    sample_every_s: float
    warmup_fraction: float
    growth_limit: int
    ranks: list[RankSoak]
    timeline: list[Sample] = field(default_factory=list)

    def memory_ok(self, rank: RankSoak) -> bool:
        return rank.memory_growth is not None and rank.memory_growth <= self.growth_limit

    @property
    def passed(self) -> bool:
        return all(r.in_flight_ok and self.memory_ok(r) for r in self.ranks)

    def to_json(self) -> dict:
        out = asdict(self)
        for row, rank in zip(out["ranks"], self.ranks):
            row.update(in_flight_bound=rank.in_flight_bound, in_flight_ratio=rank.in_flight_ratio,
                       in_flight_ok=rank.in_flight_ok, memory_growth=rank.memory_growth,
                       memory_ok=self.memory_ok(rank))
        out["passed"] = self.passed
        return out

    def render(self) -> str:
        def mib(v: int | None) -> str:
            return "-" if v is None else f"{v / MIB:.1f}"

        def kib(v: int) -> str:
            return f"{v / 1024:.0f}"

        lines = [f"{self.name}: {self.epochs} epochs in {self.streaming_s:.1f} s streaming (+{self.startup_s:.1f} s "
                 f"start-up), {len(self.timeline)} readings every {self.sample_every_s} s; ledger "
                 f"{'exactly once' if self.exactly_once else 'NOT exactly once'}"]
        head = (f"{'rank':>4} {'throttle':>8} {'samples':>8} {'queued KiB':>14} {'in flight KiB':>18} {'ratio':>5} "
                f"{'verdict':>7} {'mem MiB start>warm>peak':>24} {'growth':>6} {'verdict':>7} {'data wait':>9} "
                f"{'barrier':>7} {'gap':>5} {'put wait':>8}")
        lines.append(head)
        for r in self.ranks:
            queued = f"{kib(r.peak_queued_bytes)}/{kib(r.max_bytes)}"
            flight = f"{kib(r.peak_in_flight_bytes)}/{kib(r.in_flight_bound)}"
            memory = f"{mib(r.memory_start)}>{mib(r.memory_warm)}>{mib(r.memory_peak)}"
            lines.append(
                f"{r.rank:>4} {r.throttle_s:>7.2f}s {r.samples:>8} {queued:>14} {flight:>18} {r.in_flight_ratio:>5.2f} "
                f"{'PASS' if r.in_flight_ok else 'MISS':>7} {memory:>24} {mib(r.memory_growth):>6} "
                f"{'PASS' if self.memory_ok(r) else 'MISS':>7} {r.trainer_wait_s:>8.1f}s {r.barrier_idle_s:>6.1f}s "
                f"{r.longest_gap_s:>4.1f}s {r.put_wait_s:>7.1f}s")
        lines.append(f"in flight: channel peak (queued + producers waiting for credit) vs max_bytes + largest batch; "
                     f"mem: decoders + mixer + channel of the rank, RSS without object-store pages; growth = peak - "
                     f"warm-up peak (first {self.warmup_fraction:.0%}), limit {mib(self.growth_limit)} MiB; data wait: "
                     f"trainer waiting for a batch inside its epochs; barrier: time outside its epochs (the driver "
                     f"starts each epoch on all ranks together); gap: longest sampled time without a new batch; "
                     f"put wait: producer waiting for channel credit")
        return "\n".join(lines)


class _Sampler(threading.Thread):
    """Samples a running :class:`ImagePipeline`'s channels, producer memory and trainer progress."""

    def __init__(self, pipe: ImagePipeline, every_s: float):
        super().__init__(name="soak-sampler", daemon=True)
        self.pipe = pipe
        self.every_s = every_s
        self.samples: list[Sample] = []
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)

    def run(self) -> None:
        try:
            self._sample()
        except ray.exceptions.RayActorError:
            pass  # the pipeline stopped and killed its actors
        except BaseException as exc:  # noqa: BLE001 - reported by run_soak
            self.error = exc

    def _sample(self) -> None:
        pipe = self.pipe
        while not pipe.trainers:  # set last by _start_actors: every other list is complete
            if self._halt.wait(0.05):
                return
        channels, mixers, decoders, trainers = list(pipe.channels), list(pipe.mixers), list(pipe.decoders), \
            list(pipe.trainers)
        k = pipe.spec.runtime.readers_per_rank
        groups = [decoders[r * k:(r + 1) * k] + [mixers[r], channels[r]] for r in range(len(channels))]
        pids = [ray.get([h.__ray_call__.remote(lambda actor: os.getpid()) for h in group]) for group in groups]
        start = time.perf_counter()
        while True:
            stats = ray.get([ch.stats.remote() for ch in channels])
            progress = ray.get([t.progress.remote() for t in trainers])
            memory = []
            for group in pids:
                values = [process_memory(pid) for pid in group]
                memory.append(None if None in values else sum(values))
            self.samples.append(Sample(time.perf_counter() - start, [s["bytes"] for s in stats],
                                       [s["items"] for s in stats], memory, [p["samples"] for p in progress]))
            if self._halt.wait(self.every_s):
                return


def _longest_gap(timeline: list[Sample], rank: int) -> float:
    """Longest sampled interval over which ``rank`` received no new batch."""
    longest, since = 0.0, None
    for prev, cur in zip(timeline, timeline[1:]):
        if cur.received[rank] == prev.received[rank]:
            since = prev.t if since is None else since
            longest = max(longest, cur.t - since)
        else:
            since = None
    return longest


def _memory_marks(timeline: list[Sample], rank: int, warmup_fraction: float) -> tuple:
    """(first, warm-up peak, peak, last) producer memory of ``rank`` over the timeline."""
    points = [(s.t, s.producer_memory[rank]) for s in timeline if s.producer_memory[rank] is not None]
    if not points:
        return None, None, None, None
    warm_until = points[0][0] + warmup_fraction * (points[-1][0] - points[0][0])
    warm = max(v for t, v in points if t <= warm_until)
    return points[0][1], warm, max(v for _, v in points), points[-1][1]


def run_soak(spec: PipelineSpec, sample_every_s: float = 0.5, warmup_fraction: float = 0.2,
             growth_limit: int = 64 * MIB) -> SoakReport:
    """Run ``spec`` through :class:`ImagePipeline` while sampling it; returns the report."""
    if sample_every_s <= 0:
        raise ValueError(f"sample_every_s must be > 0, got {sample_every_s}")
    if not 0 < warmup_fraction < 1:
        raise ValueError(f"warmup_fraction must be in (0, 1), got {warmup_fraction}")
    pipe = ImagePipeline(spec, show_progress=False)
    sampler = _Sampler(pipe, sample_every_s)
    sampler.start()
    try:
        summary = pipe.run()
    finally:
        sampler.stop()
    if sampler.error is not None:
        raise RuntimeError(f"soak sampler failed: {sampler.error!r}") from sampler.error
    timeline = sampler.samples
    ranks = []
    for r, (rs, peak) in enumerate(zip(summary.ranks, summary.channel_peaks)):
        start, warm, top, end = _memory_marks(timeline, r, warmup_fraction)
        ranks.append(RankSoak(
            rank=r, throttle_s=spec.trainer.throttle.get(r, 0.0), samples=rs.samples, steps=rs.steps,
            wall_s=rs.wall_s, trainer_wait_s=rs.wait_s, barrier_idle_s=max(0.0, summary.wall_s - rs.wall_s),
            longest_gap_s=_longest_gap(timeline, r), put_wait_s=peak["put_wait_s"], max_bytes=peak["max_bytes"],
            max_items=peak["max_items"], max_batch_bytes=peak["max_batch_bytes"],
            peak_queued_bytes=peak["peak_bytes"], peak_in_flight_bytes=peak["peak_in_flight"],
            peak_items=peak["peak_items"], memory_start=start, memory_warm=warm, memory_peak=top,
            memory_end=end))
    return SoakReport(spec.name, spec.trainer.epochs, summary.startup_s, summary.wall_s, summary.exactly_once,
                      sample_every_s, warmup_fraction, growth_limit, ranks, timeline)


def soak_spec(shards: str | Path, num_classes: int, run_dir: str | Path, *, epochs: int, throttle_s: float,
              slow_rank: int = 1, ranks: int = 2, batch_size: int = 32, size: int = 32, max_items: int = 64,
              max_bytes: int = 256 * 2**10, readers_per_rank: int = 1, demo: str | None = None,
              seed: int = 0) -> PipelineSpec:
    """The soak's pipeline: MixUp/CutMix batches to ``ranks`` model-less ranks, rank ``slow_rank``
    sleeping ``throttle_s`` per step, channels bounded by ``max_items`` and ``max_bytes``."""
    if throttle_s <= 0:
        raise ValueError(f"throttle_s must be > 0 (the slow rank's sleep per step), got {throttle_s}")
    if not 0 <= slow_rank < ranks:
        raise ValueError(f"slow_rank must be in [0, {ranks - 1}] for ranks={ranks}, got {slow_rank}")
    return validate_spec({
        "name": "soak", "seed": seed, "run_dir": str(run_dir), "on_error": "raise",
        "data": {"shards": str(shards), "num_classes": num_classes, "demo": demo, "shard_size": "128KiB"},
        "decode": {"device": "cpu", "size": [size, size], "scale": [0.35, 1.0], "threads": 1},
        "mix": {"method": "mixup_cutmix", "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1},
        "channel": {"max_items": max_items, "max_bytes": max_bytes},
        "runtime": {"readers_per_rank": readers_per_rank},
        "trainer": {"ranks": ranks, "epochs": epochs, "batch_size": batch_size, "model": "none",
                    "throttle": {slow_rank: throttle_s}},
    })


def epochs_for_minutes(minutes: float, num_samples: int, ranks: int, batch_size: int, throttle_s: float) -> int:
    """Epochs after which the slow rank has slept at least ``minutes``: its steps per epoch
    (``ceil(num_samples / ranks / batch_size)``) times ``throttle_s`` each."""
    if minutes <= 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    steps = math.ceil(num_samples / ranks / batch_size)
    return max(1, math.ceil(minutes * 60 / (steps * throttle_s)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=3.0, help="soak length (sets the epochs; default 3)")
    length.add_argument("--epochs", type=int, help="epochs to run instead of --minutes")
    parser.add_argument("--demo", choices=["digits", "photos"], default="digits")
    parser.add_argument("--shards", help="shard directory (default <tmp>/mixflow-soak/<demo>, built when empty)")
    parser.add_argument("--num-classes", type=int, help="classes in --shards (default: from its classes.json)")
    parser.add_argument("--throttle", type=float, default=0.2, help="slow rank's sleep per step, seconds")
    parser.add_argument("--slow-rank", type=int, default=1)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="output image side")
    parser.add_argument("--max-items", type=int, default=64, help="channel bound, batches")
    parser.add_argument("--max-bytes", default="256KiB", help="channel bound, bytes")
    parser.add_argument("--readers-per-rank", type=int, default=1)
    parser.add_argument("--sample-every", type=float, default=0.5, help="sampling period, seconds")
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction of the run counted as warm-up")
    parser.add_argument("--growth-mib", type=float, default=64.0, help="allowed producer memory growth per rank")
    parser.add_argument("--out", help="write the report (with the timeline) as JSON to this file")
    args = parser.parse_args(argv)

    shards = Path(args.shards or Path(tempfile.gettempdir(), "mixflow-soak", args.demo))
    run_dir = Path(tempfile.gettempdir(), "mixflow-soak", "run")
    probe = soak_spec(shards, 10, run_dir, epochs=1, throttle_s=args.throttle, slow_rank=args.slow_rank,
                      ranks=args.ranks, demo=args.demo)
    num_samples = len(dataset_keys(prepare_shards(probe)))
    classes = shards / "classes.json"
    if args.num_classes is None and not classes.is_file():
        parser.error(f"--num-classes: {classes} does not exist; give the number of classes")
    num_classes = args.num_classes or json.loads(classes.read_text())["num_classes"]
    epochs = args.epochs or epochs_for_minutes(args.minutes, num_samples, args.ranks, args.batch_size, args.throttle)
    spec = soak_spec(shards, num_classes, run_dir, epochs=epochs, throttle_s=args.throttle, slow_rank=args.slow_rank,
                     ranks=args.ranks, batch_size=args.batch_size, size=args.size, max_items=args.max_items,
                     max_bytes=parse_bytes(args.max_bytes), readers_per_rank=args.readers_per_rank, demo=args.demo)
    print(f"{num_samples} samples x {epochs} epochs, batch {args.batch_size}, {args.size}x{args.size}, "
          f"{args.ranks} ranks (rank {args.slow_rank} sleeps {args.throttle} s per step), channel bound "
          f"{args.max_items} batches / {args.max_bytes}, {os.cpu_count()} CPUs")
    report = run_soak(spec, args.sample_every, args.warmup, int(args.growth_mib * MIB))
    print(report.render())
    if args.out:
        Path(args.out).write_text(json.dumps(report.to_json(), indent=1))
        print(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Public feed API vs the built-in trainer path: the same image pipeline, consumed two ways.

Both variants run the same spec on the same shards (the ``photos`` demo set that
``benchmarks/image_pipeline.py`` builds: real ~500x375 JPEG photographs, 3 classes), decoded on
CPU to ``--size`` x ``--size`` RandomResizedCrop + flip, MixUp/CutMix, batches of
``--batch-size``, TWO ranks, ``trainer.model: none``, ``--epochs`` epochs. The consumers
only touch the data, one element a batch (``batch.x.view(-1)[0].item()``):

  (a) public API: ``mixflow.start(spec, name=...)`` starts the data plane (readers, mixers,
      channels; no trainers), and two plain zero-CPU Ray actors, standing for the user's own
      workers, each take one rank with ``mixflow.connect(name).feed(rank=r, world_size=2)`` and
      run the user loop ``for epoch in range(feed.epochs): for batch in feed.epoch(epoch): touch``.
      ``pipe.close()`` returns the run summary.
  (b) built-in: ``ImagePipeline(spec, show_progress=False).run()``, whose ``TrainerRank`` actors
      iterate their feed and touch each batch.

Timing, the same for both: the summary's ``wall_s``, the streaming time; actor start-up is
excluded from both. (b): from the driver starting the mixers' production (every actor is up)
to the last rank's last epoch coming back to the driver. (a): from the first feed's first
``epoch()`` beginning its rank's stream (the host starts that rank's producer then) to the
last feed reporting its last epoch done, both stamped by the pipeline host. Not timed in (a):
``mixflow.start`` (the data plane's actors, up when it returns), starting the consumer actors
and their ``connect(...).feed(...)`` claims; both consumers are up and have claimed their rank
before either is told to run. As a cross-check each consumer also stamps (``time.time()``, one
clock for the processes on this machine) just before its first ``epoch(0)`` and just after its
last epoch; the ``consumer window`` (earliest start to latest end) must agree with ``wall_s``.

Rounds alternate (b), (a), (b), (a), ... in this one process, each with a fresh pipeline, and
every round starts once the machine is idle (:func:`benchmarks.image_pipeline.wait_for_quiet`):
the host's speed drifts over minutes (other tenants, shown as ``steal %``), so each (a) round
is paired with the (b) round just before it; ``a/b paired`` lists those ratios. Every round
must deliver every sample exactly once per epoch (the summary's ledgers, one per epoch, all
``exactly_once``, and ``samples`` = data set x epochs): a round that does not stops the
benchmark with exit status 2. The table reports each variant's median round and every round's
rate; the target, (a) >= 0.95x (b) on the medians, is reported as PASS/FAIL, never asserted.
``shm steps``: batches whose pixels came through the mixer's shared-memory ring (of all steps);
``wait %``: the ranks' time blocked on their channel, of their streaming time.

(a) and (b) do the same work per batch: with ``model: none`` a ``TrainerRank`` touches the uint8
``[B, H, W, C]`` batch as delivered, and (a)'s feeds are taken with ``to_float=False``, which
does the same. The target is (a) >= 0.95x (b). (f) is (a) with the feed's default, normalised
float ``[B, C, H, W]`` as a training loop wants it (one pass per channel into a recycled buffer,
``mixflow.train.feed.Feed``): that conversion is work (b) does not do, so (f) has no target; it
shows what the conversion costs on this CPU-bound 2-core machine.

Usage::

    python benchmarks/feed_api.py [--samples 1024] [--batch-size 64] [--size 224] [--epochs 2]
        [--rounds 5] [--decode-threads 1] [--quiet-timeout 20] [--out DIR] [--json benchmarks/results/feed_api.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Run from a checkout (``python benchmarks/feed_api.py``): import this tree's mixflow.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from benchmarks.image_pipeline import (host_steal_s, num_classes_of, prepare_shards,  # noqa: E402
                                       wait_for_quiet)

RANKS = 2
CPUS = 2
TARGET = 0.95  # (a) must reach this many times (b)'s median samples/s
VARIANTS = {"a": "public API (mixflow.start + 2 actor feeds), uint8 as delivered",
            "b": "built-in (ImagePipeline.run)",
            "f": "public API, normalised float x (feed's default)"}
RUN_ORDER = ("b", "a", "f")  # within a round: (b) first, then (a), then (f)
DEFAULT_JSON = _ROOT / "benchmarks" / "results" / "feed_api.json"


def bench_spec(shard_dir, batch_size: int, size: int, num_classes: int, epochs: int, decode_threads: int,
               name: str) -> dict:
    """The one spec both variants run: ``benchmarks/image_pipeline.py``'s mixflow spec (CPU DALI
    decode, DeiT-style MixUp/CutMix, 4-batch channels), two ranks, ``trainer.model: none``."""
    return {
        "name": name,
        "run_dir": os.path.join(tempfile.gettempdir(), "mixflow-bench-feed-api", name),
        "data": {"shards": str(shard_dir), "num_classes": num_classes},
        "decode": {"device": "cpu", "size": [size, size], "threads": decode_threads},
        "mix": {"method": "mixup_cutmix", "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "switch_prob": 0.5,
                "label_smoothing": 0.1},
        "channel": {"max_items": 4, "max_bytes": "128MiB"},
        "trainer": {"ranks": RANKS, "epochs": epochs, "batch_size": batch_size, "model": "none"},
    }


# --------------------------------------------------------------------------------------
# (a) the public API, consumed by the user's own workers
# --------------------------------------------------------------------------------------

def _consumer_class():
    """The user's worker: a plain zero-CPU Ray actor that takes one rank's feed (built lazily so
    that importing this module needs no Ray)."""
    import ray

    @ray.remote(num_cpus=0)
    class FeedConsumer:
        def __init__(self, pipeline: str, rank: int, world_size: int, to_float: bool):
            import mixflow

            self.feed = mixflow.connect(pipeline, timeout=30).feed(rank=rank, world_size=world_size,
                                                                   to_float=to_float)

        def ready(self) -> dict:
            import torch

            return {"pid": os.getpid(), "torch_threads": torch.get_num_threads(), "device": str(self.feed.device)}

        def run(self) -> dict:
            """The user loop over every epoch; touches one element a batch."""
            samples = batches = 0
            checksum = 0.0
            began = time.time()
            for epoch in range(self.feed.epochs):
                for batch in self.feed.epoch(epoch):
                    checksum += batch.x.view(-1)[0].item()  # touch the data
                    samples += len(batch.keys)
                    batches += 1
            ended = time.time()
            return {"rank": self.feed.rank, "samples": samples, "batches": batches, "checksum": checksum,
                    "began": began, "ended": ended}

    return FeedConsumer


def run_public_api(spec: dict, to_float: bool = False) -> tuple:
    """(a) / (f): start the data plane, two consumer actors claim a rank each, run, close.
    Returns ``(summary, consumer results, extra)``."""
    import ray

    import mixflow

    t0 = time.perf_counter()
    pipe = mixflow.start(spec, name=spec["name"])
    consumers = []
    try:
        cls = _consumer_class()
        consumers = [cls.remote(spec["name"], r, RANKS, to_float) for r in range(RANKS)]
        ready = ray.get([c.ready.remote() for c in consumers])  # up, with their ranks claimed
        startup_s = time.perf_counter() - t0
        results = ray.get([c.run.remote() for c in consumers])
    except BaseException:
        try:
            pipe.close()
        except Exception:  # noqa: BLE001 - the first error is the one to report
            pass
        raise
    finally:
        for c in consumers:
            ray.kill(c)
    summary = pipe.close()
    window = max(r["ended"] for r in results) - min(r["began"] for r in results)
    return summary, results, {"startup_s": startup_s, "consumer_window_s": window, "consumers": ready}


# --------------------------------------------------------------------------------------
# (b) the built-in trainer path
# --------------------------------------------------------------------------------------

def run_builtin(spec: dict) -> tuple:
    """(b): ``ImagePipeline(spec).run()`` with ``trainer.model: none``."""
    from mixflow.config import validate_spec
    from mixflow.runtime.image_pipeline import ImagePipeline

    summary = ImagePipeline(validate_spec(spec), show_progress=False).run()
    return summary, [], {"startup_s": summary.startup_s}


# --------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------

@dataclass
class Round:
    variant: str
    index: int
    samples: int = 0
    wall_s: float = 0.0
    startup_s: float = 0.0
    per_rank: list[int] = field(default_factory=list)
    steps: int = 0
    shared_memory_steps: int = 0
    wait_fraction: float = 0.0  # the ranks' channel waits over their streaming time, mean of the ranks
    steal_pct: float | None = None
    exactly_once: bool = False
    ledgers: list[str] = field(default_factory=list)
    consumer_window_s: float | None = None  # (a) only: the consumers' own stamps (cross-check)
    consumer_rate: float | None = None
    consumers: list[dict] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.samples / self.wall_s if self.wall_s > 0 else 0.0


class DeliveryError(RuntimeError):
    """A round did not deliver every sample exactly once per epoch."""


def run_round(variant: str, index: int, shard_dir: Path, args, num_classes: int, expected: int) -> Round:
    name = f"feed-api-{variant}-{index}-{uuid.uuid4().hex[:6]}"
    spec = bench_spec(shard_dir, args.batch_size, args.size, num_classes, args.epochs, args.decode_threads, name)
    steal0, t0 = host_steal_s(), time.perf_counter()
    if variant == "b":
        summary, results, extra = run_builtin(spec)
    else:
        summary, results, extra = run_public_api(spec, to_float=variant == "f")
    steal1, elapsed = host_steal_s(), time.perf_counter() - t0
    r = Round(variant, index, samples=summary.samples, wall_s=summary.wall_s, startup_s=extra["startup_s"],
              per_rank=[rs.samples for rs in summary.ranks], steps=sum(rs.steps for rs in summary.ranks),
              shared_memory_steps=sum(rs.shared_memory_steps for rs in summary.ranks),
              wait_fraction=statistics.mean(rs.wait_fraction for rs in summary.ranks),
              exactly_once=summary.exactly_once, ledgers=[ledger.describe() for ledger in summary.ledgers],
              consumers=extra.get("consumers", []))
    if steal0 is not None and steal1 is not None:
        r.steal_pct = 100 * (steal1 - steal0) / (elapsed * (os.cpu_count() or 1))
    if variant != "b":
        r.consumer_window_s = extra["consumer_window_s"]
        r.consumer_rate = sum(x["samples"] for x in results) / r.consumer_window_s
    problems = []
    if not summary.exactly_once:
        problems.append("ledger not exactly-once")
    if len(summary.ledgers) != args.epochs:
        problems.append(f"{len(summary.ledgers)} epoch ledger(s), expected {args.epochs}")
    if summary.samples != expected:
        problems.append(f"delivered {summary.samples} samples, expected {expected}")
    if results and sum(x["samples"] for x in results) != summary.samples:
        problems.append(f"consumers counted {sum(x['samples'] for x in results)}, summary {summary.samples}")
    if problems:
        raise DeliveryError(f"round {index + 1} ({variant}) {VARIANTS[variant]}: " + "; ".join(problems)
                            + "\n  " + "\n  ".join(r.ledgers))
    window = f", consumer window {r.consumer_window_s:.2f}s" if r.consumer_window_s is not None else ""
    steal = f", steal {r.steal_pct:.0f}%" if r.steal_pct is not None else ""
    print(f"  ({variant}) {r.samples} samples in {r.wall_s:.2f}s = {r.rate:.1f}/s (start-up {r.startup_s:.1f}s"
          f"{window}; shm {r.shared_memory_steps}/{r.steps} steps; wait {100 * r.wait_fraction:.0f}%{steal})")
    return r


def median_round(rounds: list[Round]) -> Round:
    """The round with the median rate (the lower of the middle two for an even count)."""
    return sorted(rounds, key=lambda r: r.rate)[(len(rounds) - 1) // 2]


def paired_ratios(rounds: dict[str, list[Round]]) -> list[float]:
    """(a) / (b) of each round pair: every (a) round against the (b) round run just before it."""
    return [a.rate / b.rate for a, b in zip(rounds["a"], rounds["b"]) if b.rate > 0]


def print_table(rounds: dict[str, list[Round]], expected: int) -> None:
    medians = {v: median_round(rs) for v, rs in rounds.items() if rs}
    base = medians["b"].rate if "b" in medians else 0.0
    paired = paired_ratios(rounds)
    header = ["variant", "median samples/s", "vs (b)", "seconds", "rounds: samples/s", "a/b paired",
              "consumer window samples/s", "shm steps", "wait %", "start-up s", "steal %"]
    rows = []
    for v in RUN_ORDER[::-1]:
        rs = rounds.get(v)
        if not rs:
            continue
        m = medians[v]
        rows.append([
            f"({v}) {VARIANTS[v]}", f"{m.rate:.1f}", f"{m.rate / base:.3f}x" if base else "-", f"{m.wall_s:.2f}",
            " ".join(f"{r.rate:.0f}" for r in rs),
            " ".join(f"{p:.2f}" for p in paired) if v == "a" else "-",
            " ".join(f"{r.consumer_rate:.0f}" for r in rs) if v != "b" else "-",
            f"{m.shared_memory_steps}/{m.steps}", f"{100 * m.wait_fraction:.0f}",
            f"{statistics.median(r.startup_s for r in rs):.1f}",
            f"{m.steal_pct:.0f}" if m.steal_pct is not None else "-"])
    title = (f"feed API vs built-in: {expected} samples per round, {RANKS} ranks, median round of each "
             f"variant")
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i in (0, 4, 5, 6) else "right")
        for row in rows:
            table.add_row(*row)
        Console(width=None if sys.stdout.isatty() else 200).print(table)
    except ImportError:
        print(title)
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        for row in [header, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def verdict(rounds: dict[str, list[Round]]) -> dict:
    a, b = median_round(rounds["a"]), median_round(rounds["b"])
    ratio = a.rate / b.rate if b.rate else 0.0
    paired = paired_ratios(rounds)
    out = {"target": f"(a) >= {TARGET:.2f}x (b)", "ratio": ratio, "pass": ratio >= TARGET,
           "a_median_rate": a.rate, "b_median_rate": b.rate, "paired_ratios": paired,
           "paired_median": statistics.median(paired) if paired else None}
    print("target:")
    print(f"  (a) >= {TARGET:.2f}x (b): {'PASS' if out['pass'] else 'FAIL'} ({ratio:.3f}x: {a.rate:.1f} vs "
          f"{b.rate:.1f} samples/s; paired rounds median {out['paired_median']:.3f}x)")
    return out


def write_json(path: Path, args, rounds: dict[str, list[Round]], expected: int, result: dict | None,
               error: str | None = None) -> None:
    import torch

    report = {
        "benchmark": "feed_api",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "ray": __import__("ray").__version__},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "expected_samples": expected,
        "variants": VARIANTS,
        "timing": "summary.wall_s: streaming time, actor start-up excluded (see the module docstring)",
        "medians": {v: asdict(median_round(rs)) | {"rate": median_round(rs).rate} for v, rs in rounds.items() if rs},
        "rounds": {v: [asdict(r) | {"rate": r.rate} for r in rs] for v, rs in rounds.items()},
        "result": result,
        "error": error,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


def init_ray() -> None:
    """``ray.init(num_cpus=2)`` and a warm-up of the two pooled workers (imports of torch, DALI and
    mixflow's runtime), so that neither variant's first round pays the cold start alone."""
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=CPUS, include_dashboard=False, logging_level=logging.WARNING)

    @ray.remote(num_cpus=1)
    def warm() -> int:
        import torch  # noqa: F401

        import mixflow.decode.dali_image_decoder  # noqa: F401
        import mixflow.runtime.pipeline_handle  # noqa: F401
        import mixflow.runtime.trainer_actor  # noqa: F401

        time.sleep(0.5)  # hold the CPU so the second task gets its own worker
        return os.getpid()

    ray.get([warm.remote() for _ in range(CPUS)])
    print(f"ray.init + worker warm-up {time.perf_counter() - t0:.1f}s (not counted)")


def warm_page_cache(shard_dir: Path) -> None:
    """Read the shards once, so that the first round does not read them from disk and the others
    from the page cache."""
    for tar in sorted(shard_dir.glob("*.tar")):
        with open(tar, "rb") as f:
            while f.read(1 << 22):
                pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1024, help="photos demo set size (default 1024)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=224, help="output image side")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="round pairs (b),(a); medians reported (default 5)")
    parser.add_argument("--decode-threads", type=int, default=1, help="DALI threads per mixer's reader")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "mixflow-bench"),
                        help="where the shard set lives (<out>/photos-<N>, reused when complete)")
    parser.add_argument("--quiet-timeout", type=float, default=20.0,
                        help="seconds a round waits at most for an idle machine (default 20)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")

    from mixflow.data.listing import dataset_keys, list_shards

    shard_dir = prepare_shards(args.out, args.samples)
    num_classes = num_classes_of(shard_dir)
    keys = set(dataset_keys(list_shards(shard_dir)))
    expected = len(keys) * args.epochs
    print(f"{len(keys)} samples x {args.epochs} epoch(s), batch {args.batch_size}, {args.size}x{args.size}, "
          f"{num_classes} classes, {RANKS} ranks, model none, {os.cpu_count()} CPUs")
    t_all = time.perf_counter()
    import torch  # noqa: F401 - heavy imports before any timer

    import mixflow.runtime.image_pipeline  # noqa: F401
    import mixflow.runtime.pipeline_handle  # noqa: F401
    import ray

    warm_page_cache(shard_dir)
    init_ray()
    rounds: dict[str, list[Round]] = {v: [] for v in RUN_ORDER}
    try:
        for i in range(args.rounds):
            for v in RUN_ORDER:
                waited = wait_for_quiet(timeout_s=args.quiet_timeout)
                print(f"round {i + 1}/{args.rounds}: ({v}) after {waited:.1f}s waiting for an idle machine")
                rounds[v].append(run_round(v, i, shard_dir, args, num_classes, expected))
    except DeliveryError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        write_json(args.json, args, rounds, expected, None, str(exc))
        return 2
    finally:
        ray.shutdown()

    print_table(rounds, expected)
    result = verdict(rounds)
    write_json(args.json, args, rounds, expected, result)
    print(f"total benchmark time {time.perf_counter() - t_all:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

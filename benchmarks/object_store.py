#!/usr/bin/env python
"""Reading shards from object storage vs local disk: one reader's epoch, decoded, same run.

One reader (a :class:`~mixflow.decode.decode_stage.DecodeStage`: the source, the sample checks,
DALI decode + random-resized-crop to 224x224, batches of 64) walks one epoch of the same shards
three ways, round after round, so each round's variants run side by side in time:

- **local**: shards on this machine's disk (the baseline);
- **s3 first epoch**: the same shards in a real S3 endpoint on 127.0.0.1 (moto's server), the
  shard cache emptied first: listing, index mirroring and every whole-shard download are timed;
- **s3 cached epoch**: the next epoch of the same reader, every shard in the cache.

Reported per variant: the median samples/s over ``--rounds`` and its ratio to the local epoch
of the same round (median of the per-round ratios). The endpoint is local, so the first-epoch
ratio measures mixflow's download path (ranged GETs, cache writes, the reader waiting for a
shard), not a network; a remote bucket adds its latency and bandwidth on top.

Usage::

    python benchmarks/object_store.py [--samples 1024] [--rounds 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))


def epoch_rate(stage, epoch: int) -> tuple[float, int]:
    """Samples/s of one whole epoch of ``stage`` (and the samples delivered)."""
    start, n, index = time.perf_counter(), 0, 0
    while (batch := stage.batch(epoch, index)) is not None:
        n += len(batch["keys"])
        index += 1
    return n / (time.perf_counter() - start), n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=1024, help="photos in the data set")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "benchmark")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "benchmark")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    import s3fs
    from moto.server import ThreadedMotoServer

    from mixflow.config import DecodeSpec, validate_spec
    from mixflow.data.demo_sets import build_demo
    from mixflow.data.listing import list_shards
    from mixflow.decode.decode_stage import DecodeStage

    work = Path(tempfile.mkdtemp(prefix="mixflow-objbench-"))
    shard_dir = work / "shards"
    build_demo("photos", shard_dir, max_bytes=4 * 2**20, num_samples=args.samples)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    fs.mkdir("bench")
    for path in sorted(shard_dir.iterdir()):
        fs.put_file(str(path), f"bench/photos/{path.name}")
    url = "s3://bench/photos"
    spec = DecodeSpec(size=(224, 224))
    rows = {"local": [], "s3 first epoch": [], "s3 cached epoch": []}
    ratios = {"s3 first epoch": [], "s3 cached epoch": []}
    try:
        for r in range(args.rounds):
            local = DecodeStage(list_shards(shard_dir), 0, 1, spec, 64, 1000, seed=r)
            base, n_local = epoch_rate(local, 0)
            local.source.close()
            cache = work / f"cache{r}"  # empty: the first epoch downloads every shard
            store = validate_spec({"name": "b", "trainer": {"model": "none"}, "data": {
                "shards": url, "num_classes": 1000, "cache_dir": str(cache),
                "storage_options": {"client_kwargs": {"endpoint_url": endpoint}}}}).data.store
            start = time.perf_counter()
            remote = DecodeStage(list_shards(url, store=store), 0, 1, spec, 64, 1000, seed=r)
            listed_s = time.perf_counter() - start
            rate, n_first = epoch_rate(remote, 0)
            first = n_first / (n_first / rate + listed_s)  # the listing belongs to the first epoch
            cached, n_cached = epoch_rate(remote, 1)
            remote.source.close()
            assert n_local == n_first == n_cached == args.samples, (n_local, n_first, n_cached)
            for name, value in (("local", base), ("s3 first epoch", first), ("s3 cached epoch", cached)):
                rows[name].append(value)
            ratios["s3 first epoch"].append(first / base)
            ratios["s3 cached epoch"].append(cached / base)
            print(f"round {r}: local {base:.0f}/s, s3 first {first:.0f}/s ({first / base:.2f}x), "
                  f"s3 cached {cached:.0f}/s ({cached / base:.2f}x)", flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("\n| variant | samples/s (median) | vs local (median of rounds) | rounds |")
    print("|---|---|---|---|")
    results = {}
    for name, values in rows.items():
        ratio = statistics.median(ratios[name]) if name in ratios else 1.0
        results[name] = {"median": statistics.median(values), "ratio": ratio, "rounds": values}
        print(f"| {name} | {statistics.median(values):.0f} | {ratio:.2f}x | "
              + " ".join(f"{v:.0f}" for v in values) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

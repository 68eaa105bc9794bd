#!/usr/bin/env python
"""Reading shards from object storage vs local disk: one reader's epoch, decoded, same run.

One reader (a :class:`~mixflow.decode.decode_stage.DecodeStage`: the source, the sample checks,
DALI decode + random-resized-crop to 224x224, batches of 64) walks one epoch of the same shards
several ways, round after round, so each round's variants run side by side in time:

- **local**: shards on this machine's disk (the baseline);
- **s3 first epoch**: the same shards in a real S3 endpoint on 127.0.0.1 (moto's server), the
  shard cache emptied first: listing, index mirroring and every whole-shard download are timed
  (mixflow's read path);
- **s3 cached epoch**: the next epoch of the same reader, every shard in the cache;
- **s3 ranged, ...**: the other read path the issue asked to measure: no shard cache, each
  sample's members read straight from the bucket by their ``.idx`` offsets, in the reader's
  real order (the same seeded shuffle: the stage's source is swapped for
  :class:`RangedSource`, which only changes how bytes are fetched). Three fetch strategies:
  one ranged GET per sample (the sample's members are contiguous in the tar); an fsspec file
  per shard with ``cache_type="readahead"`` (each miss reads ``--block`` bytes past the
  request); and ``cache_type="blockcache"`` (the shard in ``--block``-sized blocks, each
  fetched once, LRU of 32 blocks). Listing and index mirroring are timed here too (fresh
  index cache each time); every epoch of these is a first epoch.

Reported per variant: the median samples/s over ``--rounds``, its ratio to the local epoch
of the same round (median of the per-round ratios), and the S3 requests per delivered sample
(GETs, and all requests: GET + HEAD + LIST), counted in the benchmark's process at
``S3FileSystem._call_s3`` (mixflow asks s3fs and botocore for one attempt per call, so each
counted call is one HTTP request). The endpoint is local, so the ratios measure the read
path's own work (requests, cache writes, the reader waiting), not a network; a remote bucket
adds its latency per request on top, so requests/sample x latency is the cost a remote
bucket adds to each sample.

Usage::

    python benchmarks/object_store.py [--samples 1024] [--rounds 3] [--block 1048576] [--out results.json]
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


class RequestCounter:
    """S3 requests made in this process, by API method (``get_object``, ``head_object``, ...)."""

    def __init__(self):
        from collections import Counter

        import s3fs

        self.counts = Counter()
        original = s3fs.S3FileSystem._call_s3
        counts = self.counts

        async def counted(fs, method, *args, **kwargs):
            counts[getattr(method, "__name__", str(method))] += 1
            return await original(fs, method, *args, **kwargs)

        s3fs.S3FileSystem._call_s3 = counted

    def snapshot(self) -> tuple[int, int]:
        """(GETs, all requests) so far."""
        return self.counts["get_object"], sum(self.counts.values())


def ranged_source_class():
    """:class:`WebDatasetSource` reading each sample from the bucket by its index offsets.

    ``mode``: ``"sample"`` (one ranged GET per sample, retried like mixflow's reads),
    ``"readahead"`` or ``"blockcache"`` (an fsspec file per shard with that cache and ``block``
    bytes per fetch; at most ``shuffle_window + 1`` open, least recently used closed).
    """
    from collections import OrderedDict

    from mixflow.data.object_store import PROCESS_STATS, filesystem, read_range
    from mixflow.data.webdataset_source import RawSample, WebDatasetSource

    class RangedSource(WebDatasetSource):
        mode = "sample"
        block = 2**20

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._files: OrderedDict[int, object] = OrderedDict()

        def _file(self, shard: int):
            if shard in self._files:
                self._files.move_to_end(shard)
                return self._files[shard]
            info = self.shards[shard]
            fs, path = filesystem(info.path, info.store.options)
            self._files[shard] = fs.open(path, "rb", block_size=self.block, cache_type=self.mode,
                                         size=info.size)
            while len(self._files) > self.shuffle_window + 1:
                self._files.popitem(last=False)[1].close()
            return self._files[shard]

        def read(self, shard: int, row: int) -> RawSample:
            info = self.shards[shard]
            sample = self._index(shard)[row]
            comps = sample.components.values()
            start = min(c.offset for c in comps)
            end = max(c.offset + c.size for c in comps)
            if self.mode == "sample":
                span = read_range(info.path, info.store.options, PROCESS_STATS, start, end)
            else:
                fh = self._file(shard)
                fh.seek(start)
                span = fh.read(end - start)
            assert len(span) == end - start, (info.path, sample.key)
            return RawSample(sample.key, info.path,
                             {ext: span[c.offset - start:c.offset - start + c.size]
                              for ext, c in sample.components.items()})

        def close(self) -> None:
            for fh in self._files.values():
                fh.close()
            self._files.clear()
            super().close()

    return RangedSource


def epoch_rate(stage, epoch: int) -> tuple[float, int]:
    """Samples/s of one whole epoch of ``stage`` (and the samples delivered)."""
    start, n, index = time.perf_counter(), 0, 0
    while (batch := stage.batch(epoch, index)) is not None:
        n += len(batch["keys"])
        index += 1
    return n / (time.perf_counter() - start), n


RANGED = {"s3 ranged, GET per sample": "sample", "s3 ranged, readahead": "readahead",
          "s3 ranged, blockcache": "blockcache"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=1024, help="photos in the data set")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--block", type=int, default=2**20, help="bytes per fetch of the ranged read-ahead variants")
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

    counter = RequestCounter()
    RangedSource = ranged_source_class()
    RangedSource.block = args.block
    work = Path(tempfile.mkdtemp(prefix="mixflow-objbench-"))
    shard_dir = work / "shards"
    build_demo("photos", shard_dir, max_bytes=4 * 2**20, num_samples=args.samples)
    shard_files = sorted(p for p in shard_dir.iterdir() if p.suffix == ".tar")
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
    names = ["local", "s3 first epoch", "s3 cached epoch", *RANGED]
    rows = {name: [] for name in names}
    ratios = {name: [] for name in names[1:]}
    requests = {name: [] for name in names[1:]}  # (GETs, all requests) per sample, per round

    def store_for(cache: Path):
        return validate_spec({"name": "b", "trainer": {"model": "none"}, "data": {
            "shards": url, "num_classes": 1000, "cache_dir": str(cache),
            "storage_options": {"client_kwargs": {"endpoint_url": endpoint}}}}).data.store

    def timed_listing(cache: Path):
        start = time.perf_counter()
        shards = list_shards(url, store=store_for(cache))
        return shards, time.perf_counter() - start

    def per_sample(before, n):
        after = counter.snapshot()
        return [(after[0] - before[0]) / n, (after[1] - before[1]) / n]

    try:
        warm = DecodeStage(list_shards(shard_dir), 0, 1, spec, 64, 1000, seed=args.rounds)
        epoch_rate(warm, 0)  # DALI's first-run allocations and the page cache, before any variant is timed
        warm.source.close()
        for r in range(args.rounds):
            local = DecodeStage(list_shards(shard_dir), 0, 1, spec, 64, 1000, seed=r)
            base, n_local = epoch_rate(local, 0)
            local.source.close()
            got = {"local": base}
            # mixflow's path: whole shards into the cache (empty: the first epoch downloads every shard)
            before = counter.snapshot()
            shards, listed_s = timed_listing(work / f"cache{r}")
            remote = DecodeStage(shards, 0, 1, spec, 64, 1000, seed=r)
            rate, n_first = epoch_rate(remote, 0)
            got["s3 first epoch"] = n_first / (n_first / rate + listed_s)  # the listing belongs to the first epoch
            requests["s3 first epoch"].append(per_sample(before, n_first))
            before = counter.snapshot()
            got["s3 cached epoch"], n_cached = epoch_rate(remote, 1)
            requests["s3 cached epoch"].append(per_sample(before, n_cached))
            remote.source.close()
            assert n_local == n_first == n_cached == args.samples, (n_local, n_first, n_cached)
            for name, mode in RANGED.items():  # byte ranges from the bucket, no shard cache
                before = counter.snapshot()
                shards, listed_s = timed_listing(work / f"index-{mode}{r}")
                stage = DecodeStage(shards, 0, 1, spec, 64, 1000, seed=r)
                stage.source = RangedSource(shards, 0, 1, r, stage.source.shuffle_window)
                stage.source.mode = mode
                rate, n = epoch_rate(stage, 0)
                stage.source.close()
                assert n == args.samples, (name, n)
                assert not list((work / f"index-{mode}{r}").glob("shards/*.tar")), "ranged reads filled the cache"
                got[name] = n / (n / rate + listed_s)
                requests[name].append(per_sample(before, n))
            for name, value in got.items():
                rows[name].append(value)
                if name != "local":
                    ratios[name].append(value / base)
            print(f"round {r}: local {base:.0f}/s; " + "; ".join(
                f"{name} {got[name]:.0f}/s ({got[name] / base:.2f}x, {requests[name][-1][0]:.2f} GET/sample)"
                for name in names[1:]), flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{len(shard_files)} shards, {args.samples} samples, read-ahead block {args.block} bytes")
    print("| variant | samples/s (median) | vs local (median of rounds) | GET / sample | requests / sample | rounds |")
    print("|---|---|---|---|---|---|")
    results = {"shards": len(shard_files), "samples": args.samples, "block": args.block}
    for name, values in rows.items():
        ratio = statistics.median(ratios[name]) if name in ratios else 1.0
        gets, reqs = ((statistics.median(x[i] for x in requests[name]) for i in (0, 1))
                      if name in requests else (0.0, 0.0))
        results[name] = {"median": statistics.median(values), "ratio": ratio, "rounds": values,
                         "ratios": ratios.get(name, [1.0] * len(values)),
                         "gets_per_sample": gets, "requests_per_sample": reqs}
        print(f"| {name} | {statistics.median(values):.0f} | {ratio:.2f}x | {gets:.3f} | {reqs:.3f} | "
              + " ".join(f"{v:.0f}" for v in values) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

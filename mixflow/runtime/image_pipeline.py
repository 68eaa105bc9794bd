"""The image pipeline graph: shards -> decoder actors -> mixer actors -> channels -> trainer ranks.

Each trainer rank owns ``readers_per_rank`` decoder actors (disjoint shards, reassigned
each epoch), one mixer actor and one credit-based channel, so a slow rank only slows
its own producers. Mixers produce straight through all epochs; the driver walks the
trainer ranks epoch by epoch, shows progress, and checks the delivery ledger at the
end of each epoch.
"""

from __future__ import annotations

import time
from pathlib import Path

import ray
from rich.console import Console

from mixflow.config import PipelineSpec
from mixflow.data.bad_samples import SkipRecord, write_quarantine
from mixflow.data.demo_sets import build_demo
from mixflow.data.listing import ShardInfo, dataset_keys, list_shards
from mixflow.decode.device import resolve_decode_device
from mixflow.runtime.channel import Channel
from mixflow.runtime.decoder_actor import DecoderActor
from mixflow.runtime.ledger import EpochLedger, check_epoch
from mixflow.runtime.mixer_actor import MixerActor
from mixflow.runtime.progress import PipelineProgress
from mixflow.runtime.ray_session import ensure_ray
from mixflow.runtime.stage_failure import stage_error
from mixflow.runtime.summary import RankSummary, RunSummary
from mixflow.runtime.trainer_actor import TrainerRank

POLL_S = 0.5
TEARDOWN_S = 5.0  # how long stopping waits for the ranks to leave their process groups


def prepare_shards(spec: PipelineSpec, console: Console | None = None) -> list[ShardInfo]:
    """List the spec's shards, building the demo set first if asked and absent."""
    shard_dir = Path(spec.data.shards)
    if spec.data.demo and not any(shard_dir.glob("*.tar")):
        if console:
            console.print(f"building demo set '{spec.data.demo}' into {shard_dir}")
        build_demo(spec.data.demo, shard_dir, max_bytes=spec.data.shard_size)
    return list_shards(shard_dir)


class ImagePipeline:
    def __init__(self, spec: PipelineSpec, console: Console | None = None, show_progress: bool = True,
                 record_digests: bool = False):
        self.spec = spec
        self.record_digests = record_digests
        self.digests: dict[int, list] = {}
        self.console = console or Console()
        self.show_progress = show_progress
        self.decoders: list = []
        self.mixers: list = []
        self.channels: list = []
        self.trainers: list = []

    def _gpus_in_cluster(self) -> bool:
        return ray.cluster_resources().get("GPU", 0) > 0

    def _start_actors(self, shards: list[ShardInfo], device: str) -> None:
        spec, ranks, k = self.spec, self.spec.trainer.ranks, self.spec.runtime.readers_per_rank
        spec_json = spec.model_dump_json()
        gpu = {"num_gpus": 0.1} if device == "gpu" else {}
        self.channels = [Channel.remote(f"r{r}", spec.channel.max_items, spec.channel.max_bytes)
                         for r in range(ranks)]
        self.decoders = [DecoderActor.options(scheduling_strategy="SPREAD", **gpu).remote(
            spec_json, shards, reader, ranks * k, device) for reader in range(ranks * k)]
        self.mixers = [MixerActor.remote(spec_json, r, self.decoders[r * k:(r + 1) * k], self.channels[r])
                       for r in range(ranks)]
        self.trainers = [TrainerRank.options(scheduling_strategy="SPREAD").remote(
            spec_json, r, ranks, self.channels[r], self.record_digests) for r in range(ranks)]
        master_addr, master_port = ray.get(self.trainers[0].address.remote())
        ray.get([t.setup.remote(master_addr, master_port) for t in self.trainers])

    def _stop(self, reason: str | None = None) -> None:
        if reason:
            for ch in self.channels:
                ch.fail.remote(reason)
        if self.trainers:
            # All ranks at once, one deadline: a rank stuck in a collective with a dead peer is killed below.
            teardowns = [t.teardown.remote() for t in self.trainers]
            ray.wait(teardowns, num_returns=len(teardowns), timeout=TEARDOWN_S)
        for actor in self.trainers + self.mixers + self.decoders + self.channels:
            ray.kill(actor, no_restart=True)
        self.trainers, self.mixers, self.decoders, self.channels = [], [], [], []

    def _wait(self, refs: dict, progress: PipelineProgress, until_done: set) -> dict:
        """Wait for the refs in ``until_done``; any ref in ``refs`` that fails stops the pipeline."""
        results: dict = {}
        while until_done - results.keys():
            open_refs = [r for r in refs if r not in results]
            ready, _ = ray.wait(open_refs, num_returns=1, timeout=POLL_S)
            for ref in ready:
                try:
                    results[ref] = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - re-raised with the stage named
                    raise stage_error(refs[ref], exc) from exc
            try:
                stats = ray.get([ch.stats.remote() for ch in self.channels])
                prog = ray.get([t.progress.remote() for t in self.trainers])
            except ray.exceptions.RayActorError:
                continue  # an actor died: the ref of the stage it serves fails on the next wait, named
            progress.update(sum(p["samples"] for p in prog), stats, [p["loss"] for p in prog])
        return results

    def run(self) -> RunSummary:
        spec = self.spec
        shards = prepare_shards(spec, self.console)
        expected = set(dataset_keys(shards))
        ensure_ray(spec.runtime.address)
        device = resolve_decode_device(spec.decode.device, self._gpus_in_cluster())
        run_dir = spec.run_path
        ranks = [RankSummary(r) for r in range(spec.trainer.ranks)]
        ledgers: list[EpochLedger] = []
        skipped: list[SkipRecord] = []
        start = time.perf_counter()
        try:
            self._start_actors(shards, device)
            startup_s = time.perf_counter() - start
            start = time.perf_counter()
            total = len(expected) * spec.trainer.epochs
            with PipelineProgress(total, self.show_progress, self.console) as progress:
                producers = {m.run.remote(0, spec.trainer.epochs): f"mixer r{r}" for r, m in enumerate(self.mixers)}
                for epoch in range(spec.trainer.epochs):
                    consumers = {t.run_epoch.remote(epoch): f"trainer r{r} (epoch {epoch})"
                                 for r, t in enumerate(self.trainers)}
                    results = self._wait(producers | consumers, progress, set(consumers))
                    trainer_results = [results[r] for r in consumers]
                    epoch_skips = [rec for d in self.decoders for rec in ray.get(d.skipped.remote(epoch))]
                    skipped += epoch_skips
                    for res in trainer_results:
                        self.digests.setdefault(res["rank"], []).extend(res["digests"])
                        rs = ranks[res["rank"]]
                        rs.samples += res["samples"]
                        rs.steps += res["steps"]
                        rs.wait_s += res["wait_s"]
                        rs.wall_s += res["wall_s"]
                        if res["mean_loss"] is not None:
                            rs.epoch_loss.append(res["mean_loss"])
                    ledgers.append(check_epoch(epoch, expected, {r["rank"]: r["keys"] for r in trainer_results},
                                               [s.key for s in epoch_skips if s.key is not None]))
            wall_s = time.perf_counter() - start
            ray.get(list(producers))
            peaks = ray.get([ch.stats.remote() for ch in self.channels])
        except BaseException as exc:
            self._stop(f"pipeline stopping: {exc or type(exc).__name__}")
            raise
        self._stop()
        summary = RunSummary(spec.name, device, startup_s, wall_s, sum(r.samples for r in ranks),
                             ranks, ledgers, len(skipped), peaks)
        summary.save(run_dir / "summary.json")
        if skipped:
            write_quarantine(run_dir / "quarantine.jsonl", skipped)
        return summary

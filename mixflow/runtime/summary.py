"""The end-of-run summary: throughput, waiting, per-rank samples, loss, ledger verdicts."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mixflow.runtime.ledger import EpochLedger


def store_total(driver: dict, processes: list[dict]) -> dict:
    """A run's object-store counts (:meth:`~mixflow.data.object_store.StoreStats.as_dict`): the
    driver's own (listing, manifests, held-out sets) plus each reading actor's process."""
    from mixflow.data.object_store import StoreStats

    total = StoreStats()
    for stats in (driver, *processes):
        total.add(stats)
    return total.as_dict()


def store_line(store: dict) -> str:
    """The summary's object-store line (image and token runs print the same)."""
    return (f"object store: {store['downloads']} shard downloads ({store['bytes_downloaded'] / 2**20:.1f} MiB), "
            f"{store['cache_hits']} cache hits, {store['evictions']} evictions, {store['retries']} requests retried")


@dataclass
class RankSummary:
    rank: int
    samples: int = 0
    steps: int = 0
    wait_s: float = 0.0
    wall_s: float = 0.0
    epoch_loss: list[float] = field(default_factory=list)
    shared_memory_steps: int = 0  # batches whose pixels came through the mixer's shared-memory ring

    def add_epoch(self, result: dict) -> None:
        """Count one epoch's result of this rank (samples, steps, timings, mean loss)."""
        self.samples += result["samples"]
        self.steps += result["steps"]
        self.wait_s += result["wait_s"]
        self.wall_s += result["wall_s"]
        self.shared_memory_steps += result["shared_memory_steps"]
        if result["mean_loss"] is not None:
            self.epoch_loss.append(result["mean_loss"])

    @property
    def wait_fraction(self) -> float:
        return self.wait_s / self.wall_s if self.wall_s else 0.0


@dataclass
class RunSummary:
    name: str
    decode_device: str
    startup_s: float
    wall_s: float
    samples: int
    ranks: list[RankSummary]
    ledgers: list[EpochLedger]
    skipped: int
    channel_peaks: list[dict]
    # quarantine records without a key: shard regions whose samples are not known one by one (a tar
    # cut short without an index, an unreadable shard): what they held is lost uncounted by the ledger
    shard_wide: int = 0
    # per rank, the node id each of its actors ran on: trainer, mixer, channel, readers (when not fused)
    placement: list[dict] = field(default_factory=list)
    # shards read from object storage: requests retried, shards downloaded, cache hits and evictions,
    # summed over the driver's listing and every reader (empty for shards on a local disk)
    store: dict = field(default_factory=dict)
    # suspect records (suspect.jsonl): samples delivered although their scan data is corrupt in a way
    # libjpeg only warns about (garbage behind a valid header, a scan cut short); one per epoch delivered
    suspect: int = 0

    @property
    def colocated(self) -> list[bool]:
        """Per rank, whether its mixer ran on its trainer's node (batches can take the shared-memory ring)."""
        return [p["trainer"] is not None and p["trainer"] == p["mixer"] for p in self.placement]

    @property
    def throughput(self) -> float:
        return self.samples / self.wall_s if self.wall_s else 0.0

    @property
    def exactly_once(self) -> bool:
        return all(ledger.exactly_once for ledger in self.ledgers)

    def to_json(self) -> dict:
        out = asdict(self)
        out["throughput"] = self.throughput
        out["exactly_once"] = self.exactly_once
        out["colocated"] = self.colocated
        return out

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_json(), indent=1, default=str))

    def render(self, console: Console | None = None) -> None:
        console = console or Console()
        console.print(f"[bold]{escape(self.name)}[/]: {self.samples} samples in {self.wall_s:.1f} s = "
                      f"[bold]{self.throughput:.0f} samples/s[/] (decode on {self.decode_device}; "
                      f"actors started in {self.startup_s:.1f} s)")
        table = Table("rank", "samples", "steps", "waiting for data", "loss by epoch")
        for r in self.ranks:
            losses = " → ".join(f"{v:.3f}" for v in r.epoch_loss) or "-"
            table.add_row(str(r.rank), str(r.samples), str(r.steps),
                          f"{r.wait_s:.1f} s ({100 * r.wait_fraction:.0f}%)", losses)
        console.print(table)
        for peak, r in zip(self.channel_peaks, self.ranks):
            console.print(f"channel r{r.rank}: peak {peak['peak_items']}/{peak['max_items']} batches, "
                          f"{peak['peak_bytes'] / 2**20:.1f}/{peak['max_bytes'] / 2**20:.1f} MiB queued")
        if len({n for p in self.placement for n in (p["trainer"], p["mixer"], *p["readers"]) if n}) > 1:
            for p, together in zip(self.placement, self.colocated):
                readers = ", ".join((n or "?")[:8] for n in p["readers"])
                console.print(f"placement r{p['rank']}: trainer on {(p['trainer'] or '?')[:8]}, mixer on "
                              f"{(p['mixer'] or '?')[:8]}" + (f", readers on {readers}" if readers else "")
                              + ("" if together else " [yellow](mixer and trainer apart: no shared-memory ring)[/]"))
        for ledger in self.ledgers:
            style = "green" if ledger.exactly_once else "red"
            console.print(f"[{style}]ledger {escape(ledger.describe())}[/]")
        if self.store:
            console.print(store_line(self.store))
        if self.skipped:
            console.print(f"[yellow]{self.skipped} bad samples skipped (see quarantine.jsonl)[/]")
        if self.suspect:
            console.print(f"[yellow]{self.suspect} suspect samples delivered: libjpeg decodes their corrupt scan data "
                          "with a warning (see suspect.jsonl)[/]")
        if self.shard_wide:
            console.print(f"[yellow]{self.shard_wide} shard-wide loss(es) whose sample keys are unknown (truncated "
                          "or unreadable shards; see quarantine.jsonl): the ledger cannot count what they held[/]")

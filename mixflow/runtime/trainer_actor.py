"""Image trainer rank actor: runs the spec's entrypoint (yours, or the built-in loop that
``trainer.model`` names) on this rank's feed of the pipeline.

The rank keeps its *stream position* through its feed: the position carried by the last
batch it consumed (see :mod:`mixflow.runtime.mixer_actor`) and the quarantine records that
came with the epoch's batches so far. ``save_checkpoint`` writes it with what the entrypoint
registered (``context.on_checkpoint``: model and optimizer, say) in one file; a pipeline
resumed from it continues with the first batch this rank had not consumed (batches in
flight are produced again), and the entrypoint gets its state back (``context.resume_state``).
"""

from __future__ import annotations

from pathlib import Path

import ray
import torch

from mixflow.config import PipelineSpec
from mixflow.runtime.entrypoint import (RankContext, entrypoint_of, free_port, import_paths, join_process_group,
                                        leave_process_group, load_entrypoint, needs_process_group)
from mixflow.runtime.mixer_actor import start_position
from mixflow.runtime.rank_feed import default_device
from mixflow.runtime.placement import Placed
from mixflow.runtime.rank_checkpoint import CHECKPOINT_FORMAT, load_rank_checkpoint
from mixflow.runtime.run_feeds import RunImageFeed


@ray.remote(num_cpus=0, max_concurrency=2)
class TrainerRank(Placed):
    def __init__(self, spec_json: str, rank: int, world_size: int, channel, record_digests: bool = False,
                 resume: dict | None = None, holder=None, stream: dict | None = None,
                 sys_path: list[str] | None = None):
        torch.set_num_threads(1)
        import_paths(sys_path or [])
        self.spec = PipelineSpec.model_validate_json(spec_json)
        resume = resume or {}
        slots = self.spec.runtime.readers_per_rank
        self.start = {"position": dict(resume.get("position") or start_position(0, slots)),
                      "skipped": list(resume.get("skipped", []))}
        # The elastic cuts (with the records before them) the rank's first epoch was resumed under.
        self.cuts = list(resume.get("cuts", []))
        self.skipped_before_cuts = list(resume.get("skipped_before_cuts", []))
        self.rank, self.world_size = rank, world_size
        self.channel, self.holder = channel, holder
        self.stream = stream or {}
        self.record_digests = record_digests
        self.device = default_device()
        self.feed: RunImageFeed | None = None
        self.context: RankContext | None = None

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int, checkpoint: str | None = None) -> None:
        """Load the entrypoint, join the process group (when the entrypoint trains a DDP model),
        and read ``checkpoint`` (a file written by :meth:`save_checkpoint`, of this rank or any
        other): what the entrypoint saved there becomes ``context.resume_state``."""
        self.entrypoint = load_entrypoint(entrypoint_of(self.spec))
        resume_state = load_rank_checkpoint(checkpoint, self.device)["entrypoint"] if checkpoint else None
        if needs_process_group(self.spec):
            join_process_group(self.spec, self.rank, self.world_size, self.device, master_addr, master_port)
        self.spec.run_path.mkdir(parents=True, exist_ok=True)  # the entrypoint may write there (context.run_dir)
        self.context = RankContext(self.rank, self.world_size, self.device, self.spec, self.spec.name,
                                   self.spec.run_path, checkpoint, resume_state)

    def run(self, stop_at: tuple[int, int] | None = None) -> dict:
        """Run the entrypoint on this rank's feed; with ``stop_at=(epoch, step)`` the feed ends once
        the rank has consumed ``step`` batches of ``epoch`` (counting those before a resume).
        Returns each epoch's account (``epochs``) and the entrypoint's return value."""
        t = self.spec.trainer
        self.feed = RunImageFeed(self.spec, self.stream, self.rank, self.world_size, self.channel, self.holder,
                                 self.device, self.start, stop_at, self.record_digests,
                                 t.throttle.get(self.rank, 0.0))
        result = self.entrypoint(self.feed, self.context)
        return {"rank": self.rank, "epochs": self.feed.results, "result": result}

    def progress(self) -> dict:
        return self.feed.progress() if self.feed is not None else {"samples": 0, "steps": 0, "loss": None,
                                                                   "wait_s": 0.0}

    def stream_state(self) -> dict:
        """This rank's part of the pipeline state: its stream position and the quarantine
        records of the position's epoch consumed so far."""
        if self.feed is None:
            position, skipped = self.start["position"], self.start["skipped"]
        else:
            position, skipped = self.feed._position, self.feed._skipped
        same_epoch = position["epoch"] == self.start["position"]["epoch"]
        return {"rank": self.rank, "position": dict(position), "skipped": [dict(r) for r in skipped],
                "cuts": self.cuts if same_epoch else [],
                "skipped_before_cuts": self.skipped_before_cuts if same_epoch else []}

    def save_checkpoint(self, path: str) -> str:
        """Save this rank's stream state and what its entrypoint registered, in one file."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": CHECKPOINT_FORMAT, "rank": self.rank, "world_size": self.world_size,
                    "stream": self.stream_state(),
                    "entrypoint": self.context.checkpoint_state() if self.context is not None else None}, path)
        return str(path)

    def teardown(self) -> None:
        leave_process_group()

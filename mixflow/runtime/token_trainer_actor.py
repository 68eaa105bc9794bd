"""Token trainer rank actor: runs the spec's entrypoint (yours, or the built-in LM loop that
``trainer.model`` names) on this rank's token feed, whose reports reach the mixture controller.

Each rank evaluates its own slice of the validation sequences (``feed.held_out``); the
controller averages the ranks' eval reports. ``checkpoint`` is the rank's part of a run
checkpoint: its stream position (last consumed step, producer state) and what its
entrypoint registered with ``context.on_checkpoint``.
"""

from __future__ import annotations

import ray
import torch

from mixflow.config import TokenPipelineSpec
from mixflow.runtime.entrypoint import (RankContext, entrypoint_of, free_port, import_paths, join_process_group,
                                        leave_process_group, load_entrypoint, needs_process_group)
from mixflow.runtime.placement import Placed
from mixflow.runtime.rank_feed import default_device
from mixflow.runtime.run_feeds import RunTokenFeed


@ray.remote(num_cpus=0, max_concurrency=2)
class TokenTrainerRank(Placed):
    def __init__(self, spec_json: str, rank: int, world_size: int, channel, controller, stream: dict,
                 val_sets: list, test_sets: list, vocab_size: int, pad_id: int | None, grad_stats_every: int,
                 sys_path: list[str] | None = None):
        torch.set_num_threads(1)
        import_paths(sys_path or [])
        self.spec = TokenPipelineSpec.model_validate_json(spec_json)
        self.rank, self.world_size = rank, world_size
        self.channel, self.controller = channel, controller
        self.stream = stream
        self.val_sets, self.test_sets = val_sets, test_sets
        self.vocab_size, self.pad_id, self.grad_stats_every = vocab_size, pad_id, grad_stats_every
        self.device = default_device()
        self.feed: RunTokenFeed | None = None
        self.context: RankContext | None = None
        self.start: dict | None = None

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int, resume: dict | None = None) -> None:
        """Load the entrypoint and join the process group; ``resume``: this rank's part of a run
        checkpoint (:meth:`checkpoint`), whose entrypoint state becomes ``context.resume_state``."""
        self.entrypoint = load_entrypoint(entrypoint_of(self.spec))
        if needs_process_group(self.spec):
            join_process_group(self.spec, self.rank, self.world_size, self.device, master_addr, master_port)
        if resume is not None:
            self.start = {"step": resume["feed"]["step"], "producer": resume["feed"]["producer"], "controller": None}
        self.spec.run_path.mkdir(parents=True, exist_ok=True)  # the entrypoint may write there (context.run_dir)
        self.context = RankContext(self.rank, self.world_size, self.device, self.spec, self.spec.name,
                                   self.spec.run_path, None, resume["entrypoint"] if resume else None,
                                   self.test_sets)

    def run(self, stop_after: int | None = None) -> dict:
        """Run the entrypoint on the feed to the last step, or until global step ``stop_after - 1``
        was consumed. Returns the feed's account and the entrypoint's return value."""
        self.feed = RunTokenFeed(self.spec, self.stream, self.rank, self.world_size, self.channel, self.controller,
                                 self.device, self.val_sets, self.vocab_size, self.pad_id, self.grad_stats_every,
                                 self.start, stop_after, self.spec.trainer.throttle.get(self.rank, 0.0))
        result = self.entrypoint(self.feed, self.context)
        if self.feed.result is None:
            raise RuntimeError(f"{entrypoint_of(self.spec)} returned before its feed reached its last step "
                               "(an entrypoint consumes feed.epoch(0) to its end)")
        return {**self.feed.result, "result": result}

    def checkpoint(self) -> dict:
        """This rank's stream position and its entrypoint's state (one call)."""
        b = self.feed._batches if self.feed is not None else None
        feed = b.state_dict() if b is not None else {"step": None, "producer": None}
        return {"rank": self.rank, "feed": feed, "entrypoint": self.context.checkpoint_state()}

    def progress(self) -> dict:
        return self.feed.progress() if self.feed is not None else {"steps": 0, "tokens": 0, "loss": None}

    def teardown(self) -> None:
        leave_process_group()

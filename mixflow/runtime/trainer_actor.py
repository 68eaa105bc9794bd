"""Trainer rank actor: torch.distributed (gloo on CPU, nccl on GPU), iterating its own feed.

The rank keeps its *stream position*: the position carried by the last batch it
consumed (see :mod:`mixflow.runtime.mixer_actor`) and the quarantine records that
came with the epoch's batches so far. ``save_checkpoint`` writes it next to the
model and optimizer in one call; a pipeline resumed from it continues with the
first batch this rank had not consumed (batches in flight are produced again).
"""

from __future__ import annotations

import contextlib
import socket
import time
import zlib
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import ray
import torch
import torch.distributed as dist

from mixflow.config import PipelineSpec
from mixflow.data.bad_samples import SkipRecord
from mixflow.runtime.channel import ChannelReader
from mixflow.runtime.mixer_actor import start_position
from mixflow.mix.plans import LayerPlan
from mixflow.train.feed import Feed
from mixflow.train.mix_label_helpers import ManifoldMixupHook
from mixflow.train.losses import soft_target_cross_entropy
from mixflow.train.models import MODELS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@ray.remote(num_cpus=0, max_concurrency=2)
class TrainerRank:
    def __init__(self, spec_json: str, rank: int, world_size: int, channel, record_digests: bool = False,
                 resume: dict | None = None, holder=None):
        torch.set_num_threads(1)
        self.spec = PipelineSpec.model_validate_json(spec_json)
        self.slots = self.spec.runtime.readers_per_rank
        resume = resume or {}
        self.position = dict(resume.get("position") or start_position(0, self.slots))
        # The epoch's context kept for checkpoints: quarantine records that came with its batches
        # on this rank, and the elastic cuts (with the records before them) it was resumed under.
        self.epoch_skipped = [SkipRecord(**r) for r in resume.get("skipped", [])]
        self.cuts = list(resume.get("cuts", []))
        self.skipped_before_cuts = list(resume.get("skipped_before_cuts", []))
        self.rank = rank
        self.world_size = world_size
        self.reader = ChannelReader(channel, holder)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = None
        self.optimizer = None
        self.record_digests = record_digests
        self.throttle_s = self.spec.trainer.throttle.get(rank, 0.0)
        self._progress = {"samples": 0, "steps": 0, "loss": None, "wait_s": 0.0}

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, master_addr: str, master_port: int, checkpoint: str | None = None) -> None:
        """Join the process group and build the model (weights and optimizer from ``checkpoint``
        when given: a file written by :meth:`save_checkpoint`, of this rank or any other)."""
        t = self.spec.trainer
        if t.model == "none":
            return
        torch.manual_seed(self.spec.seed)  # identical initial weights on every rank
        model = MODELS[t.model](self.spec.data.num_classes).to(self.device)
        if self.world_size > 1:
            backend = t.backend if t.backend != "auto" else ("nccl" if self.device.type == "cuda" else "gloo")
            dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
                                    world_size=self.world_size, timeout=timedelta(seconds=120))
            model = torch.nn.parallel.DistributedDataParallel(model)
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum)
        if checkpoint is not None:
            saved = torch.load(checkpoint, map_location=self.device, weights_only=False)
            if saved["model"] is None:
                raise ValueError(f"checkpoint {checkpoint} holds no model weights (saved with trainer.model: none)")
            self._module().load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])

    def _module(self) -> torch.nn.Module:
        return self.model.module if isinstance(self.model, torch.nn.parallel.DistributedDataParallel) else self.model

    def run_epoch(self, epoch: int, stop_at_step: int | None = None) -> dict:
        """Consume ``epoch`` to its end marker, or until the rank has consumed ``stop_at_step``
        batches of it (counting batches consumed before a resume); ``stopped`` says which."""
        if self.position["epoch"] != epoch:
            self.position, self.epoch_skipped = start_position(epoch, self.slots), []
            self.cuts, self.skipped_before_cuts = [], []
        d = self.spec.decode
        feed = Feed(self.reader, self.device, d.mean, d.std, to_float=self.model is not None)
        ring_before = self.reader.ring_batches
        start = time.perf_counter()
        loss_sum, steps, digests, skipped = 0.0, 0, [], []
        stopped = (stop_at_step is not None and not self.position.get("done")
                   and self.position["step"] >= stop_at_step)
        training = self.model is not None
        if training:
            self.model.train()
        join = self.model.join() if training and self.world_size > 1 else contextlib.nullcontext()
        with join:
            for batch in ([] if stopped else feed):
                loss = self._step(batch) if training else None
                if not training:
                    batch.x.view(-1)[0].item()  # touch the data
                if self.record_digests:
                    digests.append(_digest(batch))
                if self.throttle_s:
                    time.sleep(self.throttle_s)
                steps += 1
                loss_sum += loss or 0.0
                self._progress.update(samples=self._progress["samples"] + len(batch.keys), steps=steps, loss=loss)
                consumed = self.reader.last
                self.position = consumed["position"]
                skipped += consumed["skipped"]
                if stop_at_step is not None and self.position["step"] >= stop_at_step:
                    stopped = True
                    break
        if not stopped:  # the end marker was consumed: the epoch is complete on this rank
            skipped += self.reader.end_info["skipped"]
            self.position = {**self.position, "done": True}
        self.epoch_skipped += skipped
        self._progress["wait_s"] += feed.wait_s
        return {"rank": self.rank, "epoch": epoch, "keys": feed.keys, "samples": feed.samples, "steps": steps,
                "mean_loss": loss_sum / steps if steps and self.model is not None else None,
                "wait_s": feed.wait_s, "wall_s": time.perf_counter() - start, "digests": digests,
                "skipped": skipped, "stopped": stopped, "shared_memory_steps": self.reader.ring_batches - ring_before}

    def _step(self, batch) -> float:
        if isinstance(batch.plan, LayerPlan):  # manifold mixup: mix hidden states at the planned layer
            with ManifoldMixupHook(_blocks(self.model), batch):
                logits = self.model(batch.x)
        else:
            logits = self.model(batch.x)
        loss = soft_target_cross_entropy(logits, batch.targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def progress(self) -> dict:
        return dict(self._progress)

    def stream_state(self) -> dict:
        """This rank's part of the pipeline state: its stream position and the quarantine
        records of the position's epoch consumed so far."""
        return {"rank": self.rank, "position": dict(self.position),
                "skipped": [asdict(r) for r in self.epoch_skipped], "cuts": self.cuts,
                "skipped_before_cuts": self.skipped_before_cuts}

    def save_checkpoint(self, path: str) -> str:
        """Save model, optimizer and this rank's stream state together in one file (``torch.save``)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"rank": self.rank, "world_size": self.world_size, "stream": self.stream_state(),
                    "model": self._module().state_dict() if self.model is not None else None,
                    "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None}, path)
        return str(path)

    def teardown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _blocks(model: torch.nn.Module):
    """The layer sequence manifold mixup indexes: the model's ``features`` (a DigitsCNN's conv stack)."""
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if not hasattr(inner, "features"):
        raise ValueError(f"manifold mixup needs a model with a `features` sequence; {type(inner).__name__} has none")
    return inner.features


def _digest(batch) -> tuple:
    """(step, keys, crc32 of the pixels, crc32 of the soft targets): compares two runs exactly."""
    return (batch.step, tuple(batch.keys), zlib.crc32(batch.x.cpu().numpy().tobytes()),
            zlib.crc32(batch.targets.cpu().numpy().tobytes()))

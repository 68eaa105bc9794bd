"""Trainer rank actor: torch.distributed (gloo on CPU, nccl on GPU), iterating its own feed."""

from __future__ import annotations

import contextlib
import socket
import time
import zlib
from datetime import timedelta

import ray
import torch
import torch.distributed as dist

from mixflow.config import PipelineSpec
from mixflow.runtime.channel import ChannelReader
from mixflow.train.feed import Feed
from mixflow.train.losses import soft_target_cross_entropy
from mixflow.train.models import MODELS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@ray.remote(num_cpus=0, max_concurrency=2)
class TrainerRank:
    def __init__(self, spec_json: str, rank: int, world_size: int, channel, record_digests: bool = False):
        torch.set_num_threads(1)
        self.spec = PipelineSpec.model_validate_json(spec_json)
        self.rank = rank
        self.world_size = world_size
        self.reader = ChannelReader(channel)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = None
        self.optimizer = None
        self.record_digests = record_digests
        self.throttle_s = self.spec.trainer.throttle.get(rank, 0.0)
        self._progress = {"samples": 0, "steps": 0, "loss": None, "wait_s": 0.0}

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, master_addr: str, master_port: int) -> None:
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

    def run_epoch(self, epoch: int) -> dict:
        d = self.spec.decode
        feed = Feed(self.reader, self.device, d.mean, d.std, to_float=self.model is not None)
        start = time.perf_counter()
        loss_sum, steps, digests = 0.0, 0, []
        training = self.model is not None
        if training:
            self.model.train()
        join = self.model.join() if training and self.world_size > 1 else contextlib.nullcontext()
        with join:
            for batch in feed:
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
        self._progress["wait_s"] += feed.wait_s
        return {"rank": self.rank, "epoch": epoch, "keys": feed.keys, "samples": feed.samples, "steps": steps,
                "mean_loss": loss_sum / steps if steps and self.model is not None else None,
                "wait_s": feed.wait_s, "wall_s": time.perf_counter() - start, "digests": digests}

    def _step(self, batch) -> float:
        loss = soft_target_cross_entropy(self.model(batch.x), batch.targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def progress(self) -> dict:
        return dict(self._progress)

    def teardown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _digest(batch) -> tuple:
    """(step, keys, crc32 of the pixels, crc32 of the soft targets): compares two runs exactly."""
    return (batch.step, tuple(batch.keys), zlib.crc32(batch.x.cpu().numpy().tobytes()),
            zlib.crc32(batch.targets.cpu().numpy().tobytes()))

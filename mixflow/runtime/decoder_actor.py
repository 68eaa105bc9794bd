"""Reader/decoder actor: wraps one :class:`~mixflow.decode.decode_stage.DecodeStage`."""

from __future__ import annotations

import ray

from mixflow.config import PipelineSpec
from mixflow.data.listing import ShardInfo
from mixflow.decode.decode_stage import DecodeStage


@ray.remote(num_cpus=0)
class DecoderActor:
    def __init__(self, spec_json: str, shards: list[ShardInfo], reader: int, num_readers: int, device: str):
        spec = PipelineSpec.model_validate_json(spec_json)
        self.stage = DecodeStage(shards, reader, num_readers, spec.decode, spec.trainer.batch_size,
                                 spec.data.num_classes, spec.seed, spec.data.shuffle_window, spec.on_error,
                                 device)
        self.stage.warm_up()

    def start_epoch(self, epoch: int) -> int:
        """Position the reader at the start of ``epoch``; returns its sample count."""
        self.stage.start_epoch(epoch)
        return len(self.stage.source)

    def next_batch(self) -> dict | None:
        return self.stage.next_batch()

    def skipped(self, epoch: int) -> list:
        """Quarantine records of ``epoch`` (taken out; later epochs' records stay)."""
        return self.stage.policy.drain(epoch)

    def state_dict(self) -> dict:
        return self.stage.state_dict()

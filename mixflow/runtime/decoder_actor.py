"""Reader/decoder actor: wraps one :class:`~mixflow.decode.decode_stage.DecodeStage`.

Requests name the batch (``batch(epoch, index)``), so the actor holds no position
that could be lost: it is created restartable (``max_restarts``) with its calls
retried (``max_task_retries``), and a restarted actor, on this node or another,
answers the retried request with exactly the batch the dead one would have sent.
"""

from __future__ import annotations


import numpy as np
import ray

from mixflow.config import PipelineSpec
from mixflow.data.listing import ShardInfo
from mixflow.decode.decode_stage import DecodeStage
from mixflow.runtime.placement import Placed

RESTARTS = {"max_restarts": -1, "max_task_retries": -1}  # restart forever; requests are idempotent


def reader_stage(spec: PipelineSpec, shards: list[ShardInfo], reader: int, num_readers: int, device: str,
                 first_epoch: int = 0, epoch_orders: dict[int, np.ndarray] | None = None) -> DecodeStage:
    """Reader ``reader`` of ``num_readers`` as the spec configures it, warmed up on ``first_epoch``:
    what a decoder actor serves, or a fused mixer decodes itself."""
    stage = DecodeStage(shards, reader, num_readers, spec.decode, spec.trainer.batch_size,
                        spec.data.num_classes, spec.seed, spec.data.shuffle_window, spec.on_error,
                        device, epoch_orders)
    stage.warm_up(first_epoch)
    return stage


@ray.remote(num_cpus=0, **RESTARTS)
class DecoderActor(Placed):
    def __init__(self, spec_json: str, shards: list[ShardInfo], reader: int, num_readers: int, device: str,
                 first_epoch: int = 0, epoch_orders: dict[int, np.ndarray] | None = None):
        spec = PipelineSpec.model_validate_json(spec_json)
        self.stage = reader_stage(spec, shards, reader, num_readers, device, first_epoch, epoch_orders)

    @ray.method(enable_task_events=False)  # per batch: see Channel
    def batch(self, epoch: int, index: int, start: int | None = None) -> dict | None:
        """Batch ``index`` of ``epoch`` (``None`` past the end); see :meth:`DecodeStage.batch`."""
        return self.stage.batch(epoch, index, start)

    def store_stats(self) -> dict:
        """What this actor's process did with the object store (retries, downloads, cache hits)."""
        from mixflow.data.object_store import process_stats  # the module's, not a copy pickled with the class

        return process_stats()


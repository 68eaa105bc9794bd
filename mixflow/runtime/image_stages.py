"""The image data plane without trainers: per rank one credit-based channel, one mixer and its
readers (decoder actors, or the reader fused into the mixer). Both the built-in pipeline
(:class:`~mixflow.runtime.image_pipeline.ImagePipeline`) and a hosted one
(:class:`~mixflow.runtime.pipeline_host.PipelineHost`, what ``mixflow.start`` runs) start
their stages here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mixflow.config import PipelineSpec
from mixflow.data.listing import ShardInfo
from mixflow.runtime import image_checkpoint as ckpt
from mixflow.runtime.channel import Channel
from mixflow.runtime.decoder_actor import DecoderActor
from mixflow.runtime.mixer_actor import MixerActor


@dataclass
class ImageStages:
    """The actors of an image data plane, indexed by rank (``decoders``: rank r owns
    ``decoders[r * k:(r + 1) * k]``; empty when fused)."""

    channels: list = field(default_factory=list)
    mixers: list = field(default_factory=list)
    decoders: list = field(default_factory=list)

    @property
    def fused(self) -> bool:
        return not self.decoders


def _fused(spec: PipelineSpec) -> bool:
    return spec.runtime.readers_per_rank == 1 and spec.runtime.fuse_reader


def start_rank_stage(spec: PipelineSpec, shards: list[ShardInfo], device: str, state: dict, rank: int,
                     decoders: list, ring_tag: str | None, options: dict[str, dict],
                     orders: list | None = None) -> tuple:
    """Rank ``rank``'s channel and mixer, producing from ``state``'s position of that rank once its
    ``run`` is called. ``decoders``: the rank's decoder actors (none when the reader is fused)."""
    spec_json = spec.model_dump_json()
    ranks = spec.trainer.ranks
    gpu = {"num_gpus": 0.1} if device == "gpu" else {}
    orders = orders if orders is not None else ckpt.reader_orders(state, shards)
    channel = Channel.options(**options.get("channel", {})).remote(f"r{rank}", spec.channel.max_items,
                                                                   spec.channel.max_bytes)
    start = state["rank_states"][rank]["position"]
    ring = ring_tag if spec.channel.shared_memory else None
    if not decoders:  # the mixer decodes its rank's one reader itself
        mixer = MixerActor.options(**{"scheduling_strategy": "SPREAD", **gpu, **options.get("mixer", {})}).remote(
            spec_json, rank, [], channel, start,
            reader={"shards": shards, "reader": rank, "num_readers": ranks, "device": device,
                    "first_epoch": state["epoch"], "epoch_orders": orders[rank]}, ring_tag=ring)
    else:
        mixer = MixerActor.options(**options.get("mixer", {})).remote(spec_json, rank, decoders, channel, start,
                                                                     ring_tag=ring)
    return channel, mixer


def start_image_stages(spec: PipelineSpec, shards: list[ShardInfo], device: str, state: dict,
                       ring_tag: str | None, options: dict[str, dict]) -> ImageStages:
    """Every rank's stages, from ``state`` (see :mod:`mixflow.runtime.image_checkpoint`)."""
    ranks, k = spec.trainer.ranks, spec.runtime.readers_per_rank
    orders = ckpt.reader_orders(state, shards)
    stages = ImageStages()
    if not _fused(spec):
        spec_json = spec.model_dump_json()
        gpu = {"num_gpus": 0.1} if device == "gpu" else {}
        stages.decoders = [DecoderActor.options(**{"scheduling_strategy": "SPREAD", **gpu,
                                                   **options.get("decoder", {})})
                           .remote(spec_json, shards, reader, ranks * k, device, state["epoch"], orders[reader])
                           for reader in range(ranks * k)]
    for r in range(ranks):
        channel, mixer = start_rank_stage(spec, shards, device, state, r, stages.decoders[r * k:(r + 1) * k],
                                          ring_tag, options, orders)
        stages.channels.append(channel)
        stages.mixers.append(mixer)
    return stages

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
from mixflow.runtime.actor_names import named, new_name
from mixflow.runtime.channel import Channel
from mixflow.runtime.decoder_actor import DecoderActor
from mixflow.runtime.mixer_actor import MixerActor
from mixflow.runtime.placement import actor_options


@dataclass
class ImageStages:
    """The actors of an image data plane, indexed by rank (``decoders``: rank r owns
    ``decoders[r * k:(r + 1) * k]``; empty when fused)."""

    channels: list = field(default_factory=list)
    mixers: list = field(default_factory=list)
    decoders: list = field(default_factory=list)
    decoder_names: list = field(default_factory=list)  # ActorName of each decoder (what mixers look up)

    @property
    def fused(self) -> bool:
        return not self.decoders


def _fused(spec: PipelineSpec) -> bool:
    return spec.runtime.readers_per_rank == 1 and spec.runtime.fuse_reader


def start_rank_stage(spec: PipelineSpec, shards: list[ShardInfo], device: str, state: dict, rank: int,
                     decoders: list, ring_tag: str | None, options: dict[str, dict],
                     orders: list | None = None, node: str | None = None) -> tuple:
    """Rank ``rank``'s channel and mixer, producing from ``state``'s position of that rank once its
    ``run`` is called. ``decoders``: the :class:`~mixflow.runtime.actor_names.ActorName` of each of
    the rank's decoder actors (none when the reader is fused). The mixer is restartable, so it
    gets its peers' names, not their handles (:mod:`mixflow.runtime.actor_names`). ``node``: the
    node the rank's actors ask for (:func:`~mixflow.runtime.placement.rank_nodes`)."""
    spec_json = spec.model_dump_json()
    ranks = spec.trainer.ranks
    orders = orders if orders is not None else ckpt.reader_orders(state, shards)
    channel_name = new_name(f"channel-r{rank}")
    channel = Channel.options(**named(channel_name), **actor_options(spec, "channel", device, node, options)).remote(
        f"r{rank}", spec.channel.max_items, spec.channel.max_bytes)
    start = state["rank_states"][rank]["position"]
    ring = ring_tag if spec.channel.shared_memory else None
    if not decoders:  # the mixer decodes its rank's one reader itself
        mixer = MixerActor.options(**actor_options(spec, "mixer", device, node, options)).remote(
            spec_json, rank, [], channel_name, start,
            reader={"shards": shards, "reader": rank, "num_readers": ranks, "device": device,
                    "first_epoch": state["epoch"], "epoch_orders": orders[rank]}, ring_tag=ring)
    else:
        mixer = MixerActor.options(**actor_options(spec, "mixer", device, node, options)).remote(
            spec_json, rank, decoders, channel_name, start, ring_tag=ring)
    return channel, mixer


def start_image_stages(spec: PipelineSpec, shards: list[ShardInfo], device: str, state: dict,
                       ring_tag: str | None, options: dict[str, dict], nodes: list | None = None) -> ImageStages:
    """Every rank's stages, from ``state`` (see :mod:`mixflow.runtime.image_checkpoint`); ``nodes``:
    the node each rank's actors ask for (None: wherever Ray puts them)."""
    ranks, k = spec.trainer.ranks, spec.runtime.readers_per_rank
    nodes = nodes or [None] * ranks
    orders = ckpt.reader_orders(state, shards)
    stages = ImageStages()
    if not _fused(spec):
        spec_json = spec.model_dump_json()
        stages.decoder_names = [new_name(f"decoder-{reader}") for reader in range(ranks * k)]
        stages.decoders = [DecoderActor.options(**named(name), **actor_options(spec, "decoder", device,
                                                                               nodes[reader // k], options))
                           .remote(spec_json, shards, reader, ranks * k, device, state["epoch"], orders[reader])
                           for reader, name in enumerate(stages.decoder_names)]
    for r in range(ranks):
        channel, mixer = start_rank_stage(spec, shards, device, state, r, stages.decoder_names[r * k:(r + 1) * k],
                                          ring_tag, options, orders, nodes[r])
        stages.channels.append(channel)
        stages.mixers.append(mixer)
    return stages

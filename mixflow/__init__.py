"""mixflow: a distributed data-pipeline augmentation engine.

Sharded datasets stream through DALI decoding into Ray actors that apply batch mixing
augmentations (or, for token data, an online data-mixture policy) and feed your PyTorch
training loop through credit-based channels, one per rank:

    import mixflow

    pipe = mixflow.start("pipelines/digits_mixup.yaml", name="run1")
    feed = pipe.feed(rank=0, world_size=pipe.world_size)   # or mixflow.feed("run1") in a worker
    for epoch in range(pipe.epochs):
        for batch in feed.epoch(epoch):                     # x, targets, y_a, y_b, lam, keys
            ...
    summary = pipe.close()                                  # exactly-once verdict per epoch

The public face: :func:`start`, :func:`connect`, :func:`feed`, :class:`Pipeline`, the feeds
(:class:`ImageFeed`, :class:`TokenFeed`), :class:`RankContext` (what a ``trainer.entrypoint``
function gets), :func:`load_spec` and the errors. The pure cores (:mod:`mixflow.mix`,
:mod:`mixflow.mixture`) never import Ray; :mod:`mixflow.runtime` is the only package that does,
and ``import mixflow`` loads none of it until one of these names is used.
"""

from mixflow.errors import (ConfigError, DataError, EpochOrderError, FeedError, FeedStateError, MixflowError,
                            PipelineError, PipelineNotFoundError, RankInUseError, RankNotConnectedError,
                            WorldSizeError)

__version__ = "0.1.0"

_LAZY = {
    "start": "mixflow.runtime.pipeline_handle",
    "connect": "mixflow.runtime.pipeline_handle",
    "feed": "mixflow.runtime.pipeline_handle",
    "Pipeline": "mixflow.runtime.pipeline_handle",
    "ImageFeed": "mixflow.runtime.rank_feed",
    "TokenFeed": "mixflow.runtime.rank_feed",
    "RankContext": "mixflow.runtime.entrypoint",
    "load_spec": "mixflow.config",
}

__all__ = [*_LAZY, "ConfigError", "DataError", "EpochOrderError", "FeedError", "FeedStateError", "MixflowError",
           "PipelineError", "PipelineNotFoundError", "RankInUseError", "RankNotConnectedError", "WorldSizeError"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mixflow' has no attribute {name!r}")

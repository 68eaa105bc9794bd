"""One exception hierarchy. Every error says *where*: field path, shard, sample key."""

from __future__ import annotations


class MixflowError(Exception):
    """Base class of every error mixflow raises on purpose."""


class ConfigError(MixflowError):
    """An invalid pipeline spec. ``problems`` holds ``(field_path, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"invalid pipeline spec{where}:"]
        lines += [f"  {path}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))

    def __reduce__(self):  # pickled with its fields (raised in an actor, it reaches the driver whole)
        return type(self), (self.problems, self.source)


class DataError(MixflowError):
    """A problem with a shard or a sample. Names the shard, the key and the byte offset when known."""

    def __init__(self, reason: str, shard: str | None = None, key: str | None = None,
                 offset: int | None = None):
        self.reason = reason
        self.shard = shard
        self.key = key
        self.offset = offset
        parts = []
        if shard is not None:
            parts.append(f"shard {shard}")
        if key is not None:
            parts.append(f"key {key!r}")
        if offset is not None:
            parts.append(f"offset {offset}")
        where = (", ".join(parts) + ": ") if parts else ""
        super().__init__(f"{where}{reason}")

    def __reduce__(self):  # pickled with its fields (Ray ships a stage's error to the driver)
        return type(self), (self.reason, self.shard, self.key, self.offset)


class PipelineError(MixflowError):
    """The running pipeline failed: an actor died, a rank stopped, a stage raised."""


class PipelineDataError(PipelineError, DataError):
    """A pipeline stage stopped on a bad sample or shard (``on_error: raise``): the stage's
    :class:`DataError`, unwrapped from the Ray task error, with ``stage`` naming who met it. Its
    message is the data error's one line: ``shard ..., key ...: reason``."""

    def __init__(self, reason: str, shard: str | None = None, key: str | None = None,
                 offset: int | None = None, stage: str | None = None):
        super().__init__(reason, shard, key, offset)
        self.stage = stage

    def __reduce__(self):
        return type(self), (self.reason, self.shard, self.key, self.offset, self.stage)


class FeedError(MixflowError):
    """A trainer-side misuse of a running pipeline, named: which pipeline, which rank, what to do."""


class PipelineNotFoundError(FeedError):
    """No running pipeline has that name (in mixflow's Ray namespace)."""


class WorldSizeError(FeedError):
    """A feed asked for a world size (or rank) the pipeline was not started with."""


class RankInUseError(FeedError):
    """A second consumer for one rank while its first consumer is alive."""


class EpochOrderError(FeedError):
    """``feed.epoch(e)`` called out of order: epochs run one after another, each to its end."""


class RankNotConnectedError(FeedError):
    """A rank did not connect within the pipeline's ``runtime.connect_timeout``."""


class FeedStateError(FeedError):
    """A feed state that does not fit this pipeline or this rank."""

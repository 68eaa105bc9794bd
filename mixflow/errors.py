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


class PipelineError(MixflowError):
    """The running pipeline failed: an actor died, a rank stopped, a stage raised."""

"""The public way in: ``mixflow.start`` a pipeline's data plane, ``mixflow.connect`` to it by name,
take one rank's ``feed``, ``close`` it for the ledger verdict.

    pipe = mixflow.start("my.yaml", name="run1")      # readers, mixers, channels; no trainers
    feed = pipe.feed(rank=0, world_size=2)             # or mixflow.connect("run1").feed()
    for epoch in range(pipe.epochs):
        for batch in feed.epoch(epoch):
            ...
    summary = pipe.close()                              # exactly-once verdict per epoch

A pipeline is a named actor (:class:`~mixflow.runtime.pipeline_host.PipelineHost`) in
Ray's ``mixflow`` namespace, so any process on the cluster can connect to it: a Ray Train
worker, a torchrun rank (``RAY_ADDRESS`` set), another driver. ``detached=True`` lets it
outlive the process that started it (``mixflow serve``); else it ends with that process.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import ray

from mixflow import errors
from mixflow.config import (PipelineSpec, TokenPipelineSpec, apply_override, load_yaml, resolve_paths,
                            validate_spec)
from mixflow.runtime.pipeline_host import ACTOR_PREFIX, NAMESPACE, PipelineHost, host_actor_name
from mixflow.runtime.rank_feed import ImageFeed, TokenFeed, raise_refusal
from mixflow.runtime.ray_session import ensure_ray

SpecLike = str | Path | dict | PipelineSpec | TokenPipelineSpec


def _raw_spec(spec: SpecLike, overrides: list[str] | None) -> tuple[dict, str | None]:
    if isinstance(spec, (PipelineSpec, TokenPipelineSpec)):
        raw, source = spec.model_dump(mode="json"), None
    elif isinstance(spec, dict):
        raw, source = json.loads(json.dumps(spec)), None
    else:
        path = Path(spec)
        if not path.is_file():
            raise errors.ConfigError([("<file>", f"no such pipeline spec: {path}")], str(path))
        raw, source = load_yaml(path.read_text(), str(path)) or {}, str(path)  # duplicate keys refused
    for item in overrides or []:
        apply_override(raw, item)
    return raw, source


def running_pipelines() -> list[str]:
    """Names of the pipelines running on the connected cluster."""
    return sorted(a["name"][len(ACTOR_PREFIX):] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a.get("namespace") == NAMESPACE and a["name"].startswith(ACTOR_PREFIX))


def _find_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``rank``/``world_size`` as given, else from Ray Train's context, else torchrun's environment."""
    if rank is not None and world_size is not None:
        return rank, world_size
    try:
        from ray import train

        context = train.get_context()
        found = context.get_world_rank(), context.get_world_size()
    except Exception:  # noqa: BLE001 - not inside a Ray Train worker (or Ray Train not installed)
        found = None
    if found is None or found[0] is None:
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            found = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if found is None or found[0] is None:
        raise errors.WorldSizeError("feed(): no rank given and none found: pass feed(rank=R, world_size=N), or "
                                    "call it inside a Ray Train worker or a torchrun rank (RANK, WORLD_SIZE)")
    return (rank if rank is not None else found[0]), (world_size if world_size is not None else found[1])


class Pipeline:
    """A running pipeline (started here or found by name). ``kind``: ``"image"`` or ``"tokens"``;
    ``world_size``: its ``trainer.ranks``; ``epochs``: how many epochs a feed runs."""

    def __init__(self, host, info: dict, owner: bool):
        self._host = host
        self._info = info
        self.name: str = info["name"]
        self.kind: str = info["kind"]
        self.world_size: int = info["world_size"]
        self.epochs: int = info["epochs"]
        self.spec = validate_spec(json.loads(info["spec_json"]))
        self._owner = owner
        self._closed = False

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, kind={self.kind!r}, world_size={self.world_size}, epochs={self.epochs})"

    def feed(self, rank: int | None = None, world_size: int | None = None, device=None,
             to_float: bool = True) -> ImageFeed | TokenFeed:
        """Claim ``rank`` and return its feed. Without ``rank``/``world_size`` they come from Ray
        Train's context (inside a ``TorchTrainer`` worker) or torchrun's ``RANK``/``WORLD_SIZE``.
        ``device``: where batches land (default ``cuda:LOCAL_RANK`` when CUDA is there, else CPU).
        ``to_float`` (images): normalised float ``x`` (default), or uint8 as delivered."""
        rank, world_size = _find_rank(rank, world_size)
        try:
            if self.kind == "image":
                return ImageFeed(self._host, self._info, rank, world_size, device, to_float)
            return TokenFeed(self._host, self._info, rank, world_size, device)
        except ray.exceptions.RayActorError:
            raise errors.PipelineNotFoundError(f"pipeline {self.name!r} is no longer running") from None

    def close(self) -> Any:
        """Stop the data plane and return the run summary: for image pipelines a
        :class:`~mixflow.runtime.summary.RunSummary` (``ledgers``: the exactly-once verdict of
        every epoch all ranks finished; ``exactly_once``). Raises the pipeline's failure (a dead
        stage, a rank that never connected) after stopping it."""
        if self._closed:
            raise errors.FeedError(f"pipeline {self.name!r} is closed already")
        try:
            out = ray.get(self._host.close.remote())
        except ray.exceptions.RayActorError:
            raise errors.PipelineNotFoundError(f"pipeline {self.name!r} is no longer running") from None
        self._closed = True
        ray.kill(self._host, no_restart=True)
        if out["failure"]:
            kind, message = out["failure"]
            raise getattr(errors, kind, errors.PipelineError)(message)
        return out["summary"]


def start(spec: SpecLike, name: str | None = None, *, overrides: list[str] | None = None,
          address: str | None = None, detached: bool = False) -> Pipeline:
    """Start a pipeline's data plane (readers, mixers, channels; the mixture controller of a
    token pipeline), with no trainers, and return it.

    ``spec``: a YAML path, a mapping or a validated spec; ``overrides``: ``field.path=value``
    strings. ``name`` (default: the spec's) is how other processes find it
    (:func:`connect`). Relative paths in the spec are resolved here, before anything ships.
    ``address``: the Ray cluster to use (default: the spec's ``runtime.address``, then
    ``RAY_ADDRESS``, else an embedded local Ray). ``detached``: outlive this process."""
    raw, source = _raw_spec(spec, overrides)
    spec_obj = validate_spec(resolve_paths(raw, Path.cwd()), source)
    name = name or spec_obj.name
    if not name or any(c in name for c in "/: "):
        raise errors.ConfigError([("name", f"a pipeline name is letters, digits, '_', '-', '.'; got {name!r}")])
    ensure_ray(address or spec_obj.runtime.address, spec_obj.runtime.runtime_env)
    if name in running_pipelines():
        raise errors.FeedError(f"a pipeline named {name!r} is already running; connect to it with "
                               f"mixflow.connect({name!r}), or start this one under another name")
    options: dict[str, Any] = {"name": host_actor_name(name), "namespace": NAMESPACE}
    if detached:
        options["lifetime"] = "detached"
    host = PipelineHost.options(**options).remote(spec_obj.model_dump_json(), name)
    try:
        info = raise_refusal(ray.get(host.start.remote()))
    except BaseException:
        ray.kill(host, no_restart=True)
        raise
    return Pipeline(host, info, owner=True)


def connect(name: str, address: str | None = None, timeout: float = 0.0) -> Pipeline:
    """The running pipeline called ``name``, from any process on its cluster (``address``: the
    cluster, default ``RAY_ADDRESS``). ``timeout``: seconds to wait for it to appear."""
    started = ensure_ray(address)
    deadline = time.monotonic() + timeout
    while True:
        try:
            host = ray.get_actor(host_actor_name(name), namespace=NAMESPACE)
            info = ray.get(host.info.remote())
            return Pipeline(host, info, owner=False)
        except (ValueError, ray.exceptions.RayActorError):
            if time.monotonic() >= deadline:
                break
            time.sleep(0.5)
    running = running_pipelines()
    hint = (" (this process started its own local Ray: set RAY_ADDRESS to the cluster's address, as "
            "`mixflow serve` prints it)" if started else "")
    raise errors.PipelineNotFoundError(f"no running pipeline named {name!r}; running: "
                                       f"{', '.join(running) if running else 'none'}{hint}")


def feed(name: str, rank: int | None = None, world_size: int | None = None, device=None, to_float: bool = True,
         address: str | None = None, timeout: float = 60.0) -> ImageFeed | TokenFeed:
    """This process's feed of pipeline ``name``: ``connect(name).feed(...)`` in one call, with the
    rank from Ray Train's context or torchrun's environment when not given."""
    return connect(name, address, timeout).feed(rank, world_size, device, to_float)

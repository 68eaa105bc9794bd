"""Where a pipeline's actors run, and what each asks Ray for.

*Resources.* Each stage's actors ask for ``runtime.resources[stage]``; unset fields take the
defaults below. On a one-node Ray (a laptop, the embedded local Ray, CI) the defaults ask for
nothing, so any spec runs whatever the core count; on a multi-node cluster they are what the
stage uses, so Ray's scheduler counts it: a CPU per trainer and per mixer (plus
``decode.threads`` when the mixer decodes its reader itself), ``decode.threads`` per reader,
a GPU per trainer when the cluster has GPUs, a sliver for a channel or a token producer.

*Placement* (``runtime.placement: colocate``, the default). On a multi-node cluster each rank
gets a node, ranks spread over the nodes that can hold a rank's trainer, and its trainer, mixer,
channel (and readers, unless their resources name a custom resource that pins them to the
nodes holding the data) ask for that node, so the mixer hands batches to the trainer through
the shared-memory ring instead of the object store. The affinity is soft: an actor whose node
is full, or gone when it restarts, runs elsewhere (the summary then shows the rank apart from
its mixer). ``spread`` leaves placement to Ray's SPREAD strategy. The summary says which node
ran what (:func:`where`). An actor no node can take fails the start-up by name
(:func:`wait_started`), instead of waiting for resources forever.
"""

from __future__ import annotations

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

STAGES = ("decoder", "mixer", "trainer", "channel", "producer")
SLIVER = 0.01  # what a mostly idle actor asks for on a cluster (enough for node affinity to apply)


def _alive_nodes() -> list[dict]:
    return sorted((n for n in ray.nodes() if n.get("Alive")), key=lambda n: n["NodeID"])


def multi_node() -> bool:
    return len(_alive_nodes()) > 1


def stage_options(spec, stage: str, cluster: bool | None = None, gpus: bool | None = None) -> dict:
    """The Ray ``.options()`` resources of one actor of ``stage``: ``runtime.resources[stage]`` over
    the defaults (see the module docstring). ``cluster``: whether Ray has more than one node;
    ``gpus``: whether it has GPUs (both asked of Ray when None)."""
    cluster = multi_node() if cluster is None else cluster
    threads = getattr(getattr(spec, "decode", None), "threads", 1) or 1
    fused = spec.runtime.readers_per_rank == 1 and spec.runtime.fuse_reader
    if gpus is None:
        gpus = cluster and ray.cluster_resources().get("GPU", 0) > 0
    defaults = {"decoder": {"num_cpus": threads}, "mixer": {"num_cpus": 1 + (threads if fused else 0)},
                "trainer": {"num_cpus": 1, **({"num_gpus": 1} if gpus else {})},
                "channel": {"num_cpus": SLIVER}, "producer": {"num_cpus": SLIVER}}[stage] if cluster else {}
    given = spec.runtime.resources.get(stage)
    out = dict(defaults)
    if given is not None:
        for field in ("num_cpus", "num_gpus", "memory"):
            value = getattr(given, field)
            if value is not None:
                out[field] = value
        if given.resources:
            out["resources"] = dict(given.resources)
    return out


def rank_nodes(spec, trainer: dict) -> list[str | None]:
    """The node each rank's actors ask for: ``None`` for every rank on one node or with
    ``runtime.placement: spread``; else the nodes that can hold a rank's trainer (its
    ``trainer`` resources), round robin from the one with the most CPUs."""
    nodes = _alive_nodes()
    ranks = spec.trainer.ranks
    if len(nodes) < 2 or spec.runtime.placement != "colocate":
        return [None] * ranks
    need = {"CPU": trainer.get("num_cpus", 0), "GPU": trainer.get("num_gpus", 0), **trainer.get("resources", {})}
    fits = [n for n in nodes if all(n["Resources"].get(k, 0) >= v for k, v in need.items() if v)]
    fits = sorted(fits or nodes, key=lambda n: -n["Resources"].get("CPU", 0))
    return [fits[r % len(fits)]["NodeID"] for r in range(ranks)]


def on_node(node_id: str | None, options: dict) -> dict:
    """``options`` with a soft affinity for ``node_id`` (none when it is None, or when the actor's
    custom resources decide where it runs)."""
    if node_id is None or options.get("resources"):
        return options
    strategy = NodeAffinitySchedulingStrategy(node_id=node_id, soft=True, _spill_on_unavailable=True)
    return {**options, "scheduling_strategy": strategy}


def stage_names(controller=None, **stages: list) -> dict[str, object]:
    """Stage name (as errors and the summary name them) -> actor: ``mixer=[a, b]`` gives
    ``mixer r0`` and ``mixer r1`` (one per rank), ``reader=[...]`` gives ``reader 0``, ...; the
    ``controller`` is just ``controller``. Stages given as None are left out."""
    out = {} if controller is None else {"controller": controller}
    for kind, actors in stages.items():
        label = "{kind} {i}" if kind == "reader" else "{kind} r{i}"
        out.update({label.format(kind=kind, i=i): a for i, a in enumerate(actors) if a is not None})
    return out


def rank_placement(nodes: dict[str, str], ranks: int, readers_per_rank: int | None = None,
                   kinds: tuple[str, ...] = ("trainer", "mixer", "channel"),
                   trainers: dict[int, str] | None = None) -> list[dict]:
    """Per rank, the node of each of its stages, from ``nodes`` (stage name -> node id, as
    :func:`where` gives); ``trainers`` (rank -> node) overrides the trainer's (a user's feed);
    ``readers_per_rank`` (image pipelines; 0 when the mixers read) adds each rank's readers."""
    out = []
    for r in range(ranks):
        row = {"rank": r, **{kind: nodes.get(f"{kind} r{r}") for kind in kinds}}
        if trainers is not None:
            row["trainer"] = trainers.get(r)
        if readers_per_rank is not None:
            k = readers_per_rank
            row["readers"] = [nodes.get(f"reader {i}") for i in range(r * k, (r + 1) * k)]
        out.append(row)
    return out


def wait_started(actors: dict[str, object], timeout_s: float) -> dict[str, str]:
    """Wait until every actor (stage name -> handle) has been placed and constructed; returns
    stage name -> node id. After ``timeout_s`` raise a :class:`~mixflow.errors.PipelineError`
    naming those still waiting (typically for resources no node has free: ``runtime.resources``)."""
    from mixflow.errors import PipelineError

    refs = {actor.placement.remote(): name for name, actor in actors.items()}
    done, waiting = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    # ray.get raises for a stage whose constructor failed
    placed = {refs[ref]: where_run["node_id"] for ref, where_run in zip(done, ray.get(done))}
    if waiting:
        names = ", ".join(refs[r] for r in waiting)
        free = {k: round(v, 2) for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        raise PipelineError(f"not started after {timeout_s:.0f} s: {names}. The cluster has no room for what "
                            f"they ask (runtime.resources; free now: {free}), or they are still starting "
                            "(runtime.start_timeout)")
    return placed


def actor_options(spec, kind: str, device: str, node: str | None, options: dict[str, dict]) -> dict:
    """The ``.options()`` of one actor of ``kind``: its resources (:func:`stage_options`,
    a tenth of a GPU for decoding stages when decode runs on GPU), SPREAD or a soft affinity for the
    rank's ``node``, then the caller's own ``options[kind]`` over all of it."""
    opts = {"scheduling_strategy": "SPREAD"} if kind in ("decoder", "mixer", "trainer") else {}
    opts.update(stage_options(spec, kind))
    if device == "gpu" and kind in ("decoder", "mixer") and "num_gpus" not in opts:
        opts["num_gpus"] = 0.1
    return {**on_node(node, opts), **options.get(kind, {})}


def where(actors: dict[str, object]) -> dict[str, str]:
    """Stage name -> node id of each actor (its ``placement()``); unreachable ones are left out."""
    refs = {name: actor.placement.remote() for name, actor in actors.items()}
    out = {}
    for name, ref in refs.items():
        try:
            out[name] = ray.get(ref, timeout=30)["node_id"]
        except Exception:  # noqa: BLE001 - a dead actor has no place; the summary just lacks it
            pass
    return out


class Placed:
    """Mixed into every pipeline actor: where it runs now (a restart changes the pid, maybe the node)."""

    def placement(self) -> dict:
        import os

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

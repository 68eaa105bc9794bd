"""Pipeline stage lifecycle shared by the image and token pipelines: turn the error a stage's Ray
task ended with into a :class:`PipelineError` naming the stage, wait on the stages, stop them."""

from __future__ import annotations

import ray

from mixflow.errors import DataError, MixflowError, PipelineDataError, PipelineError

PEER_GRACE_S = 1.0  # how long the other stages get to report once one has failed
TEARDOWN_S = 5.0  # how long stopping waits for the ranks to leave their process groups


def _own_death(exc: Exception) -> bool:
    """Whether the stage's own actor process is gone (killed, crashed, out of memory), as opposed
    to the stage raising (possibly because a peer it called died)."""
    return isinstance(exc, ray.exceptions.RayActorError) and not isinstance(exc, ray.exceptions.RayTaskError)


def mixflow_cause(exc: BaseException) -> MixflowError | None:
    """The :class:`MixflowError` a Ray task error wraps (through any depth of Ray errors and
    ``__cause__`` chains: a mixer re-raising its reader's error wraps it twice), else ``None``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ray.exceptions.RayTaskError):
            current = getattr(current, "cause", None) or current.__cause__
            continue
        if isinstance(current, MixflowError):
            return current
        current = current.__cause__
    return None


def stage_error(stage: str, exc: Exception) -> PipelineError:
    """What a stage's failure reads as. A stage that raised a :class:`DataError` (``on_error:
    raise``) gives a :class:`PipelineDataError` whose one line is that error's ``shard ..., key
    ...: reason``; another mixflow error, ``"<stage> failed: <its message>"``. Otherwise
    ``"<stage> died: ..."`` when the stage's own actor is gone, ``"<stage> failed: ..."`` when it
    raised, followed by Ray's text (it names the actor class, its pid and why it ended)."""
    cause = None if _own_death(exc) else mixflow_cause(exc)
    if isinstance(cause, DataError):
        return PipelineDataError(cause.reason, cause.shard, cause.key, cause.offset, stage=stage)
    if cause is not None:
        return PipelineError(f"{stage} failed: {cause}")
    return PipelineError(f"{stage} {'died' if _own_death(exc) else 'failed'}: {exc}")


def first_failure(stages: dict, failed_ref: ray.ObjectRef, exc: Exception) -> PipelineError:
    """The error to stop the pipeline with once ``failed_ref`` (a key of ``stages``, which maps each
    stage's task ref to the stage's name) ended in ``exc``.

    A stage whose actor dies takes its peers down with it (the other ranks' collectives fail
    once a rank is gone; a mixer fails once its reader is gone), and their errors may arrive
    first. So the other stages get ``PEER_GRACE_S`` to end, and a stage whose own actor died is
    reported in preference to the ones that merely failed. The error chains to its cause.
    """
    failures = {failed_ref: exc}
    others = [ref for ref in stages if ref != failed_ref]
    if others:
        ready, _ = ray.wait(others, num_returns=len(others), timeout=PEER_GRACE_S)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as other:  # noqa: BLE001 - only collected, to pick the one to report
                failures[ref] = other
    ref, cause = next(((r, e) for r, e in failures.items() if _own_death(e)), (failed_ref, exc))
    error = stage_error(stages[ref], cause)
    error.__cause__ = cause
    return error


POLL_S = 0.5


def wait_for_stages(stages: dict, until_done: set, channels: list, trainers: list, progress,
                    count_key: str) -> dict:
    """Wait until every ref in ``until_done`` has a result; any stage in ``stages`` (ref -> name)
    that fails stops the wait with :func:`first_failure`. Between waits the progress display gets
    the ranks' ``count_key`` totals, their losses and the channels' queue depths."""
    results: dict = {}
    while until_done - results.keys():
        open_refs = [r for r in stages if r not in results]
        ready, _ = ray.wait(open_refs, num_returns=1, timeout=POLL_S)
        for ref in ready:
            try:
                results[ref] = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - re-raised with the stage named
                raise first_failure(stages, ref, exc)  # chained to its cause
        try:
            stats = ray.get([ch.stats.remote() for ch in channels])
            prog = ray.get([t.progress.remote() for t in trainers])
        except ray.exceptions.RayActorError:
            continue  # an actor died: the ref of the stage it serves fails on the next wait, named
        progress.update(sum(p[count_key] for p in prog), stats, [p["loss"] for p in prog])
    return results


def stop_stages(reason: str | None, channels: list, trainers: list, others: list) -> None:
    """Stop a pipeline's actors: with a ``reason``, fail the channels first (every waiter wakes
    with it); tear the trainers down all at once under one deadline (a rank stuck in a
    collective with a dead peer is killed below); then kill every actor without restart."""
    if reason:
        for ch in channels:
            ch.fail.remote(reason)
    if trainers:
        teardowns = [t.teardown.remote() for t in trainers]
        ray.wait(teardowns, num_returns=len(teardowns), timeout=TEARDOWN_S)
    for actor in trainers + others + channels:
        ray.kill(actor, no_restart=True)

"""Turn the error a pipeline stage's Ray task ended with into a :class:`PipelineError` naming the stage."""

from __future__ import annotations

import ray

from mixflow.errors import PipelineError

PEER_GRACE_S = 1.0  # how long the other stages get to report once one has failed


def _own_death(exc: Exception) -> bool:
    """Whether the stage's own actor process is gone (killed, crashed, out of memory), as opposed
    to the stage raising (possibly because a peer it called died)."""
    return isinstance(exc, ray.exceptions.RayActorError) and not isinstance(exc, ray.exceptions.RayTaskError)


def stage_error(stage: str, exc: Exception) -> PipelineError:
    """``"<stage> died: ..."`` when the stage's own actor is gone, ``"<stage> failed: ..."`` when it
    raised. Ray's text follows: it names the actor class, its pid and why it ended."""
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

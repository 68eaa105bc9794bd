"""Turn the error a pipeline stage's Ray task ended with into a :class:`PipelineError` naming the stage."""

from __future__ import annotations

import ray

from mixflow.errors import PipelineError


def stage_error(stage: str, exc: Exception) -> PipelineError:
    """``"<stage> died: ..."`` when the stage's own actor process is gone (killed, crashed, out of
    memory), ``"<stage> failed: ..."`` when it raised (possibly because a peer it called died).
    Ray's text follows: it names the actor class, its pid and why it ended."""
    own_death = isinstance(exc, ray.exceptions.RayActorError) and not isinstance(exc, ray.exceptions.RayTaskError)
    return PipelineError(f"{stage} {'died' if own_death else 'failed'}: {exc}")

"""Restartable actors find their peers by name, never through a handle in their constructor arguments.

Ray keeps an actor's constructor arguments to run the constructor again when it restarts the
actor (``max_restarts``). An argument held in the object store, and an actor handle counts as
one, can be gone by then: the restart fails (ray-project/ray#53727; Ray warns "has
constructor arguments in the object store and max_restarts > 0"). So the peers of mixflow's
restartable actors (a mixer's channel and readers, a token producer's channel and controller)
are created with a unique name, and the restartable actor gets the :class:`ActorName` (plain
data, carried inline) and looks the peer up in its constructor.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import ray


@dataclass(frozen=True)
class ActorName:
    name: str
    namespace: str


def new_name(kind: str) -> ActorName:
    """A name no other actor of this Ray namespace has, for an actor of ``kind``."""
    return ActorName(f"mixflow-{kind}-{uuid.uuid4().hex[:12]}", ray.get_runtime_context().namespace)


def named(name: ActorName) -> dict:
    """The ``.options()`` that give a new actor ``name``."""
    return {"name": name.name, "namespace": name.namespace}


def resolve(actor):
    """The handle of ``actor``: an :class:`ActorName` is looked up; a handle is returned as it is."""
    return ray.get_actor(actor.name, namespace=actor.namespace) if isinstance(actor, ActorName) else actor

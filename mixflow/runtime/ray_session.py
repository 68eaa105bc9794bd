"""Start or join Ray once per process."""

from __future__ import annotations

import logging
import os

import ray


def ensure_ray(address: str | None = None) -> bool:
    """Join ``address`` (a cluster; ``"auto"``: the one running on this machine) or, when it is
    None, start an embedded local Ray, unless Ray is already initialised. The ``RAY_ADDRESS``
    variable (set by ``ray job submit``) wins over None, as in Ray; but None never joins a cluster
    some other process left running on this machine, which Ray's own ``address=None`` would do
    (it reads the last one recorded under its temp directory). Returns whether this call started
    an embedded local Ray."""
    if ray.is_initialized():
        return False
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=target, include_dashboard=False, logging_level=logging.WARNING,
             configure_logging=True, log_to_driver=True)
    return target == "local"

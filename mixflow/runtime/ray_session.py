"""Start or join Ray once per process."""

from __future__ import annotations

import logging

import ray


def ensure_ray(address: str | None = None) -> None:
    """Join ``address`` (a cluster) or start an embedded local Ray, unless already initialised."""
    if ray.is_initialized():
        return
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
             configure_logging=True, log_to_driver=True)

"""Start or join Ray once per process."""

from __future__ import annotations

import logging
import os

import ray

from mixflow.errors import MixflowError


def _use_machine_token() -> None:
    """Turn token authentication on for this process when ``RAY_AUTH_MODE`` is unset and this
    machine holds a Ray token (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``),
    as Ray itself does for ``address="auto"`` but not for an explicit address. Ray's own helper:
    it also refreshes the configuration Ray's core has already read."""
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def ensure_ray(address: str | None = None, runtime_env: dict | None = None) -> bool:
    """Join ``address`` (a cluster; ``"auto"``: the one running on this machine) or, when it is
    None, start an embedded local Ray, unless Ray is already initialised. The ``RAY_ADDRESS``
    variable (set by ``ray job submit``) wins over None, as in Ray; but None never joins a cluster
    some other process left running on this machine, which Ray's own ``address=None`` would do
    (it reads the last one recorded under its temp directory). Returns whether this call started
    an embedded local Ray. ``runtime_env`` (``runtime.runtime_env``) is the job's Ray runtime
    environment: a ``working_dir`` ships the driver's code to every node.

    A cluster may use token authentication (``ray start`` turns it on when the head's machine
    holds a token or ``RAY_AUTH_MODE=token`` is set), and a process joining one must say so.
    When this machine holds a token and ``RAY_AUTH_MODE`` is unset, joining uses it (a cluster
    without authentication accepts such a client too); a cluster that still refuses is one
    :class:`~mixflow.errors.MixflowError` line saying what to set."""
    if ray.is_initialized():
        return False
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    joining = target != "local"
    if joining:
        _use_machine_token()
    try:
        ray.init(address=target, include_dashboard=False, logging_level=logging.WARNING,
                 configure_logging=True, log_to_driver=True, **({"runtime_env": runtime_env} if runtime_env else {}))
    except ConnectionError as exc:
        if not joining:
            raise
        raise MixflowError(f"cannot join the Ray cluster at {target}: {exc}. If the cluster uses token "
                           "authentication, set RAY_AUTH_MODE=token and give "
                           "this machine the head's token (RAY_AUTH_TOKEN, or the file ~/.ray/auth_token)") from None
    return target == "local"

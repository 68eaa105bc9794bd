"""Config names -> mixture policies, so a pipeline spec can pick one (``mixture.policy``).

Every :class:`~mixflow.mixture.policy.MixturePolicy` subclass in the modules listed
below registers under its ``name``. ``check_policy_params`` validates a spec's
``mixture.params`` against the policy's constructor before anything runs.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from mixflow.mixture.policy import MixturePolicy

_MODULES = ("static", "aioli", "tikmix", "doremi", "doge", "skill_it", "odm", "ado")


def _discover() -> dict[str, type[MixturePolicy]]:
    found: dict[str, type[MixturePolicy]] = {}
    for module_name in _MODULES:
        try:
            module = importlib.import_module(f"mixflow.mixture.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"mixflow.mixture.{module_name}":
                raise
            continue
        for obj in vars(module).values():
            if (inspect.isclass(obj) and issubclass(obj, MixturePolicy) and not inspect.isabstract(obj)
                    and obj.__module__ == module.__name__):
                found[obj.name] = obj
    return found


POLICIES: dict[str, type[MixturePolicy]] = _discover()


def _parameters(cls: type[MixturePolicy]) -> dict[str, inspect.Parameter]:
    params = dict(inspect.signature(cls.__init__).parameters)
    for name in ("self", "num_domains"):
        params.pop(name, None)
    return params


def check_policy_params(name: str, params: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming ``params.<field>`` for unknown or missing keyword arguments."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; allowed: {', '.join(sorted(POLICIES))}")
    accepted = _parameters(POLICIES[name])
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise ValueError(f"params.{unknown[0]}: not a parameter of policy {name!r}; "
                             f"allowed: {', '.join(sorted(accepted))}")
    missing = [k for k, p in accepted.items()
               if p.default is p.empty and p.kind is p.KEYWORD_ONLY and k not in params]
    if missing:
        raise ValueError(f"params.{missing[0]}: required by policy {name!r}")


def build_policy(name: str, num_domains: int, **params: Any) -> MixturePolicy:
    """A policy for ``num_domains`` domains from its config name and keyword arguments."""
    check_policy_params(name, params)
    return POLICIES[name](num_domains, **params)

"""``trainer.entrypoint``: mixflow's rank actors run a training function, yours or a built-in one.

A spec names the function as ``trainer.entrypoint: "package.module:function"`` (or
``"path/to/file.py:function"``); without one, ``trainer.model`` names a built-in loop
(:data:`mixflow.demos.BUILTIN_ENTRYPOINTS`), run the same way. ``mixflow run`` starts the
pipeline's data plane and one rank actor per rank (:class:`~mixflow.runtime.trainer_actor.TrainerRank`
for images, :class:`~mixflow.runtime.token_trainer_actor.TokenTrainerRank` for tokens); each
joins a torch.distributed process group (gloo on CPU, nccl on GPU) and calls
``function(feed, context)`` with its rank's feed and a :class:`RankContext`. The function
trains however it likes and may return a small picklable result.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mixflow.config import PipelineSpec, TokenPipelineSpec
from mixflow.errors import ConfigError


@dataclass
class RankContext:
    """What an entrypoint gets beside its feed: who it is and where its things go. The process
    group (``torch.distributed``) is initialised when ``world_size > 1`` (built-in loops that
    train no DDP model, ``trainer.model: none | unigram``, go without).

    *Run checkpoints.* ``mixflow run --stop-at EPOCH:STEP`` stops every rank's feed at that point
    and saves the pipeline state; an entrypoint that registered a function with
    :meth:`on_checkpoint` has its return value (model and optimizer state, say) saved with it.
    ``mixflow run --resume`` continues the identical stream, and hands that value back to the
    entrypoint as :attr:`resume_state` (``checkpoint`` names the file it came from).
    """

    rank: int
    world_size: int
    device: torch.device
    spec: PipelineSpec | TokenPipelineSpec
    pipeline: str
    run_dir: Path
    checkpoint: str | None = None
    resume_state: Any = None
    held_out_test: list | None = None  # token pipelines: per domain, the test split (results only)
    _checkpoint_fn: Callable[[], Any] | None = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def on_checkpoint(self, fn: Callable[[], Any]) -> None:
        """``fn()`` returns what a run checkpoint saves for this rank (picklable: tensors, dicts)."""
        self._checkpoint_fn = fn

    def checkpoint_state(self) -> Any:
        return self._checkpoint_fn() if self._checkpoint_fn is not None else None


def entrypoint_of(spec: PipelineSpec | TokenPipelineSpec) -> str:
    """The function a spec's ranks run: ``trainer.entrypoint``, else the built-in loop of ``trainer.model``."""
    from mixflow.demos import BUILTIN_ENTRYPOINTS

    return spec.trainer.entrypoint or BUILTIN_ENTRYPOINTS[spec.trainer.model]


def needs_process_group(spec: PipelineSpec | TokenPipelineSpec) -> bool:
    from mixflow.demos import WITHOUT_PROCESS_GROUP

    return spec.trainer.ranks > 1 and (spec.trainer.entrypoint is not None
                                       or spec.trainer.model not in WITHOUT_PROCESS_GROUP)


def load_entrypoint(ref: str) -> Callable[..., Any]:
    """The function ``ref`` names: ``"package.module:function"`` or ``"path/to/file.py:function"``."""
    module_name, _, function = ref.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            spec = importlib.util.spec_from_file_location(path.stem, path)
            if spec is None or not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules.setdefault(path.stem, module)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except (ImportError, FileNotFoundError) as exc:
        raise ConfigError([("trainer.entrypoint", f"cannot import {module_name!r}: {exc}")]) from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise ConfigError([("trainer.entrypoint", f"{module_name!r} has no function {function!r}")])
    return fn


def import_paths(paths: list[str]) -> None:
    """Put the driver's directories first on this process's ``sys.path`` (where ``package.module`` is found)."""
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def join_process_group(spec, rank: int, world_size: int, device: torch.device, master_addr: str,
                       master_port: int) -> None:
    """Join the ranks' process group (``trainer.backend``; auto: nccl on CUDA, else gloo)."""
    backend = getattr(spec.trainer, "backend", "auto")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size))
    dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=300))


def leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

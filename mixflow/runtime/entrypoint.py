"""``trainer.entrypoint``: mixflow's rank actors run *your* training function.

A spec with ``trainer.entrypoint: "package.module:function"`` (or ``"path/to/file.py:function"``)
is run by ``mixflow run`` like this: the pipeline's data plane starts (``mixflow.start``),
one :class:`EntrypointRank` actor per rank joins a torch.distributed process group (gloo on
CPU, nccl on GPU), takes its rank's feed and calls ``function(feed, context)``;
the function trains however it likes and may return a small picklable result. Then the
pipeline closes and its summary (ledger verdict per epoch) is shown, as for the built-in
models.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist

from mixflow.config import PipelineSpec, TokenPipelineSpec
from mixflow.errors import ConfigError
from mixflow.runtime.rank_feed import default_device
from mixflow.runtime.trainer_actor import _free_port


@dataclass
class RankContext:
    """What an entrypoint gets beside its feed: who it is and where its things go. The process
    group (``torch.distributed``) is initialised when ``world_size > 1``."""

    rank: int
    world_size: int
    device: torch.device
    spec: PipelineSpec | TokenPipelineSpec
    pipeline: str
    run_dir: Path

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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


@ray.remote(num_cpus=0)
class EntrypointRank:
    def __init__(self, spec_json: str, pipeline: str, rank: int, world_size: int, sys_path: list[str]):
        import json

        from mixflow.config import validate_spec

        torch.set_num_threads(1)
        for p in reversed(sys_path):  # the driver's directory: where "package.module" is found
            if p not in sys.path:
                sys.path.insert(0, p)
        self.spec = validate_spec(json.loads(spec_json))
        self.pipeline = pipeline
        self.rank, self.world_size = rank, world_size

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), _free_port()

    def run(self, master_addr: str, master_port: int) -> Any:
        from mixflow.runtime.pipeline_handle import connect

        fn = load_entrypoint(self.spec.trainer.entrypoint)
        device = default_device()
        if self.world_size > 1:
            backend = getattr(self.spec.trainer, "backend", "auto")
            if backend == "auto":
                backend = "nccl" if device.type == "cuda" else "gloo"
            os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size))
            dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
                                    world_size=self.world_size, timeout=timedelta(seconds=300))
        feed = connect(self.pipeline).feed(self.rank, self.world_size, device)
        context = RankContext(self.rank, self.world_size, device, self.spec, self.pipeline, self.spec.run_path)
        try:
            return fn(feed, context)
        finally:
            feed.close()

    def teardown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def start_entrypoint_ranks(spec, pipeline: str) -> list:
    """One :class:`EntrypointRank` per rank of ``spec``, spread over the cluster's nodes."""
    spec_json = spec.model_dump_json()
    sys_path = [os.getcwd()]
    return [EntrypointRank.options(scheduling_strategy="SPREAD").remote(spec_json, pipeline, r, spec.trainer.ranks,
                                                                       sys_path)
            for r in range(spec.trainer.ranks)]


POLL_S = 0.5


def run_entrypoint(spec: PipelineSpec | TokenPipelineSpec, name: str | None = None) -> tuple[Any, list]:
    """Start the pipeline, run ``spec.trainer.entrypoint`` on every rank, close the pipeline.
    Returns ``(summary, [each rank's return value])``. A rank that raises or dies stops the run
    with a :class:`~mixflow.errors.PipelineError` naming it (or the pipeline's own failure,
    when a stage of the data plane caused it)."""
    from mixflow.errors import MixflowError
    from mixflow.runtime.pipeline_handle import start
    from mixflow.runtime.stage_failure import first_failure, stop_stages

    pipe = start(spec, name)
    ranks = start_entrypoint_ranks(pipe.spec, pipe.name)
    try:
        master = ray.get(ranks[0].address.remote())
        stages = {r.run.remote(*master): f"trainer r{i}" for i, r in enumerate(ranks)}
        results: dict = {}
        while len(results) < len(stages):
            ready, _ = ray.wait([r for r in stages if r not in results], num_returns=1, timeout=POLL_S)
            for ref in ready:
                try:
                    results[ref] = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - re-raised, named
                    failure = ray.get(pipe._host.failure.remote())
                    if failure:
                        from mixflow import errors

                        raise getattr(errors, failure[0], errors.PipelineError)(failure[1]) from None
                    raise first_failure(stages, ref, exc) from None
    except BaseException:
        stop_stages("pipeline stopping", [], ranks, [])
        try:
            pipe.close()
        except MixflowError:
            pass
        raise
    stop_stages(None, [], ranks, [])
    return pipe.close(), [results[ref] for ref in stages]

"""Live progress while a pipeline runs: samples/s, queue depths, loss (rich)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class PipelineProgress:
    def __init__(self, total: int, enabled: bool = True, console: Console | None = None, unit: str = "samples"):
        self.enabled = enabled
        self.unit = unit
        self._start = time.perf_counter()
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TextColumn("{task.fields[info]}", markup=False),
                                  console=console, disable=not enabled, transient=False)
        self._task = self._progress.add_task(escape(unit), total=total, info="")

    def __enter__(self) -> "PipelineProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def update(self, samples: int, channels: list[dict], losses: list[float | None]) -> None:
        rate = samples / max(1e-9, time.perf_counter() - self._start)
        queues = " ".join(f"r{i}:{c['items']}/{c['max_items']}" for i, c in enumerate(channels))
        known = [v for v in losses if v is not None]
        loss = f" | loss {sum(known) / len(known):.3f}" if known else ""
        self._progress.update(self._task, completed=samples, info=f"{rate:.0f} {self.unit}/s | queues {queues}{loss}")

"""The feeds mixflow's own rank actors hand to an entrypoint under ``mixflow run``.

They are the public feeds (:class:`~mixflow.runtime.rank_feed.ImageFeed`,
:class:`~mixflow.runtime.rank_feed.TokenFeed`), the same iteration, the same batches, with
what the run's driver needs on top:

- the rank's channel comes from the pipeline that started the rank (no host, no claim);
- each finished epoch's account (keys, quarantine records, timings) is kept for the driver,
  which checks the ledger;
- a *stop point* (``mixflow run --stop-at``; a token run's ``stop_after``): the feed ends the
  stream there, and ``epoch()`` yields nothing more, so the entrypoint's loop runs out;
- ``trainer.throttle`` (a slow rank, for soak tests) and per-batch digests (tests compare runs).

A state can't be loaded into them: the run resumes as a whole (``mixflow run --resume``).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator

from mixflow import errors
from mixflow.runtime.rank_feed import ImageFeed, TokenFeed


def batch_digest(batch) -> tuple:
    """(step, keys, crc32 of the pixels, crc32 of the soft targets): compares two runs exactly."""
    return (batch.step, tuple(batch.keys), zlib.crc32(batch.x.cpu().numpy().tobytes()),
            zlib.crc32(batch.targets.cpu().numpy().tobytes()))


def _refuse_load(feed) -> None:
    raise errors.FeedStateError(f"{feed._name()}: under `mixflow run` the run resumes as a whole "
                                "(mixflow run --resume STATE); register your model's state with "
                                "context.on_checkpoint to have it saved and handed back")


class RunImageFeed(ImageFeed):
    def __init__(self, spec, stream: dict, rank: int, world_size: int, channel, holder, device,
                 start: dict, stop_at: tuple[int, int] | None = None, record_digests: bool = False,
                 throttle_s: float = 0.0):
        info = {"name": spec.name, "epochs": spec.trainer.epochs, "spec_json": spec.model_dump_json(),
                "stream": stream}
        super().__init__(None, info, rank, world_size, device)
        self._position, self._skipped = dict(start["position"]), list(start.get("skipped", []))
        self._channel = {"channel": channel, "holder": holder}
        self.stop_at = stop_at
        self.stopped = False
        self.record_digests = record_digests
        self.throttle_s = throttle_s
        self.results: list[dict] = []  # per finished (or stopped) epoch
        self._digests: list = []
        self._total = {"samples": 0, "steps": 0, "wait_s": 0.0}

    def _begin(self, start: dict) -> dict:
        self._begun = self._channel
        return self._begun

    def _stop_reached(self) -> bool:
        if self.stop_at is None:
            return False
        epoch = self.current_epoch
        step = 0 if self._position.get("done") else self._position["step"]
        return epoch > self.stop_at[0] or (epoch == self.stop_at[0] and step >= self.stop_at[1])

    def epoch(self, epoch: int) -> Iterator:
        if self.stopped:  # the run's stop point was reached: the loop runs out
            return iter(())
        return super().epoch(epoch)

    def _iterate(self, epoch: int) -> Iterator:
        if self._stop_reached():
            self._stop(epoch)
            return
        inner = super()._iterate(epoch)
        try:
            for batch in inner:
                if self.record_digests:
                    self._digests.append(batch_digest(batch))
                self._total["samples"] += len(batch.keys)
                self._total["steps"] += 1
                yield batch
                if self.throttle_s:
                    time.sleep(self.throttle_s)
                if self._stop_reached():
                    inner.close()  # its accounts of waits and timings close
                    self._stop(epoch)
                    return
        finally:
            inner.close()

    def _stop(self, epoch: int) -> None:
        self.stopped = True
        if epoch == self.stop_at[0]:
            self._epoch_finished(epoch, self._epoch_result(), stopped=True)

    def _epoch_finished(self, epoch: int, result: dict, stopped: bool = False) -> None:
        self._total["wait_s"] += result["wait_s"]
        self.results.append({**result, "rank": self.rank, "epoch": epoch, "stopped": stopped,
                             "digests": self._digests})
        self._digests = []

    def progress(self) -> dict:
        """Samples and steps consumed in this run, the last loss reported, time spent waiting."""
        return {**self._total, "loss": self._last_loss}

    def load_state_dict(self, state: dict) -> None:
        _refuse_load(self)


class RunTokenFeed(TokenFeed):
    def __init__(self, spec, stream: dict, rank: int, world_size: int, channel, controller, device,
                 val: list, vocab_size: int, pad_id: int | None, grad_stats_every: int,
                 start: dict | None = None, stop_after: int | None = None, throttle_s: float = 0.0):
        info = {"name": spec.name, "epochs": 1, "stream": stream, "vocab_size": vocab_size, "pad_id": pad_id,
                "grad_stats_every": grad_stats_every}
        super().__init__(None, info, rank, world_size, device)
        if start is not None:
            self._start = dict(start)
        self._channel = {"channel": channel, "controller": controller, "val": val}
        self.stop_after = stop_after
        self.throttle_s = throttle_s
        self.result: dict | None = None
        self._last_loss: float | None = None

    def _begin(self, start: dict) -> dict:
        self._begun = self._channel
        return self._begun

    def _iterate(self) -> Iterator:
        inner = super()._iterate()
        try:
            for batch in inner:
                yield batch
                if self.throttle_s:
                    time.sleep(self.throttle_s)
                if self.stop_after is not None and batch.step + 1 >= self.stop_after:
                    inner.close()
                    self._done = True
                    self._flush()  # every report of a consumed step has reached the controller
                    self._epoch_finished(0, self._epoch_result())
                    return
        finally:
            inner.close()

    def _epoch_finished(self, epoch: int, result: dict) -> None:
        self.result = {**result, "rank": self.rank}

    def report(self, step: int, per_domain_loss=None, **kwargs) -> None:
        super().report(step, per_domain_loss, **kwargs)
        import numpy as np

        values = np.asarray(per_domain_loss.detach().cpu() if hasattr(per_domain_loss, "detach")
                            else per_domain_loss, dtype=np.float64)
        if np.isfinite(values).any():
            self._last_loss = float(np.nanmean(values))

    def progress(self) -> dict:
        b = self._batches
        return {"steps": self._stats["steps"], "tokens": b.tokens if b is not None else 0, "loss": self._last_loss}

    def load_state_dict(self, state: dict) -> None:
        _refuse_load(self)

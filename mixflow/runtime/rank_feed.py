"""One rank's feed of a running pipeline, in the user's own training loop.

``pipe.feed(rank, world_size)`` (or ``mixflow.connect(name).feed()``) claims the rank and
returns an :class:`ImageFeed` or a :class:`TokenFeed`. ``feed.epoch(e)`` iterates the
rank's batches of epoch ``e``; epochs run in order, each to its end (an epoch left early
is continued by calling ``epoch(e)`` again). ``state_dict()`` is the rank's place in the
stream, small enough for the user's own checkpoint; a feed that ``load_state_dict``\\ s it
continues the identical stream: same keys, same pixels or tokens, same mixture versions.

The feed is the rank's only consumer (:class:`~mixflow.runtime.pipeline_host.PipelineHost`
keeps the claim); errors come as :mod:`mixflow.errors` classes naming the pipeline, the
rank and what to do. A stage that fails ends the iteration with a
:class:`~mixflow.errors.PipelineError` that names the stage, never a hang.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
import weakref
from dataclasses import asdict
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray
import torch

from mixflow import errors
from mixflow.data.bad_samples import SkipRecord
from mixflow.runtime import image_checkpoint as ckpt
from mixflow.runtime.channel import ChannelReader
from mixflow.runtime.mixer_actor import start_position
from mixflow.train.feed import Feed, TorchBatch
from mixflow.train.token_feed import TokenBatch
from mixflow.train.token_feed import TokenFeed as TokenBatches

FORMAT = "mixflow.feed/1"
CHECKPOINT_TIMEOUT_S = 300.0


def raise_refusal(answer: Any) -> Any:
    """Raise the :mod:`mixflow.errors` class a host call refused with; else return the answer."""
    if isinstance(answer, dict) and "error" in answer:
        kind, message = answer["error"]
        raise getattr(errors, kind, errors.PipelineError)(message)
    return answer


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is there (as torchrun and Ray Train set it), else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def _plain_records(records: list) -> list[dict]:
    """Quarantine records as plain dicts (what a feed state and the pipeline's accounts hold)."""
    return [asdict(r) if isinstance(r, SkipRecord) else dict(r) for r in records]


def _release_quietly(host, rank: int, feed_id: str) -> None:
    try:
        if ray.is_initialized():
            host.release.remote(rank, feed_id)
    except Exception:  # noqa: BLE001 - at interpreter exit Ray may be gone; the lease lapses anyway
        pass


class RankFeed:
    """What both feeds share: the claim, the order of epochs, failures turned into named errors."""

    kind = ""

    def __init__(self, host, info: dict, rank: int, world_size: int, device: str | torch.device | None = None):
        self.host = host
        self.pipeline = info["name"]
        self.info = info
        self.rank = rank
        self.world_size = world_size
        self.epochs = info["epochs"]
        self.device = torch.device(device) if device is not None else default_device()
        self._id = uuid.uuid4().hex
        self._begun: dict | None = None  # the channel (and holder/controller) once begun
        self._closed = False
        self._release = None
        if host is None:  # a feed of mixflow's own rank actors: the pipeline hands it its channel
            return
        self._lease = [ray.put(self._id)]  # freed by Ray when this process ends: the claim lapses
        where = f"pid {os.getpid()} on {socket.gethostname()}"
        raise_refusal(ray.get(host.claim.remote(rank, world_size, self._id, self._lease, where)))
        # A feed dropped without close() (a notebook cell run again) lets its rank go as well.
        self._release = weakref.finalize(self, _release_quietly, host, rank, self._id)

    def _name(self) -> str:
        return f"rank {self.rank} of pipeline {self.pipeline!r}"

    def _check_epoch(self, epoch: int, current: int, in_progress: bool) -> None:
        if self._closed:
            raise errors.FeedError(f"{self._name()}: this feed was closed")
        if current >= self.epochs:
            raise errors.EpochOrderError(f"{self._name()}: epoch({epoch!r}) asked, but this feed has consumed all "
                                         f"{self.epochs} epoch(s) of the pipeline")
        if not (isinstance(epoch, int) and 0 <= epoch < self.epochs):
            raise errors.EpochOrderError(f"{self._name()}: epoch({epoch!r}) is outside the pipeline's epochs "
                                         f"0..{self.epochs - 1}")
        if epoch != current:
            now = "is in" if in_progress else "is at the start of"
            raise errors.EpochOrderError(
                f"{self._name()}: epoch({epoch}) out of order; this feed {now} epoch {current}: epochs run in "
                f"order, each to its end (call epoch({current}); load_state_dict() to go elsewhere)")

    def _failed(self, exc: Exception) -> Exception:
        """The named error a failed channel or host call stands for."""
        if self.host is None:
            return errors.PipelineError(f"{self._name()}: its channel failed: {exc}")
        try:
            failure = ray.get(self.host.failure.remote(), timeout=10)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return errors.PipelineError(f"pipeline {self.pipeline!r} is gone (stopped, or the process that "
                                        f"started it ended) while {self._name()} was reading: {exc}")
        if failure:
            return getattr(errors, failure[0], errors.PipelineError)(failure[1])
        return errors.PipelineError(f"{self._name()}: its channel failed: {exc}")

    def _named_failures(self, batches) -> Iterator:
        """``batches``, with a failed channel (a stage died, the pipeline stopped) raised as the
        named error it stands for."""
        iterator = iter(batches)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as exc:
                raise self._failed(exc) from None
            yield batch

    def _call(self, method: str, *args) -> Any:
        try:
            return raise_refusal(ray.get(getattr(self.host, method).remote(self.rank, self._id, *args)))
        except ray.exceptions.RayActorError as exc:
            raise self._failed(exc) from None

    def _begin(self, start: dict) -> dict:
        self._begun = self._call("begin", start)
        return self._begun

    def close(self) -> None:
        """Give the rank up (another feed may take it); the pipeline goes on."""
        if not self._closed:
            self._closed = True
            if self._release is None:
                return
            self._release.detach()
            try:
                ray.get(self.host.release.remote(self.rank, self._id), timeout=10)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass

    def _check_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("kind") != self.kind:
            raise errors.FeedStateError(f"{self._name()}: not a {self.kind} feed state (from feed.state_dict())")
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise errors.FeedStateError(
                f"{self._name()}: the state was saved by rank {state['rank']} of {state['world_size']}; load each "
                f"rank's own state (this feed is rank {self.rank} of {self.world_size})")
        diffs = ckpt.differences(state["stream"], self.info["stream"])
        if diffs:
            raise errors.FeedStateError(f"{self._name()}: the state was saved from a different stream; differing "
                                        "fields: " + "; ".join(diffs))


class ImageFeed(RankFeed):
    """An image pipeline's rank: :meth:`epoch` yields :class:`~mixflow.train.feed.TorchBatch`
    (``x`` float ``[B, C, H, W]`` normalised on ``device``, ``targets [B, classes]`` summing to 1,
    ``y_a``, ``y_b``, ``lam``, ``keys``). ``to_float=False``: ``x`` as delivered, uint8
    ``[B, H, W, C]`` (normalise it on your GPU); on CPU it may be a view of a shared-memory slot,
    valid until the next batch (clone it to keep it)."""

    kind = "image"

    def __init__(self, host, info: dict, rank: int, world_size: int, device=None, to_float: bool = True):
        super().__init__(host, info, rank, world_size, device)
        from mixflow.config import validate_spec
        import json

        self.spec = validate_spec(json.loads(info["spec_json"]))
        self._slots = self.spec.runtime.readers_per_rank
        self._position = start_position(0, self._slots)
        self._skipped: list[dict] = []  # quarantine records of the position's epoch consumed so far
        self._new_skips: list[dict] = []  # those consumed by this feed (not loaded with a state)
        self._new_suspects: list[dict] = []  # records of suspect samples this feed delivered in the epoch
        self._reader: ChannelReader | None = None
        self._keys: list[str] = []  # keys of the epoch in progress delivered by this feed
        self._stats = self._fresh_stats()
        self._last_loss: float | None = None
        self.to_float = to_float

    @staticmethod
    def _fresh_stats() -> dict:
        return {"samples": 0, "steps": 0, "wait_s": 0.0, "wall_s": 0.0, "shared_memory_steps": 0,
                "loss_sum": 0.0, "losses": 0}

    @property
    def current_epoch(self) -> int:
        return self._position["epoch"] + bool(self._position.get("done"))

    def epoch(self, epoch: int) -> Iterator[TorchBatch]:
        """The rank's batches of ``epoch``: from the feed's position to the epoch's end."""
        in_progress = self._position["step"] > 0 and not self._position.get("done")
        self._check_epoch(epoch, self.current_epoch, in_progress)
        return self._iterate(epoch)

    def _iterate(self, epoch: int) -> Iterator[TorchBatch]:
        if self._position.get("done"):  # the epoch before finished: this one starts
            self._position, self._skipped = start_position(epoch, self._slots), []
        if self._reader is None:
            begun = self._begin({"position": self._position, "skipped": self._skipped,
                                 "node": ray.get_runtime_context().get_node_id()})
            self._reader = ChannelReader(begun["channel"], begun["holder"])
        d = self.spec.decode
        feed = Feed(self._reader, self.device, d.mean, d.std, self.to_float)
        ring_before = self._reader.ring_batches
        start = time.perf_counter()
        try:
            for batch in self._named_failures(feed):
                consumed = self._reader.last
                self._position = consumed["position"]
                records = _plain_records(consumed["skipped"])
                self._skipped += records
                self._new_skips += records
                self._new_suspects += _plain_records(consumed.get("suspect", []))
                self._keys += batch.keys
                self._stats["samples"] += len(batch.keys)
                self._stats["steps"] += 1
                yield batch
            records = _plain_records(self._reader.end_info["skipped"])
            self._skipped += records
            self._new_skips += records
            self._position = {**self._position, "epoch": epoch, "done": True}
        finally:
            s = self._stats
            s["wait_s"] += feed.wait_s
            s["wall_s"] += time.perf_counter() - start
            s["shared_memory_steps"] += self._reader.ring_batches - ring_before
        self._epoch_finished(epoch, self._epoch_result())

    def _epoch_result(self) -> dict:
        """What this feed delivered of the epoch in progress (keys, the quarantine records that came
        with them, the suspect samples' records, counts and timings); the next epoch starts a new account."""
        s = self._stats
        mean_loss = s["loss_sum"] / s["losses"] if s["losses"] else None
        result = {"keys": self._keys, "skipped": self._new_skips, "suspect": self._new_suspects, "mean_loss": mean_loss,
                  **{k: s[k] for k in ("samples", "steps", "wait_s", "wall_s", "shared_memory_steps")}}
        self._keys, self._new_skips, self._new_suspects, self._stats = [], [], [], self._fresh_stats()
        return result

    def _epoch_finished(self, epoch: int, result: dict) -> None:
        self._call("epoch_done", epoch, result)

    def report(self, step: int, loss: float | torch.Tensor | None = None, **_unused) -> None:
        """Record the step's training loss (the run summary shows its mean per epoch)."""
        if loss is not None:
            self._last_loss = float(loss)
            self._stats["loss_sum"] += self._last_loss
            self._stats["losses"] += 1

    def state_dict(self) -> dict:
        """Where this rank's stream stands: after the last batch it consumed."""
        return {"format": FORMAT, "kind": self.kind, "pipeline": self.pipeline, "stream": self.info["stream"],
                "rank": self.rank, "world_size": self.world_size, "position": dict(self._position),
                "skipped": list(self._skipped)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (this rank's, from :meth:`state_dict`): the next batch is the one
        after the last batch consumed when it was saved."""
        self._check_state(state)
        try:  # a position the epoch's plan cannot have produced: refused, the field named
            ckpt.validate_feed_position(state.get("position"), self.info["stream"], self.rank, self.world_size,
                                        self._slots)
            ckpt.validate_records(state.get("skipped"), "skipped", prefix="load_state_dict")
        except ValueError as exc:
            raise errors.FeedStateError(f"{self._name()}: {exc}") from None
        position = dict(state["position"])
        if not position.get("done") and position["epoch"] >= self.epochs:
            raise errors.FeedStateError(f"{self._name()}: the state is at epoch {position['epoch']}, past the "
                                        f"pipeline's {self.epochs} epochs")
        self._position, self._skipped, self._new_skips, self._new_suspects = position, list(state["skipped"]), [], []
        if position.get("done"):
            self._position, self._skipped = start_position(position["epoch"] + 1, self._slots), []
        self._reader = None  # the next epoch() begins the rank's stream at this position
        self._keys, self._stats = [], self._fresh_stats()


class TokenFeed(RankFeed):
    """A token pipeline's rank: one epoch of ``trainer.steps`` global steps. :meth:`epoch` yields
    :class:`~mixflow.train.token_feed.TokenBatch` (``tokens [B, T+1]``, ``domains``, ``keys``, ``step``,
    ``version``); after each step call :meth:`report` with the per-domain losses, and after a
    batch with ``eval_after`` :meth:`report_eval` with the held-out losses (:attr:`held_out`)."""

    kind = "tokens"

    def __init__(self, host, info: dict, rank: int, world_size: int, device=None):
        super().__init__(host, info, rank, world_size, device)
        self._start: dict = {"step": None, "producer": None, "controller": None}
        self._batches: TokenBatches | None = None
        self._meta: dict[int, TokenBatch] = {}  # step -> its batch (version, counts) until reported
        self._reports: list = []
        self._done = False
        self._stats = {"steps": 0, "wait_s": 0.0}

    @property
    def vocab_size(self) -> int:
        """Token ids run ``0 .. vocab_size - 1`` (the shards' tokenizer)."""
        return self.info["vocab_size"]

    @property
    def pad_id(self) -> int | None:
        """The id that pads the tail of a domain's last sequence (leave it out of the loss)."""
        return self.info["pad_id"]

    @property
    def grad_stats_every(self) -> int:
        """How often the pipeline's mixture policy wants gradient statistics: pass
        ``grad_dot_val`` to :meth:`report` every that many steps (0: the policy uses none)."""
        return self.info.get("grad_stats_every", 0)

    @property
    def held_out(self) -> list[np.ndarray]:
        """Per domain, this rank's validation sequences ``[n, T+1]`` (what ``report_eval`` measures)."""
        return self._ensure_begun()["val"]

    def _ensure_begun(self) -> dict:
        if self._batches is None:
            begun = self._begin(self._start)
            self._batches = TokenBatches(ChannelReader(begun["channel"]), self._send, self.device)
            self._batches.last_step = self._start["step"]
            self._batches.producer_state = self._start["producer"]
        return self._begun

    def epoch(self, epoch: int = 0) -> Iterator[TokenBatch]:
        """The rank's batches from its position to the last step (token pipelines have epoch 0 only)."""
        self._check_epoch(epoch, 1 if self._done else 0, self._start["step"] is not None)
        return self._iterate()

    def _iterate(self) -> Iterator[TokenBatch]:
        self._ensure_begun()
        for batch in self._named_failures(self._batches):
            self._meta[batch.step] = batch
            self._stats["steps"] += 0 if batch.empty else 1
            yield batch
        self._done = True
        self._flush()
        self._epoch_finished(0, self._epoch_result())

    def _epoch_result(self) -> dict:
        b = self._batches
        return {"keys": b.keys, "tokens": b.tokens, "steps": self._stats["steps"], "wait_s": b.wait_s,
                "skipped": b.skipped, "batches": b.log}

    def _epoch_finished(self, epoch: int, result: dict) -> None:
        self._call("epoch_done", epoch, result)

    def _send(self, kind: str, message: dict) -> None:
        controller = self._begun["controller"]
        self._reports.append(controller.report.remote(self.rank, kind, message))
        if len(self._reports) > 64:
            _, self._reports = ray.wait(self._reports, num_returns=len(self._reports), timeout=0)

    def _flush(self) -> None:
        try:
            ray.get(self._reports)
        except ray.exceptions.RayActorError as exc:
            raise self._failed(exc) from None
        self._reports = []

    def report(self, step: int, per_domain_loss: Any = None, loss: Any = None, tokens: Any = None,
               grad_dot_val: Any = None, ref_loss: Any = None) -> None:
        """The step's training loss per domain (NaN for domains absent from the batch): what the
        mixture policy learns from. ``tokens`` defaults to the batch's tokens per domain."""
        batch = self._meta.pop(step, None)
        if batch is None:
            raise errors.FeedError(f"{self._name()}: report(step={step}) names no batch this feed delivered "
                                   "and has not reported yet")
        if per_domain_loss is None:
            raise errors.FeedError(f"{self._name()}: report(step={step}) needs per_domain_loss (one value per "
                                   "domain) in a token pipeline: the mixture policy learns from it")
        seq_tokens = batch.tokens.shape[1] - 1
        self._batches.report(step, per_domain_loss, tokens if tokens is not None else batch.counts * seq_tokens,
                             batch.version, batch.counts, grad_dot_val=grad_dot_val, ref_loss=ref_loss)

    def report_eval(self, step: int, per_domain_loss: Any) -> None:
        """Held-out loss per domain after the batch of ``step`` (one that carried ``eval_after``)."""
        version = self._batches.log[-1]["version"] if self._batches and self._batches.log else 0
        for entry in reversed(self._batches.log if self._batches else []):
            if entry["step"] == step:
                version = entry["version"]
                break
        self._batches.report_eval(step, per_domain_loss, version)

    def state_dict(self) -> dict:
        """Where this rank's stream stands, with the mixture controller's state at that step.
        A collective: every rank calls it after the same step (as with torch.distributed
        checkpoints); it waits for the others (``FeedError`` after 5 minutes)."""
        b = self._batches
        step = b.last_step if b is not None else self._start["step"]
        controller = self._start["controller"]
        if b is not None and step is not None and step != self._start["step"]:
            self._flush()
            controller = ray.get(self._begun["controller"].checkpoint.remote(self.rank, step, CHECKPOINT_TIMEOUT_S))
            if controller is None:
                raise errors.FeedError(f"{self._name()}: state_dict() at step {step} waited "
                                       f"{CHECKPOINT_TIMEOUT_S:.0f} s for the other ranks; every rank calls it "
                                       "after the same step")
        return {"format": FORMAT, "kind": self.kind, "pipeline": self.pipeline, "stream": self.info["stream"],
                "rank": self.rank, "world_size": self.world_size, "step": step,
                "producer": b.producer_state if b is not None else self._start["producer"],
                "controller": controller}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (this rank's; every rank loads the state of the same step)."""
        self._check_state(state)
        self._start = {"step": state["step"], "producer": state["producer"], "controller": state["controller"]}
        self._batches, self._meta, self._done = None, {}, False

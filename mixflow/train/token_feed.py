"""The trainer side of a token pipeline: batches in, feedback out.

A rank iterates :class:`TokenFeed`; every :class:`TokenBatch` says which mixture version
built it and how many sequences of each domain it holds. After its step the rank calls
``feed.report(step, per_domain_loss, tokens, version)``; when a batch carries
``eval_after`` the rank evaluates every domain and calls ``feed.report_eval``. Reports
go to the mixture controller through the ``send(kind, message)`` callable the runtime
gives the feed (so this module needs no Ray).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mixflow.train.feed import BatchSource, ReceivingFeed

Send = Callable[[str, dict[str, Any]], None]


@dataclass
class TokenBatch:
    """``tokens [B, T+1]`` (inputs are ``[:, :-1]``, targets ``[:, 1:]``), ``domains [B]``."""

    tokens: torch.Tensor
    domains: torch.Tensor
    keys: list[str]
    step: int
    version: int
    counts: np.ndarray
    eval_after: bool

    @property
    def empty(self) -> bool:
        """No sequences: a step that only asks for an evaluation (``eval_after``)."""
        return self.tokens.shape[0] == 0

    def per_domain(self, values: torch.Tensor) -> torch.Tensor:
        """Mean of per-sequence ``values [B]`` per domain (NaN for domains absent from the batch):
        what ``feed.report(step, per_domain_loss=...)`` takes."""
        from mixflow.train.lm_losses import per_domain_mean

        return per_domain_mean(values.detach().to(self.domains.device), self.domains, len(self.counts))


def _array(values: Any) -> list[float] | None:
    if values is None:
        return None
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64).tolist()


class TokenFeed(ReceivingFeed):
    def __init__(self, source: BatchSource, send: Send, device: str | torch.device = "cpu"):
        super().__init__(source)
        self.send = send
        self.device = torch.device(device)
        self.tokens = 0
        self.log: list[dict[str, Any]] = []  # per batch: step, version, counts, p, keys, tokens crc32
        self.last_step: int | None = None
        self.skipped: list[dict[str, Any]] = []  # quarantine records that came with the batches
        self.producer_state: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[TokenBatch]:
        for batch in self._received():
            tokens = torch.from_numpy(np.asarray(batch["tokens"], dtype=np.int64)).to(self.device)
            self.tokens += int(tokens.shape[0] * max(tokens.shape[1] - 1, 0))
            domains = torch.from_numpy(np.array(batch["domains"], dtype=np.int64)).to(self.device)
            self.log.append({"step": int(batch["step"]), "version": int(batch["version"]),
                             "counts": np.asarray(batch["counts"]).tolist(), "p": list(batch["p"]),
                             "keys": list(batch["keys"]), "crc": zlib.crc32(np.ascontiguousarray(batch["tokens"]).tobytes())})
            self.last_step = int(batch["step"])
            self.skipped.extend(batch.get("skipped", []))
            self.producer_state = batch.get("state")
            yield TokenBatch(tokens, domains,
                             list(batch["keys"]), int(batch["step"]), int(batch["version"]),
                             np.asarray(batch["counts"]), bool(batch["eval_after"]))

    def state_dict(self) -> dict[str, Any]:
        """Where this rank's stream resumes: the last consumed step and the producer state after it."""
        return {"step": self.last_step, "producer": self.producer_state}

    def report(self, step: int, per_domain_loss: Any, tokens: Any, version: int, counts: Any = None,
               grad_dot_val: Any = None, ref_loss: Any = None) -> None:
        """Training feedback of one step (NaN loss for domains absent from this rank's batch)."""
        self.send("train", {"version": int(version), "step": int(step), "train_loss": _array(per_domain_loss),
                            "tokens": _array(tokens), "counts": _array(counts),
                            "grad_dot_val": _array(grad_dot_val), "ref_loss": _array(ref_loss)})

    def report_eval(self, step: int, per_domain_loss: Any, version: int) -> None:
        """Held-out loss per domain, measured after the last step of ``version``."""
        self.send("eval", {"version": int(version), "step": int(step), "eval_loss": _array(per_domain_loss)})

"""Language-model trainer rank: trains the byte GPT on its token feed and reports per-domain losses.

Every step: per-sequence loss, averaged per domain (the rank's training feedback,
tagged with the batch's mixture version); the mean over the batch is backpropagated
through DDP. A batch marked ``eval_after`` is followed by an evaluation of the
validation sequences of every domain, reported as eval feedback for that version (what
Aioli's LearnParams and Skill-It consume). Every ``eval_every`` steps and at the end the
rank 0 also measures the *test* split (never shown to a policy) for the run's results.
Each rank evaluates its own slice of the validation sequences; the controller averages
the ranks' eval reports.
"""

from __future__ import annotations

import math
import time
from datetime import timedelta

import numpy as np
import ray
import torch
import torch.distributed as dist

from mixflow.runtime.channel import ChannelReader
from mixflow.runtime.trainer_actor import _free_port
from mixflow.train.byte_gpt import ByteGPT, ByteGPTConfig, per_domain_mean, per_sequence_loss
from mixflow.train.token_feed import TokenFeed
from mixflow.train.unigram_lm import UnigramLM


@torch.no_grad()
def domain_losses(model: torch.nn.Module | UnigramLM, sets: list[np.ndarray], pad_id: int | None = None,
                  batch: int = 32) -> list[float]:
    """Mean next-token loss of each domain's held-out sequences."""
    if isinstance(model, torch.nn.Module):
        model.eval()
    out = []
    for seqs in sets:
        total, n = 0.0, 0
        for i in range(0, len(seqs), batch):
            chunk = torch.from_numpy(np.asarray(seqs[i:i + batch], dtype=np.int64))
            losses = (model.per_sequence_loss(chunk) if isinstance(model, UnigramLM)
                      else per_sequence_loss(model, chunk, pad_id))
            total += losses.sum().item()
            n += len(chunk)
        out.append(total / n if n else math.nan)
    if isinstance(model, torch.nn.Module):
        model.train()
    return out


@ray.remote(num_cpus=0, max_concurrency=2)
class LMTrainerRank:
    def __init__(self, rank: int, world_size: int, channel, controller, model_cfg: dict, lr: float,
                 num_domains: int, val_sets: list, test_sets: list, seed: int, eval_every: int = 0,
                 throttle_s: float = 0.0, pad_id: int | None = None, model_name: str = "byte_gpt",
                 grad_stats_every: int = 0):
        torch.set_num_threads(1)
        self.rank, self.world_size = rank, world_size
        self.controller = controller
        self.reader = ChannelReader(channel)
        self.cfg = ByteGPTConfig(**model_cfg)
        self.lr = lr
        self.m = num_domains
        self.val_sets, self.test_sets = val_sets, test_sets
        self.seed = seed
        self.eval_every = eval_every
        self.throttle_s = throttle_s
        self.pad_id = pad_id
        self.model_name = model_name
        self.grad_stats_every = grad_stats_every if model_name == "byte_gpt" else 0
        self.model = None
        self.feed: TokenFeed | None = None
        self._reports: list = []
        self._progress = {"steps": 0, "tokens": 0, "loss": None}

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, master_addr: str, master_port: int) -> None:
        if self.model_name == "unigram":
            self.model = self.raw_model = UnigramLM(self.cfg.vocab_size, self.pad_id)
            return
        torch.manual_seed(self.seed)  # identical initial weights on every rank
        model = ByteGPT(self.cfg)
        self.raw_model = model
        if self.world_size > 1:
            dist.init_process_group("gloo", init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
                                    world_size=self.world_size, timeout=timedelta(seconds=300))
            model = torch.nn.parallel.DistributedDataParallel(model)
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=0.01)

    def _send(self, kind: str, message: dict) -> None:
        self._reports.append(self.controller.report.remote(self.rank, kind, message))
        if len(self._reports) > 64:  # keep the list short; completed reports need no tracking
            done, self._reports = ray.wait(self._reports, num_returns=len(self._reports), timeout=0)

    def checkpoint(self) -> dict:
        """Model, optimizer and stream position together: what a resumed rank needs (one call)."""
        if isinstance(self.model, UnigramLM):
            model = {"counts": self.model.counts.clone()}
            optim = None
        else:
            model = {k: v.clone() for k, v in self.raw_model.state_dict().items()}
            optim = self.optimizer.state_dict()
        return {"rank": self.rank, "feed": self.feed.state_dict() if self.feed else None,
                "model": model, "optimizer": optim}

    def restore(self, checkpoint: dict) -> None:
        if isinstance(self.model, UnigramLM):
            self.model.counts = checkpoint["model"]["counts"].clone()
            return
        self.raw_model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])

    def run(self, stop_after: int | None = None) -> dict:
        """Train on the feed to its end, or until global step ``stop_after - 1`` was consumed."""
        feed = self.feed = TokenFeed(self.reader, self._send)
        start = time.perf_counter()
        curve: list[dict] = []
        steps, loss_sum = 0, 0.0
        for batch in feed:
            if not batch.empty:
                grads = None
                if self.grad_stats_every and batch.step % self.grad_stats_every == 0:
                    grads = self._grad_dot_val(batch.tokens, batch.domains)
                loss, per_seq = self._step(batch.tokens)
                per_domain = per_domain_mean(per_seq, batch.domains, self.m)
                seq_tokens = batch.tokens.shape[1] - 1
                feed.report(batch.step, per_domain, batch.counts * seq_tokens, batch.version, batch.counts,
                            grad_dot_val=grads)
                steps += 1
                loss_sum += loss.item()
                self._progress.update(steps=steps, tokens=feed.tokens, loss=loss.item())
            if batch.eval_after:
                feed.report_eval(batch.step, domain_losses(self.raw_model, self.val_sets, self.pad_id), batch.version)
            if self.rank == 0 and self.eval_every and steps and steps % self.eval_every == 0 and not batch.empty:
                curve.append({"step": steps, "test_loss": domain_losses(self.raw_model, self.test_sets, self.pad_id)})
            if self.throttle_s:
                time.sleep(self.throttle_s)
            if stop_after is not None and batch.step + 1 >= stop_after:
                break
        ray.get(self._reports)  # every report of a consumed step has reached the controller
        wall = time.perf_counter() - start
        final = domain_losses(self.raw_model, self.test_sets, self.pad_id) if self.rank == 0 else None
        return {"rank": self.rank, "steps": steps, "tokens": feed.tokens, "keys": feed.keys,
                "wait_s": feed.wait_s, "wall_s": wall, "mean_loss": loss_sum / max(steps, 1),
                "test_loss": final, "curve": curve, "batches": feed.log,
                "skipped": feed.skipped}

    def _grad_dot_val(self, tokens: torch.Tensor, domains: torch.Tensor) -> list[float]:
        """``<grad L_val, grad L_d>`` per domain at the current weights (NaN for domains not in
        the batch). ``torch.autograd.grad`` leaves ``.grad`` and DDP's reducer untouched."""
        model = self.raw_model
        params = [p for p in model.parameters() if p.requires_grad]
        val = torch.from_numpy(np.concatenate([v[:4] for v in self.val_sets]).astype(np.int64))
        g_val = torch.autograd.grad(per_sequence_loss(model, val, self.pad_id).mean(), params)
        per_seq = per_sequence_loss(model, tokens, self.pad_id)
        out = [math.nan] * self.m
        present = torch.unique(domains).tolist()
        for i, d in enumerate(present):
            g_d = torch.autograd.grad(per_seq[domains == d].mean(), params, retain_graph=i < len(present) - 1)
            out[d] = float(sum((a * b).sum() for a, b in zip(g_val, g_d)))
        return out

    def _step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.model, UnigramLM):
            per_seq = self.model.per_sequence_loss(tokens)
            self.model.update(tokens)
            return per_seq.mean(), per_seq
        per_seq = per_sequence_loss(self.model, tokens, self.pad_id)
        loss = per_seq.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss, per_seq.detach()

    def progress(self) -> dict:
        return dict(self._progress)

    def teardown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

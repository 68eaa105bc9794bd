"""The LM demo's training loop (``trainer.model: byte_gpt | unigram``): an entrypoint like any other.

Every step: the loss of each sequence, averaged per domain, reported with
``feed.report`` (the mixture policy's training feedback); the batch mean is backpropagated
through DDP. Every ``feed.grad_stats_every`` steps the report also carries
``<grad L_val, grad L_d>`` per domain (what TiKMiX and DoGE consume). A batch marked
``eval_after`` is followed by the held-out loss of every domain on this rank's validation
slice (``feed.held_out``), reported with ``feed.report_eval`` (what Aioli's LearnParams and
Skill-It consume). Rank 0 also measures the *test* split (``context.held_out_test``, never
shown to a policy) every ``trainer.eval_every`` steps and at the end: the run's results.

``byte_gpt``: :class:`~mixflow.demos.byte_gpt.ByteGPT` with AdamW. ``unigram``:
:class:`~mixflow.demos.unigram_lm.UnigramLM`, trained by counting (no DDP); its gradient
statistics are the exact gradients of its loss with respect to its logits
(:meth:`~mixflow.demos.unigram_lm.UnigramLM.grad_dot_val`), so TiKMiX and DoGE get real input.

**DoReMi's two phases.** ``trainer.save_model: PATH`` makes rank 0 save the trained model at
the end (the *reference* run, on the stratified mixture); ``trainer.reference_model: PATH``
loads such a model next to the one being trained (the *proxy* run) and reports its
per-domain loss on every batch as ``ref_loss``, before the proxy's own step::

    mixflow run pipelines/llm_mixture.yaml --set mixture.policy=stratified \
        --set trainer.save_model=runs/doremi/reference.pt --set run_dir=runs/doremi/reference
    mixflow run pipelines/llm_mixture.yaml --set mixture.policy=doremi \
        --set trainer.reference_model=runs/doremi/reference.pt --set run_dir=runs/doremi/proxy
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mixflow.demos.byte_gpt import ByteGPT, ByteGPTConfig
from mixflow.demos.unigram_lm import UnigramLM
from mixflow.errors import ConfigError
from mixflow.train.lm_losses import per_sequence_loss

MODEL_FORMAT = "mixflow-lm-model/1"


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


def grad_dot_val(model: torch.nn.Module, val_sets: list[np.ndarray], tokens: torch.Tensor,
                 domains: torch.Tensor, num_domains: int, pad_id: int | None) -> list[float]:
    """``<grad L_val, grad L_d>`` per domain at the current weights (NaN for domains not in the
    batch). ``torch.autograd.grad`` leaves ``.grad`` and DDP's reducer untouched."""
    params = [p for p in model.parameters() if p.requires_grad]
    val = torch.from_numpy(np.concatenate([v[:4] for v in val_sets]).astype(np.int64))
    g_val = torch.autograd.grad(per_sequence_loss(model, val, pad_id).mean(), params)
    per_seq = per_sequence_loss(model, tokens, pad_id)
    out = [math.nan] * num_domains
    present = torch.unique(domains).tolist()
    for i, d in enumerate(present):
        g_d = torch.autograd.grad(per_seq[domains == d].mean(), params, retain_graph=i < len(present) - 1)
        out[d] = float(sum((a * b).sum() for a, b in zip(g_val, g_d)))
    return out


def save_model(path: str | Path, model_kind: str, model: torch.nn.Module | UnigramLM, vocab_size: int) -> None:
    """The trained model as a file :func:`load_reference` reads (``trainer.save_model``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(model, UnigramLM):
        state, config = {"counts": model.counts.clone()}, {}
    else:
        state, config = model.state_dict(), dict(vars(model.cfg))
    torch.save({"format": MODEL_FORMAT, "model": model_kind, "vocab_size": vocab_size, "config": config,
                "state": state}, path)


def load_reference(path: str | Path, model_kind: str, vocab_size: int, pad_id: int | None):
    """The reference model saved at ``path`` (``trainer.reference_model``), frozen."""
    where = "trainer.reference_model"
    if not Path(path).is_file():
        raise ConfigError([(where, f"no model file at {path} (write one with a run that sets trainer.save_model)")])
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(saved, dict) or saved.get("format") != MODEL_FORMAT:
        raise ConfigError([(where, f"{path} is not a model saved by trainer.save_model")])
    if saved["model"] != model_kind or saved["vocab_size"] != vocab_size:
        raise ConfigError([(where, f"{path} holds a {saved['model']!r} model over {saved['vocab_size']} tokens; "
                                   f"this run trains {model_kind!r} over {vocab_size}")])
    if model_kind == "unigram":
        ref = UnigramLM(vocab_size, pad_id)
        ref.counts = saved["state"]["counts"].clone()
        return ref
    ref = ByteGPT(ByteGPTConfig(**saved["config"]))
    ref.load_state_dict(saved["state"])
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@torch.no_grad()
def sequence_losses(model: torch.nn.Module | UnigramLM, tokens: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """Per-sequence loss of ``tokens`` under a model that is not being trained."""
    if isinstance(model, UnigramLM):
        return model.per_sequence_loss(tokens)
    return per_sequence_loss(model, tokens.to(next(model.parameters()).device), pad_id)


class _Learner:
    """The model and its step: a DDP-wrapped ByteGPT with AdamW, or the counting unigram model."""

    def __init__(self, context, vocab_size: int, pad_id: int | None):
        spec, t = context.spec, context.spec.trainer
        self.pad_id = pad_id
        if t.model == "unigram":
            self.raw = self.model = UnigramLM(vocab_size, pad_id)
            self.optimizer = None
        else:
            torch.manual_seed(spec.seed)  # identical initial weights on every rank
            self.raw = ByteGPT(ByteGPTConfig(vocab_size=vocab_size, seq_len=spec.data.seq_len, d_model=t.d_model,
                                             layers=t.layers, heads=t.heads))
            distributed = dist.is_initialized() and dist.get_world_size() > 1
            self.model = torch.nn.parallel.DistributedDataParallel(self.raw) if distributed else self.raw
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=0.01)

    def state(self) -> dict:
        if self.optimizer is None:
            return {"counts": self.raw.counts.clone()}
        return {"model": self.raw.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load(self, state: dict) -> None:
        if self.optimizer is None:
            self.raw.counts = state["counts"].clone()
            return
        self.raw.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def grad_dot_val(self, val_sets: list[np.ndarray], tokens: torch.Tensor, domains: torch.Tensor,
                     num_domains: int) -> list[float]:
        if self.optimizer is None:
            val = torch.from_numpy(np.concatenate([v[:4] for v in val_sets]).astype(np.int64))
            return self.raw.grad_dot_val(val, tokens, domains, num_domains)
        return grad_dot_val(self.raw, val_sets, tokens, domains, num_domains, self.pad_id)

    def step(self, tokens: torch.Tensor) -> tuple[float, torch.Tensor]:
        """One training step; the batch's mean loss and the loss of each sequence (before the step)."""
        if self.optimizer is None:
            per_seq = self.model.per_sequence_loss(tokens)
            self.model.update(tokens)
            return per_seq.mean().item(), per_seq
        per_seq = per_sequence_loss(self.model, tokens, self.pad_id)
        loss = per_seq.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item(), per_seq.detach()


def train(feed, context) -> dict:
    """Train on the rank's token feed to its last step. Returns (rank 0) the test loss per domain
    at the end and the test-loss curve, which the run summary shows."""
    learner = _Learner(context, feed.vocab_size, feed.pad_id)
    if context.resume_state is not None:
        learner.load(context.resume_state)
    context.on_checkpoint(learner.state)
    val_sets = feed.held_out
    test_sets = context.held_out_test if context.is_main else None
    eval_every = context.spec.trainer.eval_every
    grad_every = feed.grad_stats_every
    t = context.spec.trainer
    reference = (load_reference(t.reference_model, t.model, feed.vocab_size, feed.pad_id)
                 if t.reference_model else None)
    curve: list[dict] = []
    steps = 0
    for batch in feed.epoch(0):
        if not batch.empty:
            grads = ref = None
            if grad_every and batch.step % grad_every == 0:
                grads = learner.grad_dot_val(val_sets, batch.tokens, batch.domains, len(batch.counts))
            if reference is not None:  # the reference model's loss on the same batch (DoReMi)
                ref = batch.per_domain(sequence_losses(reference, batch.tokens, feed.pad_id))
            _loss, per_seq = learner.step(batch.tokens)
            feed.report(batch.step, per_domain_loss=batch.per_domain(per_seq), grad_dot_val=grads, ref_loss=ref)
            steps += 1
            if test_sets is not None and eval_every and steps % eval_every == 0:
                curve.append({"step": steps, "test_loss": domain_losses(learner.raw, test_sets, feed.pad_id)})
        if batch.eval_after:
            feed.report_eval(batch.step, domain_losses(learner.raw, val_sets, feed.pad_id))
    final = domain_losses(learner.raw, test_sets, feed.pad_id) if test_sets is not None else None
    if t.save_model and context.is_main:
        save_model(t.save_model, t.model, learner.raw, feed.vocab_size)
    return {"test_loss": final, "curve": curve}

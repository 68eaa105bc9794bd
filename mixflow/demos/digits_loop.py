"""The digits demo's training loop (``trainer.model: digits_cnn``): an entrypoint like any other.

:class:`~mixflow.demos.digits_cnn.DigitsCNN` under DDP (when the rank has a process group),
SGD with momentum (``trainer.lr``, ``trainer.momentum``), soft-target cross entropy on the
mixed targets. Manifold mixup batches (Verma et al., "Manifold Mixup", ICML 2019) carry a
:class:`~mixflow.mix.plans.LayerPlan`: the hidden state entering the planned block of the
CNN's ``features`` is mixed there (:class:`~mixflow.train.mix_label_helpers.ManifoldMixupHook`).
Its model and optimizer are what it registers for mixflow's run checkpoints (``mixflow run
--stop-at``), and what it loads back on a resumed run.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from mixflow.demos.digits_cnn import DigitsCNN
from mixflow.mix.plans import LayerPlan
from mixflow.train.losses import soft_target_cross_entropy
from mixflow.train.mix_label_helpers import ManifoldMixupHook


def train(feed, context) -> dict:
    """Train on every epoch of ``feed`` from its position; returns the mean loss of each epoch."""
    spec = context.spec
    torch.manual_seed(spec.seed)  # identical initial weights on every rank
    model = DigitsCNN(spec.data.num_classes).to(context.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.trainer.lr, momentum=spec.trainer.momentum)
    if context.checkpoint is not None:
        saved = context.resume_state
        if not saved or "model" not in saved:
            raise ValueError(f"checkpoint {context.checkpoint} holds no model weights "
                             "(saved with trainer.model: none)")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
    context.on_checkpoint(lambda: {"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    net = nn.parallel.DistributedDataParallel(model) if distributed else model
    net.train()
    losses = []
    for epoch in range(feed.current_epoch, feed.epochs):
        total, steps = 0.0, 0
        # Ranks read disjoint shards, so their batch counts may differ by one: join() covers it.
        with net.join() if distributed else contextlib.nullcontext():
            for batch in feed.epoch(epoch):
                if isinstance(batch.plan, LayerPlan):  # manifold mixup: mix at the planned layer
                    with ManifoldMixupHook(model.features, batch):
                        logits = net(batch.x)
                else:
                    logits = net(batch.x)
                loss = soft_target_cross_entropy(logits, batch.targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                feed.report(batch.step, loss=loss.item())
                total, steps = total + loss.item(), steps + 1
        losses.append(total / steps if steps else None)
    return {"losses": losses}

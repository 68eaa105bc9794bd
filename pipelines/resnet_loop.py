"""Your own model and training loop on a mixflow pipeline: a small ResNet on the digits demo.

The model and the loop live here, not in mixflow. The same ``train(feed, context)`` runs three ways:

    # 1. in this process, one rank (mixflow.start + pipe.feed):
    python pipelines/resnet_loop.py --epochs 4

    # 2. on mixflow's rank actors, 2 DDP ranks (the spec names this function as trainer.entrypoint):
    mixflow run pipelines/digits_resnet.yaml

    # 3. under torchrun, attached by name to a served pipeline:
    mixflow serve pipelines/digits_mixup.yaml --name digits --address auto   # on a running Ray cluster
    RAY_ADDRESS=<address it printed> torchrun --nproc-per-node 2 pipelines/resnet_loop.py --attach digits

With ``--checkpoint PATH`` (way 1) the model, the optimizer and the feed's state are saved after
every epoch, and a later run with the same ``--checkpoint`` continues the identical stream.
"""

from __future__ import annotations

import argparse
import os
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import mixflow


class BasicBlock(nn.Module):
    """He et al., "Deep Residual Learning for Image Recognition" (2016): two 3x3 convs and a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet for 32x32 inputs: a stem and three stages of one BasicBlock (16, 32, 64 channels)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.stages = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2))
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


def soft_target_cross_entropy(logits, targets):
    """Cross entropy against mixed (soft) targets, as timm's SoftTargetCrossEntropy."""
    return torch.sum(-targets * torch.log_softmax(logits, dim=-1), dim=-1).mean()


def train(feed, context=None, checkpoint: Path | None = None) -> dict:
    """Train on ``feed`` to its last epoch; under a process group the model is DDP. Returns the
    mean loss of every epoch. ``checkpoint``: save (and, when present, resume from) this file."""
    torch.manual_seed(0)
    model = SmallResNet(feed.spec.data.num_classes).to(feed.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    if checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        feed.load_state_dict(saved["feed"])  # continues the identical stream
        print(f"resumed from {checkpoint} at epoch {feed.current_epoch}")
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    net = nn.parallel.DistributedDataParallel(model) if distributed else model
    losses = []
    for epoch in range(feed.current_epoch, feed.epochs):
        total, steps = 0.0, 0
        # Ranks read disjoint shards, so their batch counts may differ by one: DDP's join() covers it.
        with net.join() if distributed else nullcontext():
            for batch in feed.epoch(epoch):
                loss = soft_target_cross_entropy(net(batch.x), batch.targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                feed.report(batch.step, loss=loss.item())
                total, steps = total + loss.item(), steps + 1
        losses.append(total / max(steps, 1))
        print(f"rank {feed.rank} epoch {epoch}: mean loss {losses[-1]:.3f} over {steps} batches", flush=True)
        if checkpoint is not None:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "feed": feed.state_dict()}, checkpoint)
    return {"rank": feed.rank, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="pipelines/digits_mixup.yaml")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--checkpoint", type=Path, help="save after every epoch; resume from it when present")
    parser.add_argument("--attach", metavar="NAME", help="attach to a served pipeline (torchrun ranks)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("WORLD_SIZE", 1))))
    if args.attach:  # torchrun: RANK / WORLD_SIZE / MASTER_ADDR from its environment
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            dist.init_process_group("gloo")
        feed = mixflow.feed(args.attach)
        train(feed)
        feed.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        return
    pipe = mixflow.start(args.spec, name="resnet-loop", overrides=["trainer.ranks=1", f"trainer.epochs={args.epochs}"])
    feed = pipe.feed(rank=0, world_size=1)
    train(feed, checkpoint=args.checkpoint)
    pipe.close().render()


if __name__ == "__main__":
    main()

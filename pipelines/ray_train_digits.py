"""Train a small ResNet on the digits pipeline with Ray Train, checkpointing the feeds' stream state.

    python pipelines/ray_train_digits.py --epochs 2            # from the repository root
    python pipelines/ray_train_digits.py --epochs 4            # again: resumes after epoch 2
    python pipelines/ray_train_digits.py --epochs 4 --fresh    # start over

``mixflow.start`` runs the data plane (readers, DALI decode, MixUp/CutMix, one channel per rank)
as named Ray actors; a ``TorchTrainer`` starts ``--workers`` training workers (DDP on gloo on a
CPU machine, NCCL with ``--gpu``), and each takes its rank's feed with ``mixflow.feed(name)``: the
rank and world size come from Ray Train's context. Every epoch each worker saves
``{"model", "optimizer", "feed": feed.state_dict()}`` as ``rank{r}.pt`` and calls
``ray.train.report(..., checkpoint=...)``; Ray Train puts all the workers' files into one
checkpoint directory. Run again with the same ``--storage`` and Ray Train hands the latest
checkpoint back through ``ray.train.get_checkpoint()``: the model and optimizer are restored and
``feed.load_state_dict`` continues the identical sample stream after the last finished epoch, in a
pipeline started afresh. (Ray Train 2.60 is Train V2: ``TorchTrainer(resume_from_checkpoint=...)``
is gone; a run resumes by reusing ``RunConfig(name=..., storage_path=...)``.)

At the end ``pipe.close()`` gives the pipeline's verdict: per epoch that every ranks finished here,
whether every sample reached exactly one rank exactly once.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn

NAME = "ray_train_digits"


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet-8-style network for small RGB images: stem, three stages (16, 32, 64), pooled head."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stages = nn.Sequential(BasicBlock(width, width), BasicBlock(width, 2 * width, 2),
                                    BasicBlock(2 * width, 4 * width, 2))
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1))


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against MixUp/CutMix soft targets (rows sum to 1)."""
    return -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


def train_loop_per_worker(config: dict) -> None:
    import os
    import tempfile

    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    import mixflow

    context = ray.train.get_context()
    rank = context.get_world_rank()
    feed = mixflow.feed(config["pipeline"])  # claims this worker's rank of the running pipeline
    device = ray.train.torch.get_device()

    torch.manual_seed(config["seed"])
    model = SmallResNet(config["num_classes"])
    saved = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a run of the same name checkpointed before: continue after it
        with checkpoint.as_directory() as where:
            saved = torch.load(os.path.join(where, f"rank{rank}.pt"), map_location="cpu", weights_only=False)
        model.load_state_dict(saved["model"])
        feed.load_state_dict(saved["feed"])
    model = ray.train.torch.prepare_model(model)  # to the device, DDP across the workers
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                                weight_decay=5e-4, nesterov=True)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
    history = saved["history"] if saved is not None else []
    start = feed.current_epoch
    if rank == 0 and saved is not None:
        print(f"resumed from {checkpoint.path}: continuing at epoch {start} of {feed.epochs}", flush=True)

    for epoch in range(start, feed.epochs):
        model.train()
        began, loss_sum, steps, samples = time.perf_counter(), 0.0, 0, 0
        # Ranks get ceil/floor of the epoch's batches: join() lets DDP finish the uneven tail.
        with model.join():
            for batch in feed.epoch(epoch):
                x, targets = batch.x.to(device, non_blocking=True), batch.targets.to(device, non_blocking=True)
                loss = soft_target_cross_entropy(model(x), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                feed.report(batch.step, loss=loss.item())
                loss_sum, steps, samples = loss_sum + loss.item(), steps + 1, samples + len(batch.keys)
        totals = torch.tensor([loss_sum, steps, samples], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(totals)  # (gloo reduces CPU tensors; with NCCL move it to the device)
        mean_loss = float(totals[0] / totals[1])
        history.append(mean_loss)
        metrics = {"epoch": epoch, "loss": mean_loss, "samples": int(totals[2]),
                   "epoch_s": round(time.perf_counter() - began, 2)}
        with tempfile.TemporaryDirectory() as tmp:
            torch.save({"model": model.module.state_dict(), "optimizer": optimizer.state_dict(),
                        "feed": feed.state_dict(), "history": history}, os.path.join(tmp, f"rank{rank}.pt"))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"epoch-{epoch:04d}")
        if rank == 0:
            print(f"epoch {epoch}: loss {mean_loss:.4f} over {int(totals[2])} samples "
                  f"({metrics['epoch_s']:.1f} s)", flush=True)
    feed.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="pipelines/digits_mixup.yaml", help="the image pipeline spec")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (= the pipeline's ranks)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: the spec's trainer.epochs)")
    parser.add_argument("--lr", type=float, default=None, help="SGD learning rate (default: the spec's)")
    parser.add_argument("--storage", default="runs/ray_train", help="Ray Train storage path (checkpoints)")
    parser.add_argument("--fresh", action="store_true", help="ignore (delete) earlier checkpoints of this run")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--cpus-per-worker", type=float, default=0.01,
                        help="CPUs each worker reserves (small: the pipeline's actors reserve none)")
    args = parser.parse_args(argv)

    import mixflow
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = Path(args.storage).resolve()
    if args.fresh and (storage / NAME).exists():
        shutil.rmtree(storage / NAME)
    overrides = [f"trainer.ranks={args.workers}"] + ([f"trainer.epochs={args.epochs}"] if args.epochs else [])
    began = time.perf_counter()
    pipe = mixflow.start(args.spec, name=NAME, overrides=overrides)  # also starts (or joins) Ray
    print(f"started {pipe} in {time.perf_counter() - began:.1f} s", flush=True)
    t = pipe.spec.trainer
    resources = {"CPU": args.cpus_per_worker} | ({"GPU": 1} if args.gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"pipeline": NAME, "seed": pipe.spec.seed, "num_classes": pipe.spec.data.num_classes,
                           "lr": args.lr or t.lr, "momentum": t.momentum},
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.gpu, resources_per_worker=resources),
        # the same name and storage next time: Ray Train resumes from this run's latest checkpoint
        run_config=RunConfig(name=NAME, storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    try:
        result = trainer.fit()
    finally:
        summary = pipe.close()
    print(f"Ray Train run finished in {time.perf_counter() - began:.1f} s; latest checkpoint: "
          f"{result.checkpoint.path if result.checkpoint else None} {result.metrics}")
    summary.render()
    if not summary.ledgers:
        print("no epoch ran here: the latest checkpoint is at the last epoch already "
              "(pass a larger --epochs, or --fresh)")
    return 0 if summary.exactly_once else 1


if __name__ == "__main__":
    sys.exit(main())

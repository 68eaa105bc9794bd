"""A torchrun training script (run by tests/test_serve_torchrun.py): each rank attaches to a served
pipeline by name, trains the test suite's small CNN under DDP and writes its per-epoch losses as JSON
to ``OUT/rank<r>.json`` (one file per rank: torchrun interleaves the ranks' stdout)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import mixflow
from tests.test_feed_api import TinyNet, soft_ce


def main(name: str, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # torchrun's MASTER_ADDR / RANK / WORLD_SIZE
    feed = mixflow.feed(name)  # rank and world size from torchrun's environment
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(TinyNet())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses, sums_ok = [], True
    for epoch in range(feed.epochs):
        total, n = 0.0, 0
        with model.join():  # ranks' batch counts may differ by one
            for batch in feed.epoch(epoch):
                sums_ok &= bool(torch.allclose(batch.targets.sum(1), torch.ones(len(batch.keys)), atol=1e-5))
                loss = soft_ce(model(batch.x), batch.targets)
                opt.zero_grad()
                loss.backward()
                opt.step()
                feed.report(batch.step, loss=loss.item())
                total, n = total + loss.item(), n + 1
        losses.append(total / n)
    (out / f"rank{feed.rank}.json").write_text(json.dumps({"rank": feed.rank, "losses": losses, "sums_ok": sums_ok}))
    feed.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))

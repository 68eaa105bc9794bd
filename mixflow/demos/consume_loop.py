"""``trainer.model: none``: no model, the rank only consumes its feed (data-plane runs and
benchmarks). Each batch arrives as delivered (uint8 ``[B, H, W, C]``, no float conversion)
and one element of it is read, so the data really reached the rank."""

from __future__ import annotations


def consume(feed, context) -> None:
    feed.to_float = False
    for epoch in range(feed.current_epoch, feed.epochs):
        for batch in feed.epoch(epoch):
            batch.x.view(-1)[0].item()  # touch the data

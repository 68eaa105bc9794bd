"""Does ``data.num_classes`` fit the shards? A spec error, caught before the run, not bad samples.

A label outside ``0..num_classes-1`` in one sample is a bad sample (``on_error``); in more
than a few (over ``max(MAX_BAD, MAX_FRACTION)`` of the samples read) the spec is wrong:
``num_classes`` is smaller than the data, and ``skip`` would quarantine whole classes
and still exit 0. Two sources, cheapest first: the ``classes.json`` that
``mixflow shards`` writes beside the shards, then the ``.cls`` members themselves,
read through the index (a few bytes per sample; at most ``limit`` samples, spread
evenly over the shards, so a large set is checked in seconds).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from mixflow.data.listing import ShardInfo
from mixflow.data.tar_index import read_index
from mixflow.errors import ConfigError

LABEL_EXT = "cls"
MAX_BAD = 3  # labels out of range tolerated as bad samples
MAX_FRACTION = 0.01  # ... or this fraction of the samples read, whichever is more
LIMIT = 20_000


def read_labels(shards: list[ShardInfo], limit: int | None = LIMIT) -> list[int]:
    """Integer labels of up to ``limit`` samples spread evenly over ``shards`` (all when None);
    samples without a readable integer ``.cls`` are left out (the readers report them), and so are
    shards in object storage (reading labels would download them; their ``classes.json`` is checked)."""
    total = sum(s.num_samples for s in shards)
    if total == 0:
        return []
    picks = np.arange(total) if limit is None or total <= limit else np.linspace(0, total - 1, limit).astype(np.int64)
    starts = np.cumsum([0] + [s.num_samples for s in shards])
    labels: list[int] = []
    for i, shard in enumerate(shards):
        rows = picks[(picks >= starts[i]) & (picks < starts[i + 1])] - starts[i]
        if not len(rows) or shard.store is not None:  # in object storage: its classes.json only
            continue
        try:
            index = read_index(shard.index_path, shard=shard.path)
            with open(shard.path, "rb") as fh:
                for row in rows:
                    comps = {k.lower(): c for k, c in index[int(row)].components.items()}
                    comp = comps.get(LABEL_EXT)
                    if comp is None or comp.size > 32:
                        continue
                    fh.seek(comp.offset)
                    try:
                        labels.append(int(fh.read(comp.size).strip()))
                    except ValueError:
                        continue
        except (OSError, IndexError, ValueError):
            continue  # an unreadable shard or index: the listing and readers name it
    return labels


def _seen(labels: list[int]) -> str:
    counts = sorted(Counter(labels).items())
    shown = ", ".join(f"{label} ({n})" for label, n in counts[:20])
    return shown + (f", ... ({len(counts)} labels)" if len(counts) > 20 else "")


def check_num_classes(shard_dir: str | Path, shards: list[ShardInfo], num_classes: int,
                      limit: int | None = LIMIT) -> None:
    """Raise :class:`ConfigError` on ``data.num_classes`` when the shards' ``classes.json`` names
    more classes, or when more than a few of the labels read lie outside ``0..num_classes-1``."""
    meta = Path(shard_dir) / "classes.json"
    try:
        declared = json.loads(meta.read_text()).get("num_classes")
    except (OSError, ValueError, AttributeError):
        declared = None
    if isinstance(declared, int) and not isinstance(declared, bool) and declared > num_classes:
        raise ConfigError([("data.num_classes", f"{num_classes}, but {meta} says the shards hold {declared} "
                                                f"classes; set data.num_classes: {declared}")])
    labels = read_labels(shards, limit)
    outside = [label for label in labels if not 0 <= label < num_classes]
    if len(outside) > max(MAX_BAD, MAX_FRACTION * len(labels)):
        need = max(labels) + 1
        hint = f"set data.num_classes: {need}" if min(labels) >= 0 else "labels must be >= 0"
        raise ConfigError([("data.num_classes", f"{num_classes}, but {len(outside)} of {len(labels)} samples read "
                                                f"have labels outside 0..{num_classes - 1} (labels seen: "
                                                f"{_seen(labels)}); {hint}")])

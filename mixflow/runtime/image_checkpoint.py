"""Image pipeline state: what decides the rest of the stream, for exact and elastic resume.

The stream of a rank is a pure function of the spec (see :mod:`mixflow.runtime.mixer_actor`),
so the state is small: the epoch in progress, each rank's stream position (``step``,
``cursor``, per-reader ``starts``: where the next batch of each of its readers begins)
taken from the last batch the *trainer* consumed, and the quarantine records that came
with the epoch's batches so far. Batches produced but not consumed are not in it: a
resumed pipeline produces them again.

*Exact resume* (same ranks and readers per rank) gives every rank exactly the batches
the uninterrupted run would have given it: same keys, same pixels, same targets.

*Elastic resume* (a different number of ranks or readers) cannot keep that order. The
rest of the epoch, every reader's sequence from its ``start`` on, is concatenated in
reader order and split evenly over the new readers (a *cut*); the epoch's key set is
still delivered exactly once, in a different order and grouping into batches. The
cuts are kept in the state (several elastic resumes in one epoch compose), and later
epochs use the seeded shard assignment for the new reader count.

Streaming resumption by positions follows MosaicML Streaming (``StreamingDataset``'s
``state_dict``: epoch and samples seen) and torchdata's per-item snapshots; the elastic
re-split of the unseen remainder follows the same idea as MosaicML's resumption with a
different number of ranks.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from mixflow.config import PipelineSpec
from mixflow.data.bad_samples import SkipRecord
from mixflow.data.listing import ShardInfo
from mixflow.data.shard_assignment import assign_shards, sample_order
from mixflow.data.tar_index import read_index

FORMAT = "mixflow.image-pipeline-state/1"


def stream_fields(spec: PipelineSpec, shards: list[ShardInfo]) -> dict:
    """The spec fields (and shard list) that decide the sample stream; a resume must match them."""
    return {
        "seed": spec.seed,
        "on_error": spec.on_error,
        "batch_size": spec.trainer.batch_size,
        "data": {"num_classes": spec.data.num_classes, "shuffle_window": spec.data.shuffle_window,
                 "shards": [[Path(s.path).name, s.num_samples] for s in shards]},
        "decode": spec.decode.model_dump(mode="json", exclude={"device", "threads"}),
        "mix": spec.mix.model_dump(mode="json"),
    }


def differences(saved, current, path: str = "") -> list[str]:
    """Every leaf where ``saved`` and ``current`` differ, as ``path (state: ..., spec: ...)``."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(saved.keys() | current.keys()):
            out += differences(saved.get(key), current.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if saved == current else [f"{path} (state: {saved!r}, spec: {current!r})"]


def check_resumable(state: dict, spec: PipelineSpec, shards: list[ShardInfo]) -> None:
    """Raise ``ValueError`` naming every stream-deciding field where ``state`` and ``spec`` differ."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"resume_from: not an image pipeline state (format must be {FORMAT!r}, "
                         f"got {state.get('format') if isinstance(state, dict) else type(state).__name__!r})")
    diffs = differences(state["stream"], stream_fields(spec, shards), "")
    if diffs:
        raise ValueError("resume_from: the state was saved with a different stream; differing fields: "
                         + "; ".join(diffs))
    if state["epoch"] >= spec.trainer.epochs:
        raise ValueError(f"resume_from: the state is at epoch {state['epoch']} but trainer.epochs is "
                         f"{spec.trainer.epochs}; nothing is left to run")


def epoch_rows(shards: list[ShardInfo], seed: int, window: int, epoch: int, num_readers: int,
               cuts: list[dict]) -> list[np.ndarray]:
    """Each reader's sequence of ``(shard, sample)`` rows in ``epoch`` after the elastic ``cuts``.

    Without cuts this is the seeded assignment (what :class:`WebDatasetSource` reads);
    each cut takes the readers of that moment (``cut["readers"]``) past what they had
    consumed (``cut["consumed"]``), concatenates the rest in reader order and splits it
    evenly over the next stage's readers (the next cut's, or ``num_readers``).
    """
    counts = [s.num_samples for s in shards]
    first = cuts[0]["readers"] if cuts else num_readers
    rows = [sample_order(mine, counts, window, seed, epoch, g)
            for g, mine in enumerate(assign_shards(counts, first, seed, epoch))]
    for i, cut in enumerate(cuts):
        rest = [r[c:] for r, c in zip(rows, cut["consumed"])]
        remaining = np.concatenate(rest) if rest else np.empty((0, 2), np.int64)
        following = cuts[i + 1]["readers"] if i + 1 < len(cuts) else num_readers
        rows = np.array_split(remaining.reshape(-1, 2), following)
    return rows


def _current_rows(state: dict, shards: list[ShardInfo]) -> list[np.ndarray]:
    s = state["stream"]
    return epoch_rows(shards, s["seed"], s["data"]["shuffle_window"], state["epoch"],
                      state["ranks"] * state["readers_per_rank"], state["cuts"])


def consumed_counts(state: dict, rows: list[np.ndarray]) -> list[int]:
    """Per global reader (``rank * readers_per_rank + slot``): rows of its sequence already consumed."""
    k = state["readers_per_rank"]
    out = []
    for r, rank_state in enumerate(state["rank_states"]):
        pos = rank_state["position"]
        for slot in range(k):
            full = len(rows[r * k + slot])
            out.append(full if pos.get("done") else min(full, (pos["starts"] or [0] * k)[slot]))
    return out


def consumed_rows(state: dict, shards: list[ShardInfo]) -> np.ndarray:
    """Every ``(shard, sample)`` row of the state's epoch that was delivered or quarantined before it."""
    s = state["stream"]
    parts = []
    for i, cut in enumerate(state["cuts"]):  # what each stage had consumed when it was cut
        rows = epoch_rows(shards, s["seed"], s["data"]["shuffle_window"], state["epoch"], cut["readers"],
                          state["cuts"][:i])
        parts += [r[:c] for r, c in zip(rows, cut["consumed"])]
    rows = _current_rows(state, shards)
    parts += [r[:c] for r, c in zip(rows, consumed_counts(state, rows))]
    return np.concatenate(parts).reshape(-1, 2) if parts else np.empty((0, 2), np.int64)


def rows_to_keys(shards: list[ShardInfo], rows: np.ndarray) -> list[str]:
    """The sample keys of ``(shard, sample)`` rows."""
    cache: dict[int, list[str]] = {}
    keys = []
    for shard, row in rows:
        if int(shard) not in cache:
            info = shards[int(shard)]
            cache[int(shard)] = [s.key for s in read_index(info.index_path, shard=info.path)]
        keys.append(cache[int(shard)][int(row)])
    return keys


def skipped_records(state: dict) -> list[SkipRecord]:
    """The quarantine records of the state's epoch delivered before the state."""
    raw = state["skipped_before_cuts"] + [r for rs in state["rank_states"] for r in rs["skipped"]]
    return [SkipRecord(**r) for r in raw]


def delivered_before(state: dict, shards: list[ShardInfo]) -> list[str]:
    """Keys of the state's epoch that trainers received before the state (quarantined ones excluded)."""
    bad = {r.key for r in skipped_records(state)}
    return [k for k in rows_to_keys(shards, consumed_rows(state, shards)) if k not in bad]


def fresh_position(epoch: int) -> dict:
    """A rank's position at the start of ``epoch``."""
    return {"epoch": epoch, "step": 0, "cursor": 0, "starts": None}


def initial_state(spec: PipelineSpec, shards: list[ShardInfo]) -> dict:
    """The state of a pipeline that has not started."""
    return {"format": FORMAT, "stream": stream_fields(spec, shards), "epoch": 0, "ranks": spec.trainer.ranks,
            "readers_per_rank": spec.runtime.readers_per_rank, "cuts": [], "skipped_before_cuts": [],
            "rank_states": [{"position": fresh_position(0), "skipped": []} for _ in range(spec.trainer.ranks)],
            "checkpoints": None}


def build_state(spec: PipelineSpec, shards: list[ShardInfo], rank_states: list[dict],
                checkpoints: list[str] | None = None) -> dict:
    """The pipeline state from each rank's :meth:`TrainerRank.stream_state` (in rank order).

    When every rank has finished its epoch the state points at the next epoch's start.
    """
    epoch = min(rs["position"]["epoch"] + bool(rs["position"].get("done")) for rs in rank_states)
    lifted = []
    for rs in rank_states:
        pos = rs["position"]
        if pos["epoch"] == epoch - 1 and pos.get("done"):  # finished the epoch before: at the state's start
            rs = {**rs, "position": fresh_position(epoch), "skipped": [], "cuts": [], "skipped_before_cuts": []}
        elif pos["epoch"] != epoch:
            raise ValueError(f"rank {rs['rank']} is at {pos} but the state's epoch is {epoch}: ranks may "
                             f"differ by one epoch only when the earlier ones finished theirs")
        lifted.append(rs)
    context = next((rs for rs in lifted if rs["cuts"] or rs["skipped_before_cuts"]), lifted[0])
    cuts, skipped_before_cuts, rank_states = context["cuts"], context["skipped_before_cuts"], lifted
    return {"format": FORMAT, "stream": stream_fields(spec, shards), "epoch": epoch,
            "ranks": len(rank_states), "readers_per_rank": spec.runtime.readers_per_rank,
            "cuts": cuts, "skipped_before_cuts": skipped_before_cuts,
            "rank_states": [{"position": rs["position"], "skipped": rs["skipped"]} for rs in rank_states],
            "checkpoints": checkpoints}


def is_elastic(state: dict, spec: PipelineSpec) -> bool:
    """Whether resuming ``state`` under ``spec`` changes the ranks or readers per rank."""
    return (state["ranks"], state["readers_per_rank"]) != (spec.trainer.ranks, spec.runtime.readers_per_rank)


def elastic_state(state: dict, spec: PipelineSpec, shards: list[ShardInfo]) -> dict:
    """``state`` re-cut for ``spec``'s ranks and readers: the rest of the epoch split over the new
    readers, every new rank at the start of that remainder."""
    if not is_elastic(state, spec):
        return state
    cut = {"readers": state["ranks"] * state["readers_per_rank"],
           "consumed": consumed_counts(state, _current_rows(state, shards))}
    k = spec.runtime.readers_per_rank
    return {**state, "ranks": spec.trainer.ranks, "readers_per_rank": k, "cuts": state["cuts"] + [cut],
            "skipped_before_cuts": [asdict(r) for r in skipped_records(state)],
            "rank_states": [{"position": fresh_position(state["epoch"]), "skipped": []}
                            for _ in range(spec.trainer.ranks)]}


def reader_orders(state: dict, shards: list[ShardInfo]) -> list[dict[int, np.ndarray]]:
    """Per global reader, the explicit sequence of the state's epoch when it was cut (else none)."""
    rows = _current_rows(state, shards)
    return [{state["epoch"]: r} if state["cuts"] else {} for r in rows]


def save_state(state: dict, path: str | Path) -> Path:
    """Write ``state`` as JSON (atomically: a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)
    return path


def load_state(path: str | Path) -> dict:
    """Read a state written by :func:`save_state`; errors name the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"resume_from: cannot read pipeline state {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"resume_from: {path} is not a pipeline state (invalid JSON: {exc})") from None


def state_from_checkpoints(paths: list[str | Path], spec: PipelineSpec, shards: list[ShardInfo]) -> dict:
    """The pipeline state from the per-rank files of :meth:`TrainerRank.save_checkpoint` (all ranks)."""
    import torch

    saved = [torch.load(p, map_location="cpu", weights_only=False) for p in paths]
    ranks = sorted(s["rank"] for s in saved)
    if ranks != list(range(saved[0]["world_size"])):
        raise ValueError(f"checkpoints: need one file per rank 0..{saved[0]['world_size'] - 1}, got ranks {ranks}")
    by_rank = sorted(zip(saved, paths), key=lambda sp: sp[0]["rank"])
    return build_state(spec, shards, [s["stream"] for s, _ in by_rank], [str(p) for _, p in by_rank])

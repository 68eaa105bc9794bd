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


MAX_READERS = 4096  # readers (ranks x readers_per_rank) a state may name, or the shard count when more
STATE_FIELDS = ("stream", "epoch", "ranks", "readers_per_rank", "cuts", "skipped_before_cuts", "rank_states")
RECORD_FIELDS = {"shard": (str, type(None)), "key": (str, type(None)), "reason": (str,),
                 "offset": (int, type(None)), "epoch": (int, type(None))}


def _refuse(where: str, message: str, prefix: str = "resume_from") -> None:
    raise ValueError(f"{prefix}: {where}: {message}")


def _integer(value, where: str, lo: int, hi: int | None = None, prefix: str = "resume_from") -> int:
    """``value`` when it is an integer in ``lo..hi`` (``hi`` None: no upper bound); else refuse naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int):
        _refuse(where, f"must be an integer, got {value!r}", prefix)
    if hi is None and value < lo:
        _refuse(where, f"{value} must be >= {lo}", prefix)
    if hi is not None and not lo <= value <= hi:
        _refuse(where, f"{value} is outside {lo}..{hi}", prefix)
    return value


def _list(value, where: str, length: int | None = None, prefix: str = "resume_from") -> list:
    if not isinstance(value, list):
        _refuse(where, f"must be a list, got {value!r}", prefix)
    if length is not None and len(value) != length:
        _refuse(where, f"must hold {length} entries, got {len(value)}", prefix)
    return value


def validate_records(records, where: str, prefix: str = "resume_from") -> None:
    """Quarantine records as :func:`skipped_records` reads them (``SkipRecord`` fields)."""
    for i, rec in enumerate(_list(records, where, prefix=prefix)):
        if not isinstance(rec, dict):
            _refuse(f"{where}[{i}]", f"must be a quarantine record (an object), got {rec!r}", prefix)
        unknown = sorted(set(rec) - set(RECORD_FIELDS))
        if unknown:
            _refuse(f"{where}[{i}]", f"unknown field(s) {unknown}; a record has {', '.join(RECORD_FIELDS)}", prefix)
        for name, types in RECORD_FIELDS.items():
            if name not in rec and name in ("shard", "key", "reason"):
                _refuse(f"{where}[{i}].{name}", "is missing", prefix)
            if name in rec and (isinstance(rec[name], bool) or not isinstance(rec[name], types)):
                _refuse(f"{where}[{i}].{name}", f"has the wrong type: {rec[name]!r}", prefix)


def _rows_of_stream(stream: dict, epoch: int, num_readers: int, cuts: list[dict]) -> list[np.ndarray]:
    """:func:`epoch_rows` from a state's ``stream`` fields (shard sample counts, seed, window)."""
    shards = [_Counted(int(n)) for _, n in stream["data"]["shards"]]
    return epoch_rows(shards, stream["seed"], stream["data"]["shuffle_window"], epoch, num_readers, cuts)


class _Counted:
    """A shard of which only the sample count is known (all :func:`epoch_rows` reads)."""

    def __init__(self, num_samples: int):
        self.num_samples = num_samples


def _next_indices(cursor: int, k: int) -> list[int]:
    """Per reader slot, the index of its next batch when the rank's walk is at entry ``cursor``
    (entry ``t`` is batch ``t // k`` of slot ``t % k``, as :mod:`mixflow.runtime.mixer_actor` walks)."""
    return [cursor // k + (1 if slot < cursor % k else 0) for slot in range(k)]


def validate_position(position, lengths: list[int], batch_size: int, on_error: str, epoch: int | None = None,
                      where: str = "position", prefix: str = "resume_from") -> None:
    """Refuse (``ValueError`` naming the field) a rank position the rank's mixer cannot have produced.

    ``lengths``: the rows of each of the rank's reader slots in the position's epoch (the
    seeded plan, :func:`epoch_rows`); ``epoch``: the epoch the position must be in (None: any).
    A position is ``{"epoch", "step", "cursor", "starts"[, "done"]}``, the state after the
    rank's ``step``-th batch: ``cursor`` the next entry of the round-robin walk, ``starts``
    where each slot's next batch begins. With ``on_error: raise`` every batch holds
    ``batch_size`` rows (the last of a slot the rest), so ``step`` and ``starts`` follow from
    ``cursor`` exactly; with ``skip`` bad rows make batches longer, and they are checked
    against the bounds that leaves (without reading the shards).
    """
    k, bs, exact = len(lengths), batch_size, on_error == "raise"
    if not isinstance(position, dict):
        _refuse(where, f"must be a position object (epoch, step, cursor, starts), got {position!r}", prefix)
    for name in ("epoch", "step", "cursor", "starts"):
        if name not in position:
            _refuse(f"{where}.{name}", "is missing", prefix)
    unknown = sorted(set(position) - {"epoch", "step", "cursor", "starts", "done"})
    if unknown:
        _refuse(where, f"unknown field(s) {unknown}", prefix)
    if epoch is None:
        _integer(position["epoch"], f"{where}.epoch", 0, prefix=prefix)
    elif position["epoch"] != epoch or isinstance(position["epoch"], bool):
        _refuse(f"{where}.epoch", f"{position['epoch']!r} is not the state's epoch {epoch}", prefix)
    done = position.get("done", False)
    if not isinstance(done, bool):
        _refuse(f"{where}.done", f"must be true or false, got {done!r}", prefix)
    batches = [-(-n // bs) for n in lengths]  # batches of each slot (an upper bound under skip)
    most = max(batches, default=0)
    last = (most - 1) * k + max(s for s in range(k) if batches[s] == most) + 1 if most else 0
    cursor = _integer(position["cursor"], f"{where}.cursor", 0, last, prefix)
    nxt = _next_indices(cursor, k)
    if cursor:
        slot, index = (cursor - 1) % k, (cursor - 1) // k
        if index >= batches[slot]:
            _refuse(f"{where}.cursor", f"{cursor} follows entry {cursor - 1} (batch {index} of reader slot {slot}), "
                                       f"past that slot's {batches[slot]} batches: no batch ends there", prefix)
    if done and exact and cursor != last:
        _refuse(f"{where}.cursor", f"{cursor} is not the end of the epoch ({last}) but the position is done", prefix)
    starts = position["starts"]
    if starts is None:
        if cursor:
            _refuse(f"{where}.starts", f"is null but cursor is {cursor}", prefix)
        starts = [0] * k
    _list(starts, f"{where}.starts", k, prefix)
    for s, (value, n) in enumerate(zip(starts, lengths)):
        name = f"{where}.starts[{s}]"
        _integer(value, name, 0, n, prefix)
        low = min(nxt[s] * bs, n)
        if exact and value != low:
            _refuse(name, f"{value} does not follow from cursor {cursor} (reader slot {s}'s next batch is "
                          f"{nxt[s]}, which starts at {low})", prefix)
        if nxt[s] == 0 and value != 0:
            _refuse(name, f"{value}: reader slot {s} has delivered no batch at cursor {cursor}, so it starts at 0",
                    prefix)
        if value < low:
            _refuse(name, f"{value} is outside {low}..{n} (batch {nxt[s]} of reader slot {s} starts at row "
                          f"{low} or later)", prefix)
    high = sum(min(i, b) for i, b in zip(nxt, batches))
    if exact:
        if position["step"] != high or isinstance(position["step"], bool):
            _integer(position["step"], f"{where}.step", 0, prefix=prefix)
            _refuse(f"{where}.step", f"{position['step']} does not follow from cursor {cursor} "
                                     f"({high} batches end before it)", prefix)
    else:  # a slot not at its end delivered every entry before the cursor; one at its end maybe not
        low = sum(i for i, v, n in zip(nxt, starts, lengths) if v < n)
        _integer(position["step"], f"{where}.step", max(low, 1 if cursor else 0), high, prefix)


def rank_lengths(stream: dict, epoch: int, ranks: int, readers_per_rank: int, rank: int,
                 cuts: list[dict] | None = None) -> list[int]:
    """Rows of each reader slot of ``rank`` in ``epoch`` (after ``cuts``), from a state's ``stream`` fields."""
    rows = _rows_of_stream(stream, epoch, ranks * readers_per_rank, list(cuts or []))
    return [len(r) for r in rows[rank * readers_per_rank:(rank + 1) * readers_per_rank]]


def validate_feed_position(position, stream: dict, rank: int, world_size: int, readers_per_rank: int,
                           where: str = "position", prefix: str = "load_state_dict") -> None:
    """:func:`validate_position` for one feed rank's ``state["position"]`` (``stream``: the
    pipeline's :func:`stream_fields`): refuses, naming the field, what the rank cannot be at."""
    if not isinstance(position, dict):
        _refuse(where, f"must be a position object (epoch, step, cursor, starts), got {position!r}", prefix)
    epoch = _integer(position.get("epoch"), f"{where}.epoch", 0, prefix=prefix)
    validate_position(position, rank_lengths(stream, epoch, world_size, readers_per_rank, rank),
                      stream["batch_size"], stream["on_error"], epoch, where, prefix)


def validate_state(state, spec: PipelineSpec, shards: list[ShardInfo]) -> None:
    """Refuse (``ValueError`` naming the field) a pipeline state that ``spec`` cannot resume:
    another stream, a missing or mistyped field, an epoch past ``trainer.epochs``, cuts or
    rank positions that the epoch's seeded plan (:func:`epoch_rows`) cannot have produced."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"resume_from: not an image pipeline state (format must be {FORMAT!r}, "
                         f"got {state.get('format') if isinstance(state, dict) else type(state).__name__!r})")
    missing = [name for name in STATE_FIELDS if name not in state]
    if missing:
        raise ValueError(f"resume_from: the state lacks field(s) {', '.join(missing)} (a state is what "
                         "pipeline.state_dict() returns, or a run's pipeline_state.json)")
    if not isinstance(state["stream"], dict):
        _refuse("stream", f"must be an object, got {state['stream']!r}")
    diffs = differences(state["stream"], stream_fields(spec, shards), "")
    if diffs:
        raise ValueError("resume_from: the state was saved with a different stream; differing fields: "
                         + "; ".join(diffs))
    epoch = _integer(state["epoch"], "epoch", 0)
    if epoch >= spec.trainer.epochs:
        raise ValueError(f"resume_from: the state is at epoch {state['epoch']} but trainer.epochs is "
                         f"{spec.trainer.epochs}; nothing is left to run")
    most = max(MAX_READERS, len(shards))  # more readers than that is no state a run saved (and costly to plan)
    ranks = _integer(state["ranks"], "ranks", 1, most)
    k = _integer(state["readers_per_rank"], "readers_per_rank", 1, most // ranks)
    stream = state["stream"]
    cuts = _list(state["cuts"], "cuts")
    for i, cut in enumerate(cuts):
        if not isinstance(cut, dict) or set(cut) != {"readers", "consumed"}:
            _refuse(f"cuts[{i}]", f"must be an object with readers and consumed, got {cut!r}")
        readers = _integer(cut["readers"], f"cuts[{i}].readers", 1, most)
        rows = _rows_of_stream(stream, epoch, readers, cuts[:i])
        for r, value in enumerate(_list(cut["consumed"], f"cuts[{i}].consumed", readers)):
            _integer(value, f"cuts[{i}].consumed[{r}]", 0, len(rows[r]))
    validate_records(state["skipped_before_cuts"], "skipped_before_cuts")
    rank_states = _list(state["rank_states"], "rank_states", ranks)
    lengths = [len(r) for r in _rows_of_stream(stream, epoch, ranks * k, cuts)]
    for r, rank_state in enumerate(rank_states):
        where = f"rank_states[{r}]"
        if not isinstance(rank_state, dict) or "position" not in rank_state or "skipped" not in rank_state:
            _refuse(where, f"must be an object with position and skipped, got {rank_state!r}")
        validate_position(rank_state["position"], lengths[r * k:(r + 1) * k], stream["batch_size"],
                          stream["on_error"], epoch, f"{where}.position")
        validate_records(rank_state["skipped"], f"{where}.skipped")
    checkpoints = state.get("checkpoints")
    if checkpoints is not None:
        for i, path in enumerate(_list(checkpoints, "checkpoints", ranks)):
            if not isinstance(path, str):
                _refuse(f"checkpoints[{i}]", f"must be a file path, got {path!r}")


def check_resumable(state: dict, spec: PipelineSpec, shards: list[ShardInfo]) -> None:
    """Raise ``ValueError`` naming the field of ``state`` that ``spec`` cannot resume: every
    stream-deciding field where they differ, or the first field that is missing, mistyped or
    inconsistent with the epoch's plan (:func:`validate_state`)."""
    validate_state(state, spec, shards)


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
    skip = {(i, r) for i, s in enumerate(shards) for r in s.skip_rows}  # duplicate copies: never delivered
    rows = np.array([row for row in consumed_rows(state, shards) if (int(row[0]), int(row[1])) not in skip],
                    np.int64).reshape(-1, 2)
    return [k for k in rows_to_keys(shards, rows) if k not in bad]


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
